"""--amp on a CPU: BF16AutocastOptimWrapper trains every toy model, two-stage detectors included
(mmcv's CPU NMS and RoIAlign take fp32 only)."""
import pytest
import torch
from mmengine.config import Config

from poolformer_mm.engine.optim_wrapper import BF16AutocastOptimWrapper

SIZE = 128


@pytest.mark.parametrize('config', ['configs/detection/toy/mask_rcnn_poolformer_s12_toy.py',
                                    'configs/detection/cascade_mask_rcnn_poolformer_s12.py',
                                    'configs/detection/toy/retinanet_poolformer_s12_toy.py'])
def test_bf16_training_step_of_a_detector_runs_and_matches_fp32(config, build_model,
                                                                detection_samples):
    torch.manual_seed(0)
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None  # (nothing downloads)
    model = build_model(cfg)
    model.init_weights()
    model.train()
    images = [torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8) for _ in range(2)]
    losses = {}
    for name, wrapper in (('fp32', None), ('bf16', BF16AutocastOptimWrapper(
            torch.optim.SGD(model.parameters(), lr=0.0)))):
        torch.manual_seed(1)  # the same proposals sampled
        data = model.data_preprocessor(dict(inputs=images, data_samples=detection_samples(SIZE)),
                                       True)
        if wrapper is None:
            losses[name] = model.parse_losses(model(**data, mode='loss'))[1]
        else:
            with wrapper.optim_context(model):
                losses[name] = model.parse_losses(model(**data, mode='loss'))[1]
    assert losses['bf16'].keys() == losses['fp32'].keys()
    for key, value in losses['fp32'].items():
        assert torch.isfinite(losses['bf16'][key]), key
        # (the R-CNN losses depend on which proposals rounding lets through)
        if key.startswith('loss_rpn' if 'mask_rcnn' in config else 'loss'):
            assert losses['bf16'][key].item() == pytest.approx(value.item(), rel=0.05), key
    # the hooks that keep proposals and feature maps in fp32 last only for the step
    assert all(not module._forward_hooks for module in model.modules())
