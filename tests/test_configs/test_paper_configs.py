"""The paper's configs: whole-model parameter counts and the recipe they encode."""
import pytest
import torch
from mmengine.config import Config

REPO_CONFIGS = 'configs'
OFFICIAL_WEIGHTS = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_{}.pth.tar'

DETECTORS = {
    'retinanet_poolformer_s12': 21.7, 'retinanet_poolformer_s24': 31.1,
    'retinanet_poolformer_s36': 40.6, 'mask_rcnn_poolformer_s12': 31.6,
    'mask_rcnn_poolformer_s24': 41.0, 'mask_rcnn_poolformer_s36': 50.5,
}
# S24: the paper's table says 23.2 M, which its other rows contradict; the model is 25.1 M.
SEGMENTORS = {
    'fpn_poolformer_s12': 15.7, 'fpn_poolformer_s24': 25.1, 'fpn_poolformer_s36': 34.6,
    'fpn_poolformer_m36': 59.8, 'fpn_poolformer_m48': 77.1,
}
# Frameworks the paper did not cover: measured here, with the base's heads (UPerNet's 512-channel
# head and its auxiliary FCN head; Cascade Mask R-CNN's three box stages).
BEYOND_THE_PAPER = {
    'detection/cascade_mask_rcnn_poolformer_s12': 64.5,
    'detection/cascade_mask_rcnn_poolformer_s24': 74.0,
    'detection/cascade_mask_rcnn_poolformer_s36': 83.4,
    'segmentation/upernet_poolformer_s12': 41.9,
    'segmentation/upernet_poolformer_s24': 51.4,
    'segmentation/upernet_poolformer_s36': 60.8,
}


def _build(path, build_model):
    cfg = Config.fromfile(path)
    return cfg, build_model(cfg)


def _build_with_count(path, millions, arch, build_model):
    """Build ``path``; check its parameter count (in millions, rounded to 0.1) and that its
    backbone starts from the official weights of ``arch``."""
    cfg, model = _build(path, build_model)
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e6, 1) == millions
    assert cfg.model.backbone.init_cfg.checkpoint == OFFICIAL_WEIGHTS.format(arch)
    return model


@pytest.mark.parametrize('name, millions', DETECTORS.items())
def test_detector_parameter_count_rounds_to_the_paper(name, millions, build_model):
    _build_with_count(f'{REPO_CONFIGS}/detection/{name}.py', millions, name[-3:], build_model)


@pytest.mark.parametrize('name, millions', SEGMENTORS.items())
def test_segmentor_parameter_count_rounds_to_the_paper(name, millions, build_model):
    _build_with_count(f'{REPO_CONFIGS}/segmentation/{name}.py', millions, name[-3:], build_model)


@pytest.mark.parametrize('name, millions', BEYOND_THE_PAPER.items())
def test_config_beyond_the_paper_has_its_measured_parameter_count(name, millions, build_model):
    model = _build_with_count(f'{REPO_CONFIGS}/{name}.py', millions, name[-3:], build_model)
    assert model.backbone.arch_name == name[-3:]


def test_retinanet_recipe():
    cfg = Config.fromfile(f'{REPO_CONFIGS}/detection/retinanet_poolformer_s12.py')
    assert cfg.model.backbone.out_indices == (1, 2, 3)
    assert cfg.model.neck.in_channels == [128, 320, 512]
    assert (cfg.model.neck.start_level, cfg.model.neck.add_extra_convs,
            cfg.model.neck.num_outs) == (0, 'on_input', 5)
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=1e-4, weight_decay=1e-4)
    _assert_coco_1x_schedule(cfg)


def test_mask_rcnn_recipe():
    cfg = Config.fromfile(f'{REPO_CONFIGS}/detection/mask_rcnn_poolformer_s12.py')
    assert cfg.model.backbone.out_indices == (0, 1, 2, 3)
    assert cfg.model.neck.in_channels == [64, 128, 320, 512] and cfg.model.neck.num_outs == 5
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=2e-4, weight_decay=1e-4)
    _assert_coco_1x_schedule(cfg)


def test_cascade_mask_rcnn_recipe_is_the_mask_rcnn_one():
    cfg = Config.fromfile(f'{REPO_CONFIGS}/detection/cascade_mask_rcnn_poolformer_s12.py')
    assert cfg.model.type == 'CascadeRCNN' and len(cfg.model.roi_head.bbox_head) == 3
    assert cfg.model.backbone.out_indices == (0, 1, 2, 3)
    assert cfg.model.neck.in_channels == [64, 128, 320, 512] and cfg.model.neck.num_outs == 5
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=2e-4, weight_decay=1e-4)
    _assert_coco_1x_schedule(cfg)


def _assert_coco_1x_schedule(cfg):
    assert cfg.train_cfg.max_epochs == 12
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.end, warmup.by_epoch) == ('LinearLR', 500, False)
    assert (steps.type, steps.milestones) == ('MultiStepLR', [8, 11])
    assert cfg.train_dataloader.batch_size == 2  # x 8 GPUs = 16
    assert cfg.auto_scale_lr.base_batch_size == 16
    assert cfg.train_pipeline[2].scale == (1333, 800)
    assert cfg.data_root == 'data/coco/'


def test_semantic_fpn_recipe():
    cfg = Config.fromfile(f'{REPO_CONFIGS}/segmentation/fpn_poolformer_m48.py')
    assert cfg.model.neck.in_channels == [96, 192, 384, 768]
    assert (cfg.model.neck.out_channels, cfg.model.neck.num_outs) == (256, 4)
    head = cfg.model.decode_head
    assert (head.channels, head.dropout_ratio, head.num_classes) == (128, 0.1, 150)
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=2e-4, weight_decay=1e-4)
    (poly, ) = cfg.param_scheduler
    assert (poly.type, poly.power, poly.eta_min, poly.end) == ('PolyLR', 0.9, 0.0, 40000)
    assert cfg.train_cfg.max_iters == 40000 and cfg.train_cfg.val_interval == 4000
    assert cfg.default_hooks.checkpoint.interval == 4000
    assert cfg.train_dataloader.batch_size == 4  # x 8 GPUs = 32
    assert cfg.crop_size == (512, 512)
    test_steps = [t.type for t in cfg.test_dataloader.dataset.pipeline]
    assert test_steps[1:3] == ['Resize', 'ResizeToMultiple']
    assert cfg.test_dataloader.dataset.pipeline[1].scale == (2048, 512)
    assert cfg.data_root == 'data/ade/ADEChallengeData2016'


def test_upernet_recipe_is_mmsegs_swin_one():
    cfg = Config.fromfile(f'{REPO_CONFIGS}/segmentation/upernet_poolformer_s36.py')
    assert cfg.model.pretrained is None and 'neck' not in cfg.model
    assert cfg.model.decode_head.in_channels == [64, 128, 320, 512]
    assert cfg.model.decode_head.in_index == [0, 1, 2, 3]
    assert (cfg.model.auxiliary_head.in_channels, cfg.model.auxiliary_head.in_index) == (320, 2)
    assert cfg.model.decode_head.num_classes == cfg.model.auxiliary_head.num_classes == 150
    optim = cfg.optim_wrapper
    assert optim.optimizer == dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01)
    assert optim.paramwise_cfg.custom_keys == dict(norm=dict(decay_mult=0.),
                                                   layer_scale=dict(decay_mult=0.))
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.end) == ('LinearLR', 1500)
    assert (poly.type, poly.power, poly.begin, poly.end) == ('PolyLR', 1.0, 1500, 160000)
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.train_dataloader.batch_size == 2  # x 8 GPUs = 16
    assert cfg.crop_size == (512, 512) and cfg.model.data_preprocessor.size == (512, 512)
    assert cfg.data_root == 'data/ade/ADEChallengeData2016'


def test_semantic_fpn_rounds_odd_test_sizes_and_predicts_full_size(build_model):
    cfg, model = _build(f'{REPO_CONFIGS}/segmentation/fpn_poolformer_s12.py', build_model)
    from mmcv.transforms import Compose
    from mmseg.registry import TRANSFORMS  # noqa: F401  (mmseg transforms are registered)
    image = (torch.rand(333, 517, 3) * 255).numpy().astype('uint8')
    label = torch.randint(0, 151, (333, 517)).numpy().astype('uint8')
    pipeline = cfg.test_dataloader.dataset.pipeline[1:3]  # resize + round to a multiple of 32
    results = Compose(pipeline)(dict(img=image, img_shape=image.shape[:2],
                                     ori_shape=image.shape[:2]))
    h, w = results['img'].shape[:2]
    assert (h % 32, w % 32) == (0, 0)
    assert h == 512  # short side 512
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(333, 517)))
    sample.gt_sem_seg = PixelData(data=torch.from_numpy(label)[None].long())
    batch = dict(inputs=[torch.from_numpy(results['img']).permute(2, 0, 1)],
                 data_samples=[sample])
    model.eval()
    with torch.no_grad():
        (prediction, ) = model.test_step(batch)
    assert tuple(prediction.pred_sem_seg.data.shape) == (1, 333, 517)
