"""init_cfg=Pretrained loads every checkpoint layout users have, exactly, or fails clearly."""
import re

import pytest
import torch

from poolformer_mm.models import PoolFormer, checkpoint_layouts, convert_to_poolformer_layout


@pytest.fixture(scope='module')
def source_model():
    torch.manual_seed(0)
    model = PoolFormer('s12')
    # random values everywhere, so a key landing in the wrong place cannot go unnoticed
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    return model.eval()


def to_official(state):
    """Our names -> sail-sg/poolformer's ImageNet classifier names (with a head)."""
    out = {}
    for key, value in state.items():
        if key.startswith('output_norms.'):
            if key.startswith('output_norms.3.'):
                out[key.replace('output_norms.3.', 'norm.')] = value
            continue
        key = key.replace('stem.conv.', 'patch_embed.proj.')
        key = re.sub(r'^stages\.(\d)\.downsample\.conv\.',
                     lambda m: f'network.{2 * int(m[1]) - 1}.proj.', key)
        key = re.sub(r'^stages\.(\d)\.blocks\.', lambda m: f'network.{2 * int(m[1])}.', key)
        key = re.sub(r'layer_scale(\d)\.scale$', r'layer_scale_\1', key)
        out[key] = value
    out['head.weight'] = torch.randn(1000, 512)
    out['head.bias'] = torch.randn(1000)
    return out


def to_mmpretrain(state):
    official = to_official(state)
    out = {}
    for key, value in official.items():
        if key.startswith('head.'):
            out[key.replace('head.', 'head.fc.')] = value
        else:
            out['backbone.' + key.replace('norm.', 'norm6.', 1) if key.startswith('norm.')
                else 'backbone.' + key] = value
    return dict(state_dict=out, meta=dict(mmpretrain_version='1.2.0'))


def to_timm(state):
    out = {}
    for key, value in state.items():
        if key.startswith('output_norms.'):
            if key.startswith('output_norms.3.'):
                out[key.replace('output_norms.3.', 'head.norm.')] = value
            continue
        if re.search(r'layer_scale\d\.scale$', key):
            value = value.reshape(-1, 1, 1)  # timm keeps layer scales as [C, 1, 1]
        out[key] = value
    out['head.fc.weight'] = torch.randn(1000, 512)
    out['head.fc.bias'] = torch.randn(1000)
    return out


def to_mmengine_detector(state):
    out = {'backbone.' + k: v for k, v in state.items()}
    out['neck.lateral_convs.0.conv.weight'] = torch.randn(256, 128, 1, 1)
    return dict(meta=dict(epoch=12), state_dict=out, message_hub=dict())


def _load(path, **kwargs):
    model = PoolFormer('s12', init_cfg=dict(type='Pretrained', checkpoint=str(path)), **kwargs)
    model.init_weights()
    return model.eval()


def _assert_same_outputs(a, b, indices=(0, 1, 2, 3)):
    x = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
    for i in indices:
        assert torch.equal(out_a[i], out_b[i])


@pytest.mark.parametrize('layout, to_layout', [
    ('official', to_official), ('mmpretrain', to_mmpretrain), ('timm', to_timm),
    ('poolformer_mm', to_mmengine_detector), ('poolformer_mm', lambda s: dict(s))])
def test_checkpoint_layout_loads_exactly(tmp_path, source_model, layout, to_layout):
    checkpoint = to_layout(source_model.state_dict())
    assert convert_to_poolformer_layout(checkpoint)[1] == layout
    path = tmp_path / 'ckpt.pth'
    torch.save(checkpoint, path)
    loaded = _load(path)
    if layout == 'poolformer_mm':
        _assert_same_outputs(source_model, loaded)
    else:
        # ImageNet classifiers carry only the final norm: stages 0-2 output norms stay at init
        for key, value in source_model.state_dict().items():
            if key.startswith('output_norms.') and not key.startswith('output_norms.3.'):
                continue
            assert torch.equal(loaded.state_dict()[key], value), key
        _assert_same_outputs(source_model, loaded, indices=(3, ))


def test_official_checkpoint_final_norm_becomes_last_output_norm(tmp_path, source_model):
    path = tmp_path / 'poolformer_s12.pth.tar'
    official = to_official(source_model.state_dict())
    torch.save(official, path)
    loaded = _load(path, out_indices=(1, 2, 3))
    assert torch.equal(loaded.output_norms['3'].weight, official['norm.weight'])
    assert torch.equal(loaded.output_norms['3'].bias, official['norm.bias'])


def test_loading_logs_the_keys_left_at_init(tmp_path, source_model, monkeypatch):
    logged = []
    monkeypatch.setattr(checkpoint_layouts, 'print_log', lambda msg, **kwargs: logged.append(msg))
    path = tmp_path / 'poolformer_s12.pth.tar'
    torch.save(to_official(source_model.state_dict()), path)
    _load(path)
    out = '\n'.join(logged)
    assert 'official layout' in out
    assert ('left at initial values (not in checkpoint): output_norms.0.bias, '
            'output_norms.0.weight, output_norms.1.bias') in out


def test_checkpoint_of_a_deeper_arch_is_refused(tmp_path):
    s24 = PoolFormer('s24')
    path = tmp_path / 'poolformer_s24.pth.tar'
    torch.save(to_official(s24.state_dict()), path)
    with pytest.raises(ValueError, match=r'different block structure.*another arch'):
        _load(path)


def test_checkpoint_of_a_wider_arch_is_refused(tmp_path):
    m36 = PoolFormer('m36')
    path = tmp_path / 'poolformer_m36.pth.tar'
    torch.save(to_official(m36.state_dict()), path)
    with pytest.raises(ValueError, match=r'shape mismatches.*stem\.conv\.weight.*another arch'):
        _load(path)


def test_missing_checkpoint_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=r"'.*nothere.pth.tar' not found.*checkpoints/.*init_cfg=None"):
        _load(tmp_path / 'nothere.pth.tar')


def test_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / 'random.pth'
    path.write_bytes(torch.randint(0, 256, (4096, ), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match='not a readable PyTorch checkpoint|refused'):
        _load(path)


def test_truncated_checkpoint_is_refused(tmp_path, source_model):
    path = tmp_path / 'full.pth'
    torch.save(source_model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match='not a readable PyTorch checkpoint'):
        _load(path)


def test_checkpoint_of_another_network_is_refused(tmp_path):
    path = tmp_path / 'resnet.pth'
    torch.save({'conv1.weight': torch.zeros(64, 3, 7, 7), 'fc.weight': torch.zeros(10, 64)}, path)
    with pytest.raises(ValueError, match='not a PoolFormer checkpoint.*conv1.weight'):
        _load(path)
