"""MetaFormer baselines (IdentityFormer, RandFormer, PoolFormerV2, ConvFormer, CAFormer) as a
dense-prediction backbone: sizes, shapes, random mixing, freezing, checkpointing, weights."""
import functools
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import MODELS

from poolformer_mm.models import checkpoint_layouts
from poolformer_mm.models.backbones.metaformer import MetaFormer
from poolformer_mm.models.layers import (
    Attention,
    ChannelLayerNorm,
    ModifiedLayerNorm,
    RandomMixing,
    StarReLU,
)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def classifier_equivalent_params(model: MetaFormer, arch: str) -> int:
    """Parameters of the ImageNet classifier the backbone comes from: the backbone without its
    output norms, plus the final norm and head that timm / sail-sg put on top."""
    c = model.embed_dims[-1]
    with torch.device('meta'):
        final_norm = nn.LayerNorm(c)
        if arch.startswith(('convformer', 'caformer')):
            # MlpHead: fc1 (bias) -> SquaredReLU (no parameters) -> LayerNorm -> fc2 (bias)
            head = nn.Sequential(nn.Linear(c, 4 * c), nn.LayerNorm(4 * c), nn.Linear(4 * c, 1000))
        else:
            head = nn.Linear(c, 1000)
    return _count(model) - _count(model.output_norms) + _count(final_norm) + _count(head)


def _build_on_meta(arch: str, **kwargs) -> MetaFormer:
    # Counting needs no real storage; b36 models then build in a fraction of a second.
    with torch.device('meta'):
        return MetaFormer(arch, **kwargs)


# ---------------------------------------------------------------------------------- sizes
# (arch, the "MetaFormer baselines" table's figure in M, its decimals, our exact count)
PARAMETER_TABLE = [
    ('identityformer_s12', 11.9, 1, 11_891_712),
    ('randformer_s12', 11.9, 1, 11_891_712),
    ('poolformerv2_s12', 11.9, 1, 11_891_712),
    ('convformer_s18', 27, 0, 26_774_448),
    ('caformer_s18', 26, 0, 26_341_656),
    ('convformer_s36', 40, 0, 40_012_152),
    ('caformer_s36', 39, 0, 39_297_102),
    ('convformer_m36', 57, 0, 57_051_640),
    ('caformer_m36', 56, 0, 56_204_878),
    ('convformer_b36', 100, 0, 99_882_616),
    ('caformer_b36', 99, 0, 98_753_614),
]


@pytest.mark.parametrize('arch, table_m, decimals, exact', PARAMETER_TABLE,
                         ids=[row[0] for row in PARAMETER_TABLE])
def test_classifier_equivalent_parameters_match_the_paper_table(arch, table_m, decimals, exact):
    count = classifier_equivalent_params(_build_on_meta(arch), arch)
    assert round(count / 1e6, decimals) == table_m
    assert count == exact


def test_randformer_s12_has_0_2_m_frozen_random_matrices_outside_the_parameters():
    model = _build_on_meta('randformer_s12')
    frozen = sum(b.numel() for name, b in model.named_buffers() if name.endswith('random_matrix'))
    # one 196x196 matrix per block of stage 3 (6 blocks), one 49x49 per block of stage 4 (2)
    assert frozen == 6 * 196**2 + 2 * 49**2
    assert round(frozen / 1e6, 1) == 0.2
    assert not any('random_matrix' in name for name, _ in model.named_parameters())


@pytest.mark.parametrize('size', ['s12', 's24', 's36', 'm36', 'm48'])
def test_pool_identity_and_rand_families_share_their_trainable_size(size):
    counts = {_count(_build_on_meta(f'{family}_{size}'))
              for family in ('poolformerv2', 'identityformer', 'randformer')}
    assert len(counts) == 1


def test_output_norms_exist_only_for_returned_stages():
    model = _build_on_meta('convformer_s18', out_indices=(1, 3))
    assert sorted(model.output_norms) == ['1', '3']


# ---------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize('arch', ['caformer_s18', 'randformer_s12'])
@pytest.mark.parametrize('height, width', [(224, 224), (223, 301)])
def test_outputs_have_strides_4_8_16_32(arch, height, width):
    torch.manual_seed(0)
    model = MetaFormer(arch).eval()
    with torch.no_grad():
        outs = model(torch.rand(1, 3, height, width))
    sides = [(height, width)]
    sides.append(((height + 4 - 7) // 4 + 1, (width + 4 - 7) // 4 + 1))
    for _ in range(3):
        h, w = sides[-1]
        sides.append(((h - 1) // 2 + 1, (w - 1) // 2 + 1))
    expected = [(1, c, *hw) for c, hw in zip(model.embed_dims, sides[1:])]
    assert [tuple(o.shape) for o in outs] == expected
    assert all(torch.isfinite(o).all() for o in outs)


def test_out_indices_select_the_returned_stages():
    model = MetaFormer('identityformer_s12', out_indices=(2, 3)).eval()
    with torch.no_grad():
        outs = model(torch.rand(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [320, 512]


# ---------------------------------------------------------------------------------- layers
def test_star_relu_is_scaled_squared_relu_plus_bias():
    act = StarReLU(scale_value=0.5, bias_value=-0.25)
    x = torch.tensor([-2., 0., 3.])
    assert torch.allclose(act(x), torch.tensor([-0.25, -0.25, 4.25]))
    assert [tuple(p.shape) for p in act.parameters()] == [(1, ), (1, )]


def test_v2_block_norms_have_no_bias_and_eps_1e_6():
    x = torch.randn(2, 8, 5, 6)
    mln, ln = ModifiedLayerNorm(8), ChannelLayerNorm(8)
    assert mln.bias is None and ln.bias is None
    assert torch.allclose(mln(x), F.group_norm(x, 1, eps=1e-6), atol=1e-6)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (8, ), eps=1e-6).permute(0, 3, 1, 2)
    assert torch.allclose(ln(x), expected, atol=1e-6)


@pytest.mark.parametrize('arch, norm', [('poolformerv2_s12', ModifiedLayerNorm),
                                        ('identityformer_s12', ModifiedLayerNorm),
                                        ('convformer_s18', ChannelLayerNorm)])
def test_each_family_uses_its_block_norm(arch, norm):
    model = _build_on_meta(arch)
    assert isinstance(model.stages[1].blocks[0].norm1, norm)
    assert isinstance(model.stages[1].downsample.norm, ChannelLayerNorm)


def test_caformer_attention_uses_32_wide_heads_without_biases():
    model = _build_on_meta('caformer_s18')
    mixer = model.stages[3].blocks[0].token_mixer
    assert isinstance(mixer, Attention) and mixer.num_heads == 512 // 32
    assert mixer.qkv.bias is None and mixer.proj.bias is None


def test_res_scale_only_in_the_last_two_stages_and_no_layer_scale():
    model = _build_on_meta('caformer_s18')
    names = [n for n, _ in model.named_parameters()]
    assert not any('layer_scale' in n for n in names)
    stages_with_res_scale = {int(n.split('.')[1]) for n in names if 'res_scale' in n}
    assert stages_with_res_scale == {2, 3}


# ---------------------------------------------------------------------------------- random mixing
def test_random_mixing_at_the_pretraining_grid_uses_the_matrix_as_is():
    torch.manual_seed(0)
    mixer = RandomMixing(8, base_size=(14, 14))
    x = torch.randn(2, 8, 14, 14)
    expected = torch.einsum('mn,bcn->bcm', mixer.random_matrix, x.flatten(2)).reshape(x.shape)
    assert torch.allclose(mixer(x), expected, atol=1e-6)


@pytest.mark.parametrize('size', [(14, 19), (7, 10), (4, 4)])
def test_random_mixing_at_another_grid_is_a_resized_row_stochastic_matrix(size):
    torch.manual_seed(0)
    mixer = RandomMixing(8, base_size=(7, 7))
    matrix = mixer.mixing_matrix(size)
    tokens = size[0] * size[1]
    assert matrix.shape == (tokens, tokens)
    assert (matrix > 0).all()
    assert torch.allclose(matrix.sum(-1), torch.ones(tokens), atol=1e-5)
    # a weighted average of tokens leaves a constant feature map unchanged
    constant = torch.full((1, 8, *size), 3.0)
    assert torch.allclose(mixer(constant), constant, atol=1e-5)


def _linear_resize_operator(old: int, new: int) -> torch.Tensor:
    """[new, old] matrix of 1-d linear resizing (align_corners=False), the factor of bilinear."""
    eye = torch.eye(old).unsqueeze(1)  # each basis vector as a 1-channel signal
    return F.interpolate(eye, size=new, mode='linear', align_corners=False)[:, 0].t()


def test_random_mixing_resizes_bilinearly_over_both_index_pairs_then_renormalises_rows():
    torch.manual_seed(0)
    mixer = RandomMixing(1, base_size=(3, 4))
    h, w = 5, 7
    rh, rw = _linear_resize_operator(3, h), _linear_resize_operator(4, w)
    grid = mixer.random_matrix.reshape(3, 4, 3, 4)  # (write i, j, read k, l)
    expected = torch.einsum('ai,bj,ck,dl,ijkl->abcd', rh, rw, rh, rw, grid).reshape(h * w, h * w)
    expected = expected / expected.sum(-1, keepdim=True)
    assert torch.allclose(mixer.mixing_matrix((h, w)), expected, atol=1e-6)


def test_random_mixing_matrices_are_frozen_buffers_that_survive_training_mode():
    model = MetaFormer('randformer_s12')
    model.requires_grad_(True)
    model.train()
    buffers = [b for n, b in model.named_buffers() if n.endswith('random_matrix')]
    assert len(buffers) == 8 and not any(b.requires_grad for b in buffers)
    assert 'stages.2.blocks.0.token_mixer.random_matrix' in model.state_dict()


# ---------------------------------------------------------------------------------- freezing
@pytest.mark.parametrize('frozen_stages', [-1, 0, 1, 2, 4])
def test_frozen_stages_freeze_stem_and_the_first_k_stages(frozen_stages):
    model = MetaFormer('identityformer_s12', frozen_stages=frozen_stages)
    model.train()
    frozen_prefixes = (['stem.'] if frozen_stages >= 0 else []) + [
        p for i in range(max(frozen_stages, 0)) for p in (f'stages.{i}.', f'output_norms.{i}.')]
    for name, param in model.named_parameters():
        assert param.requires_grad == (not name.startswith(tuple(frozen_prefixes))), name
    for name, module in model.named_modules():
        if name and (name + '.').startswith(tuple(frozen_prefixes)):
            assert not module.training, name
    assert model.stages[3].training == (frozen_stages < 4)


def test_bad_frozen_stages_is_rejected():
    with pytest.raises(ValueError, match='frozen_stages'):
        MetaFormer('identityformer_s12', frozen_stages=5)


# ---------------------------------------------------------------------------------- with_cp
def test_gradient_checkpointing_gives_identical_outputs_and_gradients():
    # every token mixer and both block norms, small enough for a quick backward pass
    arch = dict(layers=[1, 1, 2, 1], embed_dims=[16, 32, 64, 64],
                token_mixers=['pool', 'sepconv', 'random', 'attention'], block_norm='mln')
    torch.manual_seed(0)
    plain = MetaFormer(arch)
    checkpointed = MetaFormer(arch, with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 64, 64)
    results = []
    for model in (plain, checkpointed):
        model.train()
        outs = model(x)
        sum(o.square().mean() for o in outs).backward()
        results.append((outs, {n: p.grad for n, p in model.named_parameters()}))
    (outs_a, grads_a), (outs_b, grads_b) = results
    assert all(torch.equal(a, b) for a, b in zip(outs_a, outs_b))
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


# ---------------------------------------------------------------------------------- checkpoints
@functools.lru_cache(maxsize=None)  # read-only in the tests; building and saving dominate
def _randomised(arch: str) -> MetaFormer:
    torch.manual_seed(1)
    model = MetaFormer(arch)
    # distinct values everywhere, so a key landing in the wrong place cannot go unnoticed
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def _attention_stages(model: MetaFormer):
    return {i for i, stage in enumerate(model.stages)
            if isinstance(stage.blocks[0].token_mixer, Attention)}


def _classifier_head(prefix: str, arch: str, c: int) -> dict:
    if arch.startswith(('convformer', 'caformer')):
        shapes = {'fc1.weight': (4 * c, c), 'fc1.bias': (4 * c, ), 'norm.weight': (4 * c, ),
                  'norm.bias': (4 * c, ), 'fc2.weight': (1000, 4 * c), 'fc2.bias': (1000, )}
    else:
        shapes = {'weight': (1000, c), 'bias': (1000, )}
    return {prefix + name: torch.randn(shape) for name, shape in shapes.items()}


def to_timm(model: MetaFormer, arch: str) -> dict:
    """Our names -> timm's ImageNet classifier (head.norm + head.fc)."""
    linear_mlp_stages = _attention_stages(model)  # timm runs attention stages channels-last
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith('output_norms.'):
            if key.startswith('output_norms.3.'):
                out[key.replace('output_norms.3.', 'head.norm.')] = value
            continue
        match = re.match(r'^stages\.(\d+)\.blocks\.\d+\.mlp\.fc\d\.weight$', key)
        if match and int(match[1]) in linear_mlp_stages:
            value = value.flatten(1)
        out[key] = value
    out.update(_classifier_head('head.fc.', arch, model.embed_dims[-1]))
    return out


def to_sailsg(model: MetaFormer, arch: str) -> dict:
    """Our names -> sail-sg/metaformer's ImageNet classifier (channels-last: Linear layers)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith('output_norms.'):
            if key.startswith('output_norms.3.'):
                out[key.replace('output_norms.3.', 'norm.')] = value
            continue
        key = key.replace('stem.conv.', 'downsample_layers.0.conv.')
        key = key.replace('stem.norm.', 'downsample_layers.0.post_norm.')
        key = re.sub(r'^stages\.(\d+)\.downsample\.norm\.', r'downsample_layers.\1.pre_norm.', key)
        key = re.sub(r'^stages\.(\d+)\.downsample\.conv\.', r'downsample_layers.\1.conv.', key)
        key = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.\2.', key)
        if re.search(r'(mlp\.fc\d|pwconv\d)\.weight$', key):
            value = value.flatten(1)
        out[key] = value
    out.update(_classifier_head('head.', arch, model.embed_dims[-1]))
    return out


def _load(arch: str, path, **kwargs) -> MetaFormer:
    torch.manual_seed(2)  # different random matrices and init than the source
    model = MetaFormer(arch, init_cfg=dict(type='Pretrained', checkpoint=str(path)), **kwargs)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize('layout', ['sail-sg/metaformer', 'timm'])
@pytest.mark.parametrize('arch', ['caformer_s18', 'randformer_s12'])
def test_imagenet_checkpoint_loads_exactly(tmp_path, arch, layout):
    source = _randomised(arch)
    convert = to_sailsg if layout == 'sail-sg/metaformer' else to_timm
    path = tmp_path / 'imagenet.pth'
    torch.save(dict(state_dict=convert(source, arch)), path)
    loaded = _load(arch, path)

    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        expected, actual = source(x), loaded(x)
    # the first output norms are not in an ImageNet file; the last one is its final norm
    assert torch.equal(expected[3], actual[3])
    loaded_state = loaded.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith(('output_norms.0', 'output_norms.1', 'output_norms.2')):
            assert torch.equal(loaded_state[key], value), key


def test_missing_and_unused_tensors_are_logged_one_line_each(tmp_path, monkeypatch):
    source = _randomised('caformer_s18')
    path = tmp_path / 'timm.pth'
    torch.save(to_timm(source, 'caformer_s18'), path)
    lines = []
    monkeypatch.setattr(checkpoint_layouts, 'print_log', lambda msg, **kw: lines.append(msg))
    _load('caformer_s18', path, out_indices=(1, 2))
    assert any('timm layout' in line for line in lines)
    missing = [line for line in lines if 'left at initial values' in line]
    unused = [line for line in lines if 'unused checkpoint tensors' in line]
    assert len(missing) == 1 and '\n' not in missing[0]
    assert 'output_norms.1.weight' in missing[0] and 'output_norms.2.bias' in missing[0]
    assert len(unused) == 1 and 'output_norms.3.weight' in unused[0]


def test_own_checkpoint_of_a_detector_loads_with_every_output_norm(tmp_path):
    source = _randomised('caformer_s18')
    state = {'backbone.' + k: v for k, v in source.state_dict().items()}
    state['neck.lateral_convs.0.conv.weight'] = torch.randn(256, 128, 1, 1)
    path = tmp_path / 'detector.pth'
    torch.save(dict(meta=dict(epoch=12), state_dict=state), path)
    loaded = _load('caformer_s18', path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(source(x), loaded(x)))


def test_checkpoint_of_another_family_is_rejected(tmp_path):
    path = tmp_path / 'caformer.pth'
    torch.save(to_timm(_randomised('caformer_s18'), 'caformer_s18'), path)
    with pytest.raises(ValueError, match='different block structure.*another arch'):
        _load('convformer_s18', path)


def test_checkpoint_of_another_depth_is_rejected(tmp_path):
    path = tmp_path / 's12.pth'
    torch.save(to_sailsg(_randomised('poolformerv2_s12'), 'poolformerv2_s12'), path)
    with pytest.raises(ValueError, match='different block structure'):
        _load('poolformerv2_s24', path)


def test_checkpoint_with_other_shapes_is_rejected(tmp_path):
    state = to_sailsg(_randomised('randformer_s12'), 'randformer_s12')
    # e.g. fine-tuned at 384: 24x24 tokens in stage 3
    state['stages.2.0.token_mixer.random_matrix'] = torch.rand(576, 576)
    path = tmp_path / 'rand384.pth'
    torch.save(state, path)
    with pytest.raises(ValueError, match=r'shape mismatch.*random_matrix.*\(576, 576\)'):
        _load('randformer_s12', path)


@pytest.mark.parametrize('state', [
    {'patch_embed.proj.weight': torch.ones(8, 3, 7, 7), 'network.0.0.norm1.weight': torch.ones(8)},
    {'stem.conv.weight': torch.ones(8, 3, 7, 7), 'stages.0.blocks.0.norm1.bias': torch.ones(8)},
], ids=['official', 'timm'])
def test_poolformer_v1_checkpoint_is_pointed_to_the_poolformer_backbone(tmp_path, state):
    path = tmp_path / 'v1.pth'
    torch.save(state, path)
    with pytest.raises(ValueError, match="PoolFormer.*type='PoolFormer'"):
        _load('poolformerv2_s12', path)


def test_missing_checkpoint_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match='sail-sg/metaformer'):
        _load('caformer_s18', tmp_path / 'nowhere.pth')


# ---------------------------------------------------------------------------------- interface
def test_unknown_arch_lists_the_valid_names():
    with pytest.raises(ValueError) as err:
        MetaFormer('caformer_s12')
    message = str(err.value)
    assert "unknown MetaFormer arch 'caformer_s12' (did you mean 'caformer_s18'?)" in message
    for name in ('poolformerv2_m48', 'identityformer_s12', 'randformer_s36', 'convformer_b36',
                 'caformer_s18'):
        assert name in message


def test_misspelt_argument_gets_a_suggestion():
    with pytest.raises(TypeError, match="'out_indice' \\(did you mean 'out_indices'\\?\\)"):
        MetaFormer('caformer_s18', out_indice=(0, ))


def test_custom_arch_dict_builds():
    arch = dict(layers=[1, 1, 1, 1], embed_dims=[16, 32, 64, 64],
                token_mixers=['pool', dict(type='sepconv', kernel_size=3), 'random', 'attention'],
                block_norm='mln')
    model = MetaFormer(arch).eval()
    with torch.no_grad():
        outs = model(torch.rand(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [16, 32, 64, 64]


def test_registered_in_the_root_registry():
    model = MODELS.build(dict(type='MetaFormer', arch='identityformer_s12', out_indices=(3, )))
    assert isinstance(model, MetaFormer)
