"""Token mixers of the PoolFormer paper's ablations (Table 5) and the per-stage knobs of the
PoolFormer backbone: behaviour of each mixer, shapes at input sizes other than the 224x224
pre-training size, and the parameter counts of the hybrids and ablations."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from poolformer_mm.models import MetaFormer, PoolFormer, load_backbone_weights
from poolformer_mm.models.layers import (
    TOKEN_MIXER_PRESETS,
    TOKEN_MIXERS,
    Attention,
    ChannelLayerNorm,
    ChannelScale,
    DepthwiseConvMixer,
    IdentityMixer,
    MetaFormerBlock,
    PoolingMixer,
    PositionEmbedding,
    RandomMixing,
    SepConv,
    SpatialFC,
    build_token_mixer,
    resize_token_matrix,
)

PPPA = ('pool', 'pool', 'pool', 'attn')
PPAA = ('pool', 'pool', 'attn', 'attn')
PPPF = ('pool', 'pool', 'pool', 'spatial_fc')
PPFF = ('pool', 'pool', 'spatial_fc', 'spatial_fc')


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _build_on_meta(**kwargs) -> PoolFormer:
    # Counting needs no real storage.
    with torch.device('meta'):
        return PoolFormer('s12', **kwargs)


def classifier_equivalent_params(model: PoolFormer) -> int:
    """The ImageNet classifier the backbone comes from: the backbone without its output norms,
    plus the final norm (weight and bias) and a Linear(C4, 1000) head."""
    c = model.embed_dims[-1]
    return _count(model) - _count(model.output_norms) + 2 * c + (c * 1000 + 1000)


def _strides_4_to_32(height, width):
    h, w = (height - 3) // 4 + 1, (width - 3) // 4 + 1
    shapes = []
    for channels in (64, 128, 320, 512):
        shapes.append((1, channels, h, w))
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return shapes


# ---------------------------------------------------------------------------------- sizes
# (variant, backbone arguments, the paper's Table 5 figure in M, our exact classifier count)
PARAMETER_TABLE = [
    ('baseline', dict(), 11.9, 11_915_176),
    ('identity', dict(token_mixers='identity'), 11.9, 11_915_176),
    ('dwconv', dict(token_mixers='dwconv'), 11.9, 11_948_456),
    ('pool_5', dict(pool_size=5), 11.9, 11_915_176),
    ('pool_7', dict(pool_size=7), 11.9, 11_915_176),
    ('pool_9', dict(pool_size=9), 11.9, 11_915_176),
    ('layer_norm', dict(norm_cfg=dict(type='LN')), 11.9, 11_915_176),
    ('batch_norm', dict(norm_cfg=dict(type='BN')), 11.9, 11_915_176),
    ('relu', dict(act_cfg=dict(type='ReLU')), 11.9, 11_915_176),
    ('silu', dict(act_cfg=dict(type='SiLU')), 11.9, 11_915_176),
    ('random', dict(token_mixers='random'), 11.9, 11_915_176),
    ('pppa', dict(token_mixers=PPPA), 14.0, 14_038_440),
    ('ppaa', dict(token_mixers=PPAA), 16.5, 16_535_592),
    ('pppf', dict(token_mixers=PPPF), 11.9, 11_919_978),
    ('ppff', dict(token_mixers=PPFF), 12.2, 12_150_474),
]


@pytest.mark.parametrize('variant, kwargs, table_m, exact', PARAMETER_TABLE,
                         ids=[row[0] for row in PARAMETER_TABLE])
def test_classifier_equivalent_parameters_match_the_ablation_table(variant, kwargs, table_m,
                                                                   exact):
    params = classifier_equivalent_params(_build_on_meta(**kwargs))
    assert params == exact
    assert round(params / 1e6, 1) == table_m


def test_global_random_mixing_adds_21_m_frozen_entries_outside_the_parameters():
    model = _build_on_meta(token_mixers='random')
    frozen = sum(b.numel() for name, b in model.named_buffers() if name.endswith('random_matrix'))
    # [HW, HW] per block on the 56x56, 28x28, 14x14 and 7x7 grids of a 224 input
    assert frozen == 2 * 3136**2 + 2 * 784**2 + 6 * 196**2 + 2 * 49**2 == 21_133_602
    assert round(frozen / 1e6) == 21


def test_hybrid_extra_parameters_are_attention_layers_and_one_position_embedding():
    pooling = _count(_build_on_meta())
    hybrid = _build_on_meta(token_mixers=PPAA)
    attention = 6 * (4 * 320 * 320 + 320) + 2 * (4 * 512 * 512 + 512)  # qkv + proj with bias
    assert _count(hybrid) - pooling == attention + 320 * 14 * 14


# ---------------------------------------------------------------------------------- registry
@pytest.mark.parametrize('name, cls', [('pool', PoolingMixer), ('identity', IdentityMixer),
                                       ('dwconv', DepthwiseConvMixer), ('attn', Attention),
                                       ('spatial_fc', SpatialFC), ('random', RandomMixing)])
def test_every_ablation_mixer_is_built_by_name(name, cls):
    assert isinstance(build_token_mixer(name, 64, token_grid=(7, 7)), cls)


@pytest.mark.parametrize('name, cls', [('sepconv', SepConv), ('attention', Attention)])
def test_the_metaformer_baselines_mixers_come_from_the_same_registry(name, cls):
    assert isinstance(build_token_mixer(name, 64), cls)


def test_attn_is_a_preset_of_attention_with_a_projection_bias():
    attn, attention = build_token_mixer('attn', 64), build_token_mixer('attention', 64)
    assert type(attn) is type(attention) is Attention
    assert attn.proj.bias is not None and attention.proj.bias is None
    assert attn.qkv.bias is None and attention.qkv.bias is None
    assert build_token_mixer(dict(type='attn', proj_bias=False), 64).proj.bias is None
    assert all(preset['type'] in TOKEN_MIXERS for preset in TOKEN_MIXER_PRESETS.values())


def test_either_backbone_takes_any_mixer_of_the_registry():
    with torch.no_grad():
        outs = PoolFormer('s12', token_mixers=('pool', 'sepconv', 'dwconv', 'attention'))(
            torch.rand(1, 3, 64, 64))
        assert [o.shape[1] for o in outs] == [64, 128, 320, 512]
        arch = dict(layers=[1, 1, 1, 1], embed_dims=[16, 32, 64, 64],
                    token_mixers=['dwconv', 'pool', 'spatial_fc', 'attn'])
        outs = MetaFormer(arch)(torch.rand(1, 3, 64, 64))
        assert [o.shape[1] for o in outs] == [16, 32, 64, 64]


def test_unknown_mixer_names_the_valid_ones():
    with pytest.raises(KeyError, match=r"unknown token mixer 'conv'.*'attn'.*'spatial_fc'"):
        build_token_mixer('conv', 64)


def test_grid_mixers_take_the_stage_grid_unless_their_config_sets_one():
    assert build_token_mixer('spatial_fc', 8, token_grid=(5, 6)).base_size == (5, 6)
    assert build_token_mixer(dict(type='spatial_fc', base_size=3), 8, (5, 6)).base_size == (3, 3)
    assert build_token_mixer('random', 8, token_grid=(4, 4)).base_size == (4, 4)


# ---------------------------------------------------------------------------------- attention
def test_attention_mixer_has_32_wide_heads_no_qkv_bias_and_a_projection_bias():
    mixer = build_token_mixer('attn', 320)
    assert (mixer.num_heads, mixer.head_dim) == (10, 32)
    assert mixer.qkv.bias is None and mixer.proj.bias is not None


def test_attention_mixes_every_position_with_every_other():
    torch.manual_seed(0)
    mixer = build_token_mixer('attn', 64).eval()
    x = torch.randn(1, 64, 6, 9)
    changed = x.clone()
    changed[..., 0, 0] += 1.0
    with torch.no_grad():
        difference = (mixer(changed) - mixer(x)).abs().amax(dim=1)
    assert (difference > 0).all()  # even the far corner (5, 8) sees the change at (0, 0)


@pytest.mark.parametrize('size', [(7, 7), (3, 11), (1, 1)])
def test_attention_keeps_the_shape_of_any_grid(size):
    x = torch.randn(2, 64, *size)
    assert build_token_mixer('attn', 64)(x).shape == x.shape


def test_hybrids_add_one_position_embedding_at_the_start_of_the_first_attention_stage():
    for mixers, stage, grid in ((PPAA, 2, (14, 14)), (PPPA, 3, (7, 7))):
        model = _build_on_meta(token_mixers=mixers)
        embeds = [i for i, s in enumerate(model.stages) if s.pos_embed is not None]
        assert embeds == [stage]
        assert tuple(model.stages[stage].pos_embed.weight.shape) == (1, model.embed_dims[stage],
                                                                     *grid)
    assert all(s.pos_embed is None for s in _build_on_meta().stages)


def test_position_embedding_grid_follows_the_pretraining_size():
    model = _build_on_meta(token_mixers=PPAA, pretrain_img_size=(384, 256))
    assert model.stages[2].pos_embed.base_size == (24, 16)


def test_position_embedding_is_added_as_is_at_its_grid_and_resized_bicubically_elsewhere():
    embed = PositionEmbedding(4, (3, 5))
    with torch.no_grad():
        embed.weight.normal_()
    x = torch.randn(2, 4, 3, 5)
    assert torch.equal(embed(x), x + embed.weight)
    x = torch.randn(2, 4, 7, 4)
    expected = x + F.interpolate(embed.weight, size=(7, 4), mode='bicubic', align_corners=False)
    torch.testing.assert_close(embed(x), expected)


def test_position_embedding_starts_at_zero_and_learns_at_other_sizes():
    embed = PositionEmbedding(4, 3)
    assert torch.all(embed.weight == 0)
    embed(torch.randn(1, 4, 5, 6)).sum().backward()
    assert embed.weight.grad is not None and embed.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- spatial FC
def test_spatial_fc_at_its_grid_is_the_learned_token_matrix():
    torch.manual_seed(0)
    mixer = SpatialFC(8, base_size=(3, 4))
    x = torch.randn(2, 8, 3, 4)
    expected = (x.reshape(2, 8, 12) @ mixer.fc.weight.t()).reshape(2, 8, 3, 4)
    torch.testing.assert_close(mixer(x), expected)
    assert mixer.fc.bias is None


@pytest.mark.parametrize('size', [(14, 14), (5, 9), (2, 3), (1, 1)])
def test_resized_spatial_fc_keeps_a_global_average_a_global_average(size):
    mixer = SpatialFC(8, base_size=(7, 7))
    with torch.no_grad():
        mixer.fc.weight.fill_(1 / 49)
    x = torch.randn(2, 8, *size)
    out = mixer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x.mean(dim=(2, 3), keepdim=True).expand_as(x))


def test_resized_spatial_fc_still_trains_its_learned_matrix():
    mixer = SpatialFC(8, base_size=(7, 7))
    mixer(torch.randn(1, 8, 10, 12)).square().sum().backward()
    assert mixer.fc.weight.grad is not None and mixer.fc.weight.grad.abs().sum() > 0


def test_strict_spatial_fc_names_the_grid_it_expects():
    mixer = SpatialFC(8, base_size=(7, 7), interpolate=False)
    assert mixer(torch.randn(1, 8, 7, 7)).shape == (1, 8, 7, 7)
    with pytest.raises(ValueError, match=r'fixed 7x7 token grid .* got a 8x10 grid.*'
                                         r'interpolate=True'):
        mixer(torch.randn(1, 8, 8, 10))


def test_resize_token_matrix_at_the_same_grid_changes_nothing():
    matrix = torch.randn(12, 12)
    torch.testing.assert_close(resize_token_matrix(matrix, (3, 4), (3, 4)), matrix)


def test_resize_token_matrix_resizes_both_index_pairs():
    # A matrix that copies the token at its own position stays (nearly) a copy on a finer grid:
    # resizing only one index pair would smear it along one axis of the grid.
    matrix = torch.eye(16)
    resized = resize_token_matrix(matrix, (4, 4), (8, 8)) * (16 / 64)
    x = torch.linspace(0, 1, 8).repeat(8, 1)  # a smooth ramp over the width
    out = (resized @ x.reshape(64)).reshape(8, 8)
    interior = (slice(2, -2), slice(2, -2))
    torch.testing.assert_close(out[interior], x[interior], atol=0.05, rtol=0)


def test_strict_spatial_fc_backbone_runs_only_at_the_pretraining_size():
    model = PoolFormer('s12', token_mixers=('pool', 'pool', 'pool',
                                            dict(type='spatial_fc', interpolate=False))).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 224, 224))[-1].shape == (1, 512, 7, 7)
        with pytest.raises(ValueError, match='fixed 7x7 token grid'):
            model(torch.rand(1, 3, 256, 320))


# ---------------------------------------------------------------------------------- random
def test_random_mixing_is_frozen_and_row_stochastic_at_other_grids():
    mixer = build_token_mixer('random', 8, token_grid=(7, 7))
    assert _count(mixer) == 0
    matrix = mixer.mixing_matrix((5, 9))
    assert matrix.shape == (45, 45)
    torch.testing.assert_close(matrix.sum(dim=-1), torch.ones(45))


# ---------------------------------------------------------------------------------- backbones
HYBRIDS = {'pppa': PPPA, 'ppaa': PPAA, 'pppf': PPPF, 'ppff': PPFF,
           'random': ('random', ) * 4, 'dwconv': ('dwconv', ) * 4}


@pytest.mark.parametrize('mixers', HYBRIDS.values(), ids=HYBRIDS.keys())
@pytest.mark.parametrize('height, width', [(224, 224), (256, 160), (33, 47)])
def test_backbone_outputs_strides_4_8_16_32_at_any_input_size(mixers, height, width):
    torch.manual_seed(0)
    model = PoolFormer('s12', token_mixers=mixers).eval()
    with torch.no_grad():
        outs = model(torch.rand(1, 3, height, width))
    assert [tuple(o.shape) for o in outs] == _strides_4_to_32(height, width)
    assert all(torch.isfinite(o).all() for o in outs)


def test_unknown_argument_still_gets_a_suggestion():
    with pytest.raises(TypeError, match="did you mean 'token_mixers'"):
        PoolFormer('s12', token_mixer='attn')


# ---------------------------------------------------------------------------------- norms
def test_pooling_only_models_keep_groupnorm_with_one_group_and_the_fast_path_layout():
    model = _build_on_meta()
    block = model.stages[1].blocks[0]
    for norm in (block.norm1, block.norm2, model.output_norms['3']):
        assert type(norm) is nn.GroupNorm and norm.num_groups == 1 and norm.eps == 1e-5
    assert isinstance(block.token_mixer, PoolingMixer)
    assert isinstance(block.layer_scale1, ChannelScale)
    assert [n for n, _ in block.mlp.named_children()] == ['fc1', 'act', 'fc2']


def test_attention_hybrids_use_channel_layernorm_in_every_stage_like_the_released_ones():
    model = _build_on_meta(token_mixers=PPAA)
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, ChannelLayerNorm))]
    assert len(norms) == 2 * 12 + 4
    assert all(isinstance(n, ChannelLayerNorm) and n.bias is not None and n.eps == 1e-5
               for n in norms)


def test_norm_can_be_chosen_per_stage():
    gn, ln = dict(type='GN', num_groups=1), dict(type='LN')
    model = _build_on_meta(token_mixers=PPAA, norm_cfg=(gn, gn, ln, ln))
    kinds = [type(s.blocks[0].norm1) for s in model.stages]
    assert kinds == [nn.GroupNorm, nn.GroupNorm, ChannelLayerNorm, ChannelLayerNorm]
    assert [type(n) for n in model.output_norms.values()] == kinds


def test_norm_per_stage_needs_four_entries():
    with pytest.raises(ValueError, match=r'norm_cfg needs one entry per stage \(4\)'):
        PoolFormer('s12', norm_cfg=[dict(type='LN')] * 3)


@pytest.mark.parametrize('norm_cfg, norm_type', [(dict(type='GN'), nn.GroupNorm),
                                                  (dict(type='LN'), ChannelLayerNorm),
                                                  (dict(type='BN'), nn.BatchNorm2d)])
def test_ablation_norms_by_mmcv_name(norm_cfg, norm_type):
    model = _build_on_meta(norm_cfg=norm_cfg)
    assert all(type(m.norm1) is norm_type and type(m.norm2) is norm_type
               for s in model.stages for m in s.blocks)
    if norm_type is nn.GroupNorm:
        assert model.stages[0].blocks[0].norm1.num_groups == 1  # one group unless told


def test_layer_norm_normalises_each_position_over_its_channels_only():
    norm = PoolFormer('s12', norm_cfg=dict(type='LN')).stages[0].blocks[0].norm1
    x = torch.randn(2, 64, 5, 7) * torch.arange(1., 8.)  # scale differs along the width
    out = norm(x)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(2, 5, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(dim=1, unbiased=False), torch.ones(2, 5, 7), atol=1e-3,
                               rtol=0)


def test_block_refuses_torch_layernorm_which_would_normalise_the_width():
    with pytest.raises(ValueError, match='normalises over the width'):
        MetaFormerBlock(16, PoolingMixer(16), norm_cfg=dict(type='LN'))


# ---------------------------------------------------------------------------------- act, pool
@pytest.mark.parametrize('act, cls', [('GELU', nn.GELU), ('ReLU', nn.ReLU), ('SiLU', nn.SiLU)])
def test_activation_ablation_reaches_every_mlp(act, cls):
    model = _build_on_meta(act_cfg=dict(type=act))
    assert all(type(b.mlp.act) is cls for s in model.stages for b in s.blocks)


def test_pool_size_reaches_pool_mixers_given_as_dicts_unless_they_set_their_own():
    model = _build_on_meta(pool_size=7, token_mixers=(dict(type='pool'), 'pool',
                                                      dict(type='pool', pool_size=5), 'attn'))
    sizes = [s.blocks[0].token_mixer.pool_size for s in model.stages[:3]]
    assert sizes == [7, 7, 5]


# ---------------------------------------------------------------------------------- training
def test_hybrid_init_is_truncated_normal_on_linear_layers_and_zero_position_embedding():
    torch.manual_seed(0)
    model = PoolFormer('s12', token_mixers=PPAA)
    model.init_weights()
    mixer = model.stages[2].blocks[0].token_mixer
    assert mixer.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(mixer.proj.bias == 0)
    assert torch.all(model.stages[2].pos_embed.weight == 0)


def test_frozen_stages_freeze_the_position_embedding_with_its_stage():
    model = PoolFormer('s12', token_mixers=PPAA, frozen_stages=3).train()
    assert not model.stages[2].pos_embed.weight.requires_grad
    assert all(p.requires_grad for p in model.stages[3].parameters())


def test_hybrid_with_cp_gives_identical_outputs_and_gradients():
    torch.manual_seed(0)
    mixers = ('pool', 'pool', 'attn', 'spatial_fc')
    plain = PoolFormer('s12', token_mixers=mixers)
    plain.init_weights()
    checkpointed = PoolFormer('s12', token_mixers=mixers, with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 96, 64)
    grads, outs = [], []
    for model in (plain, checkpointed):
        out = model.train()(x)
        sum((o * o).mean() for o in out).backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_hybrid_checkpoint_of_this_package_loads_exactly(tmp_path):
    torch.manual_seed(0)
    source = PoolFormer('s12', token_mixers=PPAA)
    with torch.no_grad():
        for param in source.parameters():
            param.normal_()
    path = tmp_path / 'hybrid.pth'
    torch.save(dict(state_dict={'backbone.' + k: v for k, v in source.state_dict().items()}),
               path)
    target = PoolFormer('s12', token_mixers=PPAA)
    load_backbone_weights(target, str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert 'stages.2.pos_embed.weight' in source.state_dict()
    assert 'stages.2.blocks.0.token_mixer.qkv.weight' in source.state_dict()
