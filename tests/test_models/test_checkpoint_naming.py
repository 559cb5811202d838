"""Both backbones name their parameters one way (timm's), and checkpoints written with the names
PoolFormer had before (``stem.proj``, ``downsample.proj``, ``layer_scale_1``) still load, through
every path: ``init_cfg=Pretrained``, torch's ``load_state_dict`` and mmengine's
``load_checkpoint`` (what ``--resume`` and ``tools/test.py`` use)."""
import re

import pytest
import torch
import torch.nn as nn
from mmengine.runner import load_checkpoint

from poolformer_mm.models import (
    MetaFormer,
    PoolFormer,
    convert_to_metaformer_layout,
    convert_to_poolformer_layout,
)
from poolformer_mm.models.checkpoint_layouts import upgrade_legacy_keys

# today's names -> the names PoolFormer's checkpoints had before the schemes were unified
# (MetaFormer's names did not change)
_TO_OLD_POOLFORMER_NAMES = [
    (r'^stem\.conv\.', 'stem.proj.'),
    (r'^(stages\.\d+\.downsample)\.conv\.', r'\1.proj.'),
    (r'^(stages\.\d+\.blocks\.\d+\.layer_scale)(\d)\.', r'\1_\2.'),
]

MODELS = {
    'poolformer_s12': lambda **kw: PoolFormer('s12', **kw),
    'poolformer_s12_ppaa': lambda **kw: PoolFormer('s12', token_mixers=('pool', 'pool', 'attn',
                                                                         'attn'), **kw),
    'caformer_s18': lambda **kw: MetaFormer('caformer_s18', **kw),
}


def to_old_names(state: dict, name: str) -> dict:
    if not name.startswith('poolformer'):
        return dict(state)
    out = {}
    for key, value in state.items():
        for pattern, replacement in _TO_OLD_POOLFORMER_NAMES:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


@pytest.fixture(scope='module', params=list(MODELS))
def source(request):
    torch.manual_seed(0)
    model = MODELS[request.param]()
    with torch.no_grad():  # distinct values everywhere, so a misplaced tensor shows
        for param in model.parameters():
            param.normal_()
    return request.param, model.eval()


def _outputs(model):
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


def _assert_same_weights_and_outputs(loaded, source_model):
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == source_model.state_dict().keys()
    for key, value in source_model.state_dict().items():
        assert torch.equal(loaded_state[key], value), key
    assert all(torch.equal(a, b) for a, b in zip(_outputs(loaded), _outputs(source_model)))


# ---------------------------------------------------------------------------------- one scheme
def test_both_backbones_name_stem_downsampling_and_scales_alike():
    with torch.device('meta'):
        poolformer = PoolFormer('s12')
        metaformer = MetaFormer(dict(layers=[1, 1, 1, 1], embed_dims=[64, 128, 320, 512],
                                     token_mixers=['pool'] * 4,
                                     layer_scale_init_values=[1e-5] * 4))
    for model in (poolformer, metaformer):
        keys = model.state_dict().keys()
        assert {'stem.conv.weight', 'stages.1.downsample.conv.weight',
                'stages.0.blocks.0.layer_scale1.scale',
                'stages.0.blocks.0.layer_scale2.scale'} <= keys
        assert not any(re.search(r'layer_scale_\d|(stem|downsample)\.proj', k) for k in keys)


# ---------------------------------------------------------------------------------- old files
@pytest.mark.parametrize('wrapped', [False, True], ids=['bare_backbone', 'whole_model'])
def test_checkpoint_with_the_old_names_loads_exactly_through_init_cfg(tmp_path, source,
                                                                      wrapped):
    name, model = source
    old = to_old_names(model.state_dict(), name)
    if wrapped:  # an mmengine checkpoint of a detector
        state = {'backbone.' + k: v for k, v in old.items()}
        state['neck.lateral_convs.0.conv.weight'] = torch.randn(256, 128, 1, 1)
        old = dict(meta=dict(epoch=12), state_dict=state)
    path = tmp_path / 'old.pth'
    torch.save(old, path)

    convert = convert_to_poolformer_layout if name.startswith('poolformer') else \
        convert_to_metaformer_layout
    expected_layout = ('poolformer_mm (old names)' if name.startswith('poolformer') else
                       'poolformer_mm')
    assert convert(torch.load(path, weights_only=True))[1] == expected_layout

    torch.manual_seed(1)
    loaded = MODELS[name](init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    loaded.init_weights()
    _assert_same_weights_and_outputs(loaded, model)


def test_old_backbone_state_dict_loads_strictly_with_torch(source):
    name, model = source
    loaded = MODELS[name]()
    loaded.load_state_dict(to_old_names(model.state_dict(), name), strict=True)
    _assert_same_weights_and_outputs(loaded, model)


def test_old_whole_model_checkpoint_loads_strictly_with_mmengine(tmp_path, source):
    name, model = source

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = MODELS[name]()
            self.neck = nn.Conv2d(512, 8, 1)

    detector = Detector()
    state = {'backbone.' + k: v for k, v in to_old_names(model.state_dict(), name).items()}
    state.update({'neck.' + k: v for k, v in detector.neck.state_dict().items()})
    path = tmp_path / 'epoch_12.pth'
    torch.save(dict(meta=dict(epoch=12), state_dict=state), path)
    load_checkpoint(detector, str(path), map_location='cpu', strict=True, logger='silent')
    _assert_same_weights_and_outputs(detector.backbone, model)


def test_upgrading_old_keys_renames_only_the_backbones_old_names():
    old = {'backbone.stem.proj.weight': 1, 'stem.proj.bias': 2,
           'module.backbone.stages.1.downsample.proj.weight': 3,
           'backbone.stages.0.blocks.1.layer_scale_2.scale': 4,
           'backbone.stages.2.blocks.0.token_mixer.proj.weight': 5,
           'neck.stem.proj.weight': 6, 'backbone.output_norms.3.weight': 7}
    assert upgrade_legacy_keys(old) == {
        'backbone.stem.conv.weight': 1, 'stem.conv.bias': 2,
        'module.backbone.stages.1.downsample.conv.weight': 3,
        'backbone.stages.0.blocks.1.layer_scale2.scale': 4,
        'backbone.stages.2.blocks.0.token_mixer.proj.weight': 5,
        'neck.stem.proj.weight': 6, 'backbone.output_norms.3.weight': 7}
