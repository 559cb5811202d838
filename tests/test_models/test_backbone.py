"""Behaviour of the PoolFormer dense backbone."""
import pytest
import torch
import torch.nn as nn

from poolformer_mm.models import PoolFormer
from poolformer_mm.models.layers import PoolingMixer

DENSE_PARAMS = {
    's12': 11_403_200,
    's24': 20_876_992,
    's36': 30_350_784,
    'm36': 55_404_864,
    'm48': 72_705_792,
}


def count_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('arch, expected', DENSE_PARAMS.items())
def test_dense_backbone_parameter_count(arch, expected):
    assert count_params(PoolFormer(arch)) == expected


@pytest.mark.parametrize('height, width', [(224, 224), (223, 301), (64, 96), (33, 47)])
def test_outputs_have_strides_4_8_16_32_at_any_size(height, width):
    model = PoolFormer('s12').eval()
    with torch.no_grad():
        outs = model(torch.rand(1, 3, height, width))
    # conv 7x7/4 pad 2, then three conv 3x3/2 pad 1
    h, w = (height - 3) // 4 + 1, (width - 3) // 4 + 1
    expected = []
    for channels in (64, 128, 320, 512):
        expected.append((1, channels, h, w))
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    assert [tuple(o.shape) for o in outs] == expected


def test_output_norms_exist_only_for_returned_stages_and_all_params_get_gradients():
    model = PoolFormer('s12', out_indices=(1, 2, 3))
    assert sorted(model.output_norms.keys()) == ['1', '2', '3']
    outs = model(torch.rand(2, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [128, 320, 512]
    sum(o.mean() for o in outs).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []  # DDP would need find_unused_parameters otherwise


def test_unknown_arch_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown PoolFormer arch 's13'.*'m36'.*'s12'"):
        PoolFormer('s13')


def test_custom_arch_dict_is_checked():
    with pytest.raises(ValueError, match='needs exactly the keys'):
        PoolFormer(dict(layers=[1, 1, 1, 1], embed_dims=[8, 16, 32, 64]))
    model = PoolFormer(dict(layers=[1, 1, 1, 1], embed_dims=[8, 16, 32, 64],
                            mlp_ratios=[2, 2, 2, 2], layer_scale_init_value=0.5))
    assert [len(s.blocks) for s in model.stages] == [1, 1, 1, 1]
    assert model.stages[2].blocks[0].mlp.fc1.out_channels == 64
    assert torch.all(model.stages[0].blocks[0].layer_scale1.scale == 0.5)


@pytest.mark.parametrize('out_indices', [(4, ), (-1, ), ()])
def test_bad_out_indices_are_rejected(out_indices):
    with pytest.raises(ValueError, match='out_indices'):
        PoolFormer('s12', out_indices=out_indices)


def _trainable(model):
    return {n.split('.')[0] + ('.' + n.split('.')[1] if n.startswith(('stages', 'output_norms'))
                               else '') for n, p in model.named_parameters() if p.requires_grad}


def test_frozen_stages_minus_one_freezes_nothing():
    model = PoolFormer('s12', frozen_stages=-1).train()
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_stage_0_freezes_only_the_stem():
    model = PoolFormer('s12', frozen_stages=0).train()
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert all(p.requires_grad for p in model.stages.parameters())
    assert all(p.requires_grad for p in model.output_norms.parameters())


def test_frozen_stages_2_freezes_stem_and_first_two_stages_and_keeps_them_in_eval():
    model = PoolFormer('s12', frozen_stages=2, drop_path_rate=0.1)
    model.train()
    assert _trainable(model) == {'stages.2', 'stages.3', 'output_norms.2', 'output_norms.3'}
    assert not model.stages[1].training and not model.stem.training
    assert model.stages[2].training


def test_frozen_stages_out_of_range_is_rejected():
    with pytest.raises(ValueError, match='frozen_stages'):
        PoolFormer('s12', frozen_stages=5)


def test_norm_eval_keeps_batchnorm_in_eval_mode():
    model = PoolFormer('s12', norm_cfg=dict(type='BN'), norm_eval=True).train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert model.stages[0].blocks[0].mlp.training
    model = PoolFormer('s12', norm_cfg=dict(type='BN'), norm_eval=False).train()
    assert all(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.slow
def test_with_cp_gives_identical_outputs_and_gradients():
    torch.manual_seed(0)
    plain = PoolFormer('s12', drop_path_rate=0.0)
    plain.init_weights()
    checkpointed = PoolFormer('s12', with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 96, 64)
    grads = []
    outs = []
    for model in (plain, checkpointed):
        model.train()
        out = model(x)
        sum((o * o).mean() for o in out).backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-7)


def test_drop_path_grows_linearly_over_all_blocks():
    model = PoolFormer('s12', drop_path_rate=0.3)
    rates = [getattr(b.drop_path, 'drop_prob', 0.0) for s in model.stages for b in s.blocks]
    assert len(rates) == 12
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert rates == pytest.approx(torch.linspace(0, 0.3, 12).tolist())


def test_default_init_is_truncated_normal_on_the_mlp_with_zero_bias():
    torch.manual_seed(0)
    model = PoolFormer('s12')
    model.init_weights()
    fc1 = model.stages[2].blocks[0].mlp.fc1
    assert fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(fc1.bias == 0)
    assert fc1.weight.mean().abs().item() < 1e-3
    assert torch.all(model.stages[0].blocks[0].layer_scale1.scale == 1e-5)
    assert torch.all(PoolFormer('s36').stages[0].blocks[0].layer_scale2.scale == 1e-6)


def test_pooling_mixer_is_average_of_real_neighbours_minus_input():
    x = torch.arange(9.).reshape(1, 1, 3, 3)
    out = PoolingMixer(1, pool_size=3)(x)
    # corner (0, 0) averages the 2x2 real neighbourhood {0, 1, 3, 4}; centre averages all nine
    assert out[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 3 + 4) / 4 - 0)
    assert out[0, 0, 1, 1].item() == pytest.approx(36 / 9 - 4)


def test_pool_size_is_passed_to_every_block():
    model = PoolFormer('s12', pool_size=5)
    assert {b.token_mixer.pool_size for s in model.stages for b in s.blocks} == {5}
    with pytest.raises(ValueError, match='odd'):
        PoolFormer('s12', pool_size=4)
