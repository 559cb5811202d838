"""init_cfg=Pretrained loads every checkpoint layout users have, exactly, or fails clearly."""
import argparse
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
        return
    # ImageNet classifiers carry only the final norm: stages 0-2 output norms stay at init
    for key, value in source_model.state_dict().items():
        if key.startswith('output_norms.') and not key.startswith('output_norms.3.'):
            continue
        if layout == 'official' and key.startswith('output_norms.3.'):
            continue  # the paper's start: see test_official_file_starts_where_the_papers_code_did
        assert torch.equal(loaded.state_dict()[key], value), key
    if layout != 'official':
        _assert_same_outputs(source_model, loaded, indices=(3, ))


def _official_feat_keys(state):
    """Our backbone's keys -> those of the official dense-prediction class poolformer_*_feat
    (its models/poolformer.py: patch_embed, network.{i}, layer_scale_{1,2}, norm0/2/4/6)."""
    out = {}
    for key, value in state.items():
        key = key.replace('stem.conv.', 'patch_embed.proj.')
        key = re.sub(r'^stages\.(\d)\.downsample\.conv\.',
                     lambda m: f'network.{2 * int(m[1]) - 1}.proj.', key)
        key = re.sub(r'^stages\.(\d)\.blocks\.', lambda m: f'network.{2 * int(m[1])}.', key)
        key = re.sub(r'layer_scale(\d)\.scale$', r'layer_scale_\1', key)
        key = re.sub(r'^output_norms\.(\d)\.', lambda m: f'norm{2 * int(m[1])}.', key)
        out[key] = value
    return out


def _papers_load(feat_state, imagenet_state):
    """What the paper's code did: ``poolformer_*_feat.load_state_dict(imagenet, strict=False)``
    (its ``init_weights``): each tensor the model has takes the file's, the others keep their
    initial values, the file's other tensors go unused."""
    missing = sorted(k for k in feat_state if k not in imagenet_state)
    unexpected = sorted(k for k in imagenet_state if k not in feat_state)
    return {k: imagenet_state.get(k, v) for k, v in feat_state.items()}, missing, unexpected


def test_official_file_starts_where_the_papers_code_did(tmp_path, source_model):
    official = to_official(source_model.state_dict())
    path = tmp_path / 'poolformer_s12.pth.tar'
    torch.save(official, path)
    loaded = _load(path)
    fresh = PoolFormer('s12').state_dict()  # the initial values of a model built the same way
    expected, missing, unexpected = _papers_load(_official_feat_keys(fresh), official)
    # the rule itself: the classifier's norm and head have no place in poolformer_*_feat, whose
    # four output norms keep their initial values
    assert unexpected == ['head.bias', 'head.weight', 'norm.bias', 'norm.weight']
    assert missing == [f'norm{i}.{p}' for i in (0, 2, 4, 6) for p in ('bias', 'weight')]
    ours = _official_feat_keys(loaded.state_dict())
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key
    assert torch.equal(loaded.output_norms['3'].weight, torch.ones(512))
    assert torch.equal(loaded.output_norms['3'].bias, torch.zeros(512))


def test_official_final_norm_option_loads_the_classifier_norm_as_before(tmp_path, source_model):
    path = tmp_path / 'poolformer_s12.pth.tar'
    official = to_official(source_model.state_dict())
    torch.save(official, path)
    model = PoolFormer('s12', out_indices=(1, 2, 3), init_cfg=dict(
        type='Pretrained', checkpoint=str(path), final_norm='classifier'))
    model.init_weights()
    assert torch.equal(model.output_norms['3'].weight, official['norm.weight'])
    assert torch.equal(model.output_norms['3'].bias, official['norm.bias'])
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[-1], source_model(x)[-1])  # the last stage's output


@pytest.mark.parametrize('to_layout', [to_mmpretrain, to_timm])
def test_other_classifier_layouts_keep_their_final_norm_unless_told(tmp_path, source_model,
                                                                    to_layout):
    """mmpretrain's norm6 is the classifier's final norm and its downstream models load it;
    final_norm='initial' leaves it out as the official file's default does."""
    path = tmp_path / 'classifier.pth'
    torch.save(to_layout(source_model.state_dict()), path)
    expected = source_model.output_norms['3'].weight
    assert torch.equal(_load(path).output_norms['3'].weight, expected)
    model = PoolFormer('s12', init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                            final_norm='initial'))
    model.init_weights()
    assert torch.equal(model.output_norms['3'].weight, torch.ones(512))


@pytest.mark.parametrize('option, value, message', [
    ('final_norm', 'paper', "final_norm must be 'initial'"),
    ('use_ema', 'yes', 'use_ema must be True'),
])
def test_a_wrong_loading_option_is_refused_naming_it(tmp_path, source_model, option, value,
                                                     message):
    path = tmp_path / 'poolformer_s12.pth.tar'
    torch.save(to_official(source_model.state_dict()), path)
    model = PoolFormer('s12', init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                            **{option: value}))
    with pytest.raises(ValueError, match=f'init_cfg {message}'):
        model.init_weights()


def test_final_norm_is_refused_for_a_checkpoint_of_a_whole_model(tmp_path, source_model):
    path = tmp_path / 'detector.pth'
    torch.save(to_mmengine_detector(source_model.state_dict()), path)
    model = PoolFormer('s12', init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                            final_norm='initial'))
    with pytest.raises(ValueError, match="final_norm='initial' is for ImageNet classifier "
                       r'checkpoints; this one is in the poolformer_mm layout'):
        model.init_weights()


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


# ------------------------------------------------------------------ timm and Hugging Face files
def _timm_train_checkpoint(**weights):
    """What timm's train.py saves (its CheckpointSaver): weights plus the run's bookkeeping."""
    args = argparse.Namespace(model='poolformer_s12', lr=1e-3, epochs=300, opt='adamw',
                              model_ema=True, input_size=None, mean=None, drop_path=0.1,
                              aa='rand-m9-mstd0.5-inc1', data_dir='/data/imagenet')
    optimizer = {'state': {0: {'step': torch.tensor(10.), 'exp_avg': torch.zeros(3)}},
                 'param_groups': [{'lr': 1e-3, 'weight_decay': 0.05, 'params': [0]}]}
    return dict(epoch=299, arch='poolformer_s12', optimizer=optimizer, version=2, metric=77.24,
                args=args, **weights)


def _logs(monkeypatch):
    logged = []
    monkeypatch.setattr(checkpoint_layouts, 'print_log', lambda msg, **kwargs: logged.append(msg))
    return logged


def _assert_holds_imagenet_weights(loaded, source_state):
    for key, value in source_state.items():
        if key.startswith('output_norms.') and not key.startswith('output_norms.3.'):
            continue  # ImageNet classifiers carry only the final norm
        assert torch.equal(loaded.state_dict()[key], value), key


def test_timm_train_checkpoint_loads_its_state_dict(tmp_path, source_model):
    path = tmp_path / 'last.pth.tar'
    torch.save(_timm_train_checkpoint(state_dict=to_timm(source_model.state_dict())), path)
    _assert_holds_imagenet_weights(_load(path), source_model.state_dict())


def test_timm_train_checkpoint_with_only_ema_weights_loads_those_and_says_so(
        tmp_path, source_model, monkeypatch):
    logged = _logs(monkeypatch)
    path = tmp_path / 'model_best.pth.tar'
    torch.save(_timm_train_checkpoint(state_dict_ema=to_timm(source_model.state_dict())), path)
    _assert_holds_imagenet_weights(_load(path), source_model.state_dict())
    assert [m for m in logged if 'EMA' in m] == [
        'checkpoint holds only EMA weights (state_dict_ema, from timm train.py --model-ema); '
        'loading those']
    model = PoolFormer('s12', init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                            use_ema=False))
    with pytest.raises(ValueError, match=r"use_ema=False asks for the weights without "
                       r"averaging, but the checkpoint holds only EMA weights \('state_dict_ema'"):
        model.init_weights()


@pytest.fixture
def timm_train_file_with_both(tmp_path, source_model):
    """A timm train.py checkpoint with plain (source_model's) and EMA weights (other values)."""
    ema_model = PoolFormer('s12')
    path = tmp_path / 'last.pth.tar'
    torch.save(_timm_train_checkpoint(state_dict=to_timm(source_model.state_dict()),
                                      state_dict_ema=to_timm(ema_model.state_dict())), path)
    return path, ema_model


def test_timm_train_checkpoint_with_both_loads_the_ema_weights_as_timm_does(
        timm_train_file_with_both, monkeypatch):
    """timm's load_checkpoint(model, path) has use_ema=True: state_dict_ema when present."""
    path, ema_model = timm_train_file_with_both
    logged = _logs(monkeypatch)
    _assert_holds_imagenet_weights(_load(path), ema_model.state_dict())
    assert [m for m in logged if 'EMA' in m] == [
        'checkpoint holds EMA weights (state_dict_ema, from timm train.py --model-ema) and the '
        "weights without averaging (state_dict); loading 'state_dict_ema' (as timm's "
        "load_checkpoint does by default; use_ema=False in the init_cfg loads 'state_dict')"]


def test_timm_train_checkpoint_with_both_loads_state_dict_with_use_ema_false(
        timm_train_file_with_both, source_model, monkeypatch):
    path, _ = timm_train_file_with_both
    logged = _logs(monkeypatch)
    model = PoolFormer('s12', init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                            use_ema=False))
    model.init_weights()
    _assert_holds_imagenet_weights(model, source_model.state_dict())
    assert any("loading 'state_dict' (use_ema=False)" in m for m in logged), logged


def test_timm_train_checkpoint_loads_after_another_library_left_its_safe_globals(
        tmp_path, source_model):
    """timm's own loader wraps torch.load in torch.serialization.safe_globals([Namespace]);
    leaving that context takes Namespace off torch's process-wide allow-list, where importing
    this package had put it. Loading must not depend on that list."""
    from poolformer_mm.checkpoint_io import timm_checkpoint_globals
    path = tmp_path / 'last.pth.tar'
    torch.save(_timm_train_checkpoint(state_dict=to_timm(source_model.state_dict())), path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            pass  # as timm.models.load_checkpoint does around its torch.load
        assert argparse.Namespace not in torch.serialization.get_safe_globals()
        _assert_holds_imagenet_weights(_load(path), source_model.state_dict())
        # and the process-wide list is left as it was found
        assert argparse.Namespace not in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.add_safe_globals(timm_checkpoint_globals())


def _save_safetensors(state, path):
    from safetensors.torch import save_file
    # safetensors refuses views that share memory; timm's hub files are plain tensors
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path),
              metadata={'format': 'pt'})


@pytest.mark.parametrize('name', ['model.safetensors', 'poolformer_s12.pth'],
                         ids=['by-extension', 'by-header'])
def test_timm_safetensors_file_loads_exactly(tmp_path, source_model, name):
    """timm's weights on the Hugging Face Hub: model.safetensors in timm's names; a safetensors
    file saved under a .pth name is recognised by its header."""
    state = to_timm(source_model.state_dict())
    state = {k: v.flatten() if 'layer_scale' in k else v for k, v in state.items()}  # timm 1.x
    _save_safetensors(state, tmp_path / name)
    loaded = _load(tmp_path / name)
    _assert_holds_imagenet_weights(loaded, source_model.state_dict())
    _assert_same_outputs(source_model, loaded, indices=(3, ))


def test_truncated_safetensors_file_is_refused_clearly(tmp_path, source_model):
    path = tmp_path / 'model.safetensors'
    _save_safetensors(to_timm(source_model.state_dict()), path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"'.*model\.safetensors' is not a readable safetensors "
                                         r'file \(truncated or corrupt.*download it again'):
        _load(path)


@pytest.mark.parametrize('arch, backbone_type', [
    ('poolformer_s12', 'PoolFormer'), ('poolformerv2_s12', 'MetaFormer'),
    ('convformer_s18', 'MetaFormer'), ('caformer_s18', 'MetaFormer')])
def test_real_timm_model_weights_give_timm_stage_outputs(tmp_path, arch, backbone_type):
    """Optional: needs timm (not a dependency). Saves a timm model's weights as its Hugging
    Face Hub files are, loads them, and compares every stage's output with timm's."""
    timm = pytest.importorskip('timm', reason='timm is not installed (optional comparison)')
    from mmengine.registry import MODELS
    torch.manual_seed(0)
    reference = timm.create_model(arch, pretrained=False).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0, 0.05)
    _save_safetensors(reference.state_dict(), tmp_path / 'model.safetensors')
    ours = MODELS.build(dict(type=backbone_type, arch=arch.replace('poolformer_', ''),
                             init_cfg=dict(type='Pretrained',
                                           checkpoint=str(tmp_path / 'model.safetensors'))))
    ours.init_weights()
    ours.eval()
    stage_outputs = []
    for stage in ours.stages:
        stage.register_forward_hook(lambda module, args, out: stage_outputs.append(out))
    x = torch.rand(1, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours(x)
        expected = reference.forward_intermediates(x, indices=4, intermediates_only=True)
    assert len(stage_outputs) == len(expected) == 4
    for got, want in zip(stage_outputs, expected):
        # the same operations, in another order for some (float rounding only)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
