"""Configs of the MetaFormer family (ConvFormer-S18, CAFormer-S18 and the PoolFormer-S12
[Pool, Pool, Attention, Attention] hybrid) beside the PoolFormer ones: each builds, has the
parameter count measured here, swaps only the backbone and keeps the PoolFormer-S12 recipe.

The models are built, never initialised: their backbones point at ImageNet checkpoints that a
test machine does not have."""

import pytest
import torch
from mmengine.config import Config

# config: (whole-model parameters as measured, what it inherits)
CONFIGS = {
    'detection/retinanet_convformer_s18': (33_921_596, 'detection/retinanet_poolformer_s12'),
    'detection/retinanet_caformer_s18': (33_488_804, 'detection/retinanet_poolformer_s12'),
    'detection/retinanet_poolformer_s12_ppaa': (26_273_460,
                                                'detection/retinanet_poolformer_s12'),
    'detection/mask_rcnn_convformer_s18': (43_839_160, 'detection/mask_rcnn_poolformer_s12'),
    'detection/mask_rcnn_caformer_s18': (43_406_368, 'detection/mask_rcnn_poolformer_s12'),
    'detection/mask_rcnn_poolformer_s12_ppaa': (36_191_024,
                                                'detection/mask_rcnn_poolformer_s12'),
    'segmentation/fpn_convformer_s18': (27_938_398, 'segmentation/fpn_poolformer_s12'),
    'segmentation/fpn_caformer_s18': (27_505_606, 'segmentation/fpn_poolformer_s12'),
    'segmentation/fpn_poolformer_s12_ppaa': (20_290_262, 'segmentation/fpn_poolformer_s12'),
}
CHECKPOINTS = {
    'convformer_s18': 'https://huggingface.co/sail/dl/resolve/main/convformer/convformer_s18.pth',
    'caformer_s18': 'https://huggingface.co/sail/dl/resolve/main/caformer/caformer_s18.pth',
    'poolformer_s12_ppaa': ('https://github.com/sail-sg/poolformer/releases/download/v1.0/'
                            'metaformer_ppaa_s12_224.pth.tar'),
}


@pytest.fixture(scope='module', params=CONFIGS, ids=lambda name: name.split('/')[1])
def built(request, build_model):
    cfg = Config.fromfile(f'configs/{request.param}.py')
    return request.param, cfg, build_model(cfg)


def test_parameter_count_is_the_measured_one(built):
    name, _, model = built
    params = sum(p.numel() for p in model.parameters())
    assert params == CONFIGS[name][0], f'{name}: {params} ({params / 1e6:.1f} M)'


def test_backbone_and_its_imagenet_checkpoint(built):
    name, cfg, model = built
    backbone = cfg.model.backbone
    family = next(f for f in CHECKPOINTS if name.endswith(f))
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=CHECKPOINTS[family])
    if family == 'poolformer_s12_ppaa':
        assert (backbone.type, backbone.arch) == ('PoolFormer', 's12')
        assert tuple(backbone.token_mixers) == ('pool', 'pool', 'attn', 'attn')
        assert type(model.backbone.stages[0].blocks[0].norm1).__name__ == 'ChannelLayerNorm'
    else:
        assert (backbone.type, backbone.arch) == ('MetaFormer', family)


def test_only_the_backbone_differs_from_the_poolformer_s12_config(built):
    name, cfg, _ = built
    base = Config.fromfile(f'configs/{CONFIGS[name][1]}.py')
    assert cfg.model.backbone.get('out_indices') == base.model.backbone.get('out_indices')
    for key in set(cfg.model) | set(base.model):
        if key != 'backbone':
            assert cfg.model.get(key) == base.model.get(key), key
    assert cfg.optim_wrapper == base.optim_wrapper
    assert cfg.param_scheduler == base.param_scheduler
    assert cfg.train_dataloader == base.train_dataloader
    assert cfg.test_dataloader == base.test_dataloader


def test_backbone_outputs_fit_the_neck(built):
    _, cfg, model = built
    model.eval()
    with torch.no_grad():
        outs = model.backbone(torch.rand(1, 3, 96, 128))
    assert [o.shape[1] for o in outs] == list(cfg.model.neck.in_channels)
