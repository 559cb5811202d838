"""What tools/train.py and tools/test.py turn their flags into (no training here)."""
import os.path as osp

import pytest
import torch

from poolformer_mm.cli.train_test import (
    config_for_testing,
    config_for_training,
    test_parser,
    train_parser,
)
from poolformer_mm.datasets.checks import check_data_roots

RETINANET = 'configs/detection/retinanet_poolformer_s12.py'
MASK_RCNN = 'configs/detection/mask_rcnn_poolformer_s12.py'
FPN = 'configs/segmentation/fpn_poolformer_s12.py'
TOY_RETINANET = 'configs/detection/toy/retinanet_poolformer_s12_toy.py'


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / 'model.pth'
    torch.save({'state_dict': {}}, path)
    return str(path)


@pytest.fixture
def toy_coco(tmp_path):
    from poolformer_mm.datasets import make_toy_coco
    return make_toy_coco(str(tmp_path / 'toy_coco'), num_train=2, num_val=2)


def _test_cfg(*argv):
    return config_for_testing(test_parser().parse_args(list(argv)))


def _train_cfg(*argv):
    return config_for_training(train_parser().parse_args(list(argv)))


def test_eval_bbox_segm_sets_the_coco_metrics(checkpoint, toy_coco):
    cfg = _test_cfg(MASK_RCNN, checkpoint, '--eval', 'bbox', 'segm', '--data-root', toy_coco,
                    '--cfg-options', 'test_dataloader.dataset.ann_file=annotations/'
                    'instances_val2017.json', 'test_dataloader.dataset.data_prefix.img=val2017/')
    assert cfg.test_evaluator.metric == ['bbox', 'segm']
    assert cfg.load_from == checkpoint


def test_eval_miou_sets_the_iou_metrics(checkpoint, tmp_path):
    from poolformer_mm.datasets import make_toy_ade
    root = make_toy_ade(str(tmp_path / 'ade'), num_train=1, num_val=1)
    cfg = _test_cfg(FPN, checkpoint, '--eval', 'mIoU', 'mFscore', '--data-root', root)
    assert cfg.test_evaluator.iou_metrics == ['mIoU', 'mFscore']
    assert cfg.test_dataloader.dataset.data_root == root + '/'


@pytest.mark.parametrize('config, metric, valid', [
    (RETINANET, 'mIoU', 'bbox, segm, proposal'), (FPN, 'bbox', 'mIoU, mDice, mFscore')])
def test_unknown_eval_metric_lists_the_valid_ones(checkpoint, config, metric, valid):
    with pytest.raises(ValueError, match=f"unknown --eval metric.*'{metric}'.*valid: {valid}"):
        _test_cfg(config, checkpoint, '--eval', metric)


def test_missing_coco_data_root_names_expected_files_and_the_fix():
    with pytest.raises(FileNotFoundError) as error:
        _train_cfg(RETINANET)
    message = str(error.value)
    assert message.startswith("data root 'data/coco/' not found")
    assert 'data/coco/annotations/instances_train2017.json' in message
    assert 'data/coco/train2017/' in message
    assert '--data-root DIR' in message


def test_missing_ade_data_root_names_expected_layout(checkpoint):
    with pytest.raises(FileNotFoundError) as error:
        _test_cfg(FPN, checkpoint, '--data-root', '/nonexistent/ade')
    message = str(error.value)
    assert "data root '/nonexistent/ade/' not found" in message
    assert '/nonexistent/ade/images/validation' in message
    assert '/nonexistent/ade/annotations/validation' in message


def test_data_root_override_moves_datasets_and_evaluator(toy_coco):
    cfg = _train_cfg(TOY_RETINANET, '--data-root', toy_coco)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert cfg[loader].dataset.data_root == toy_coco + '/'
    assert cfg.val_evaluator.ann_file == toy_coco + '/annotations/instances_val2017.json'
    check_data_roots(cfg)  # complete now


def test_missing_checkpoint_for_testing_is_a_clear_error(toy_coco):
    with pytest.raises(FileNotFoundError, match="checkpoint 'nope.pth' not found"):
        _test_cfg(TOY_RETINANET, 'nope.pth', '--data-root', toy_coco)


def test_amp_on_cpu_uses_bf16_autocast(toy_coco, monkeypatch):
    # --amp bf16: bf16 on any CPU (a bare --amp depends on the CPU's bf16 units)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    cfg = _train_cfg(TOY_RETINANET, '--amp', 'bf16', '--data-root', toy_coco)
    assert cfg.optim_wrapper.type == 'BF16AutocastOptimWrapper'


def test_bf16_autocast_wrapper_runs_the_forward_in_bf16():
    from mmengine.optim import build_optim_wrapper
    model = torch.nn.Linear(4, 4)
    wrapper = build_optim_wrapper(model, dict(type='BF16AutocastOptimWrapper',
                                              optimizer=dict(type='SGD', lr=0.1)))
    with wrapper.optim_context(model):
        out = model(torch.rand(2, 4))
    assert out.dtype == torch.bfloat16
    before = model.weight.detach().clone()
    wrapper.update_params(out.float().sum())
    assert not torch.equal(before, model.weight)


def test_resume_and_auto_scale_lr_flags(toy_coco, checkpoint):
    cfg = _train_cfg(TOY_RETINANET, '--resume', '--auto-scale-lr', '--data-root', toy_coco)
    assert cfg.resume is True and cfg.load_from is None
    assert cfg.auto_scale_lr.enable is True
    torch.save({'state_dict': {}, 'meta': dict(epoch=1, iter=2), 'message_hub': {}},
               checkpoint)  # the training state a run's checkpoints hold
    cfg = _train_cfg(TOY_RETINANET, '--resume', checkpoint, '--data-root', toy_coco)
    assert cfg.resume is True and cfg.load_from == checkpoint
    assert cfg.work_dir == './work_dirs/retinanet_poolformer_s12_toy'


def test_show_dir_turns_on_drawing_into_that_folder(toy_coco, checkpoint, tmp_path):
    cfg = _test_cfg(TOY_RETINANET, checkpoint, '--data-root', toy_coco, '--show-dir', 'pics')
    hook = cfg.default_hooks.visualization
    assert hook.draw is True and hook.test_out_dir == osp.abspath('pics')


def test_deploy_flag_adds_the_folding_hook(toy_coco, checkpoint):
    cfg = _test_cfg(TOY_RETINANET, checkpoint, '--data-root', toy_coco, '--deploy')
    assert dict(type='DeployBackboneHook') in cfg.custom_hooks
    plain = _test_cfg(TOY_RETINANET, checkpoint, '--data-root', toy_coco)
    assert dict(type='DeployBackboneHook') not in plain.get('custom_hooks', [])


def test_deploy_hook_folds_the_backbone_inside_wrappers_and_keeps_predictions(tta_wrapped):
    from types import SimpleNamespace

    from mmengine.logging import MMLogger

    from poolformer_mm.engine.hooks.deploy import DeployBackboneHook
    from poolformer_mm.models import PoolFormer
    from poolformer_mm.models.layers import DeployPoolFormerBlock

    class Detector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = PoolFormer('s12')

    torch.manual_seed(0)
    model = Detector().eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model.backbone(x)
        runner = SimpleNamespace(model=tta_wrapped(model), logger=MMLogger.get_current_instance())
        DeployBackboneHook().before_test(runner)
        folded = model.backbone(x)
    assert all(isinstance(b, DeployPoolFormerBlock) for s in model.backbone.stages
               for b in s.blocks)
    for a, b in zip(expected, folded):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_deploy_of_a_backbone_that_cannot_fold_is_a_clear_error():
    from poolformer_mm.deploy.fold import switch_backbone_to_deploy
    model = torch.nn.Module()
    model.backbone = torch.nn.Conv2d(3, 8, 3)
    with pytest.raises(ValueError, match='Conv2d, which has no switch_to_deploy'):
        switch_backbone_to_deploy(model)


def test_tta_wraps_the_detector(toy_coco, checkpoint):
    cfg = _test_cfg(MASK_RCNN, checkpoint, '--tta', '--data-root', toy_coco,
                    '--cfg-options', 'test_dataloader.dataset.ann_file=annotations/'
                    'instances_val2017.json', 'test_dataloader.dataset.data_prefix.img=val2017/')
    assert cfg.model.type == 'DetTTAModel' and cfg.model.module.type == 'MaskRCNN'
    assert cfg.test_dataloader.dataset.pipeline[-1].type == 'TestTimeAug'


def test_config_without_known_scope_is_refused(tmp_path, checkpoint):
    config = tmp_path / 'plain.py'
    config.write_text("model = dict(type='PoolFormer')\n")
    with pytest.raises(ValueError, match="default_scope=None; expected 'mmdet' or 'mmseg'"):
        _test_cfg(str(config), checkpoint)
