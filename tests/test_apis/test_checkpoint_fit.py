"""tools/test.py and tools/infer.py refuse a checkpoint that does not fit the config's model."""
import pytest
import torch
from mmengine.config import Config

from poolformer_mm.apis.inference import draw_predictions
from poolformer_mm.cli.train_test import run_testing
from poolformer_mm.datasets import make_toy_ade, make_toy_coco
from poolformer_mm.models import PoolFormer
from poolformer_mm.models.checkpoint_fit import checkpoint_mismatches

TOY_RETINANET = 'configs/detection/toy/retinanet_poolformer_s12_toy.py'
TOY_FPN = 'configs/segmentation/toy/fpn_poolformer_s12_toy.py'


def _prefixed(module, prefix):
    return {f'{prefix}.{k}': v for k, v in module.state_dict().items()}


def test_backbone_of_another_depth_is_named_with_its_block_counts():
    s12 = _prefixed(PoolFormer('s12'), 'backbone')
    s24 = _prefixed(PoolFormer('s24'), 'backbone')
    assert checkpoint_mismatches(s12, s24) == [
        'backbone: checkpoint has 4/4/12/4 blocks, the config builds 2/2/6/2']


def test_backbone_of_another_width_names_a_tensor_and_both_shapes():
    (problem, ) = checkpoint_mismatches(_prefixed(PoolFormer('s12'), 'backbone'),
                                        _prefixed(PoolFormer('m36'), 'backbone'))
    assert problem.startswith('backbone: checkpoint has 6/6/18/6 blocks')
    s12 = _prefixed(PoolFormer('s12'), 'backbone')
    stem = next(k for k, v in s12.items() if k.startswith('backbone.stem.') and v.ndim == 4)
    wide = dict(s12, **{stem: torch.zeros(128, 3, 7, 7)})
    assert checkpoint_mismatches(s12, wide) == [
        f'backbone: 1 tensor of another shape, e.g. {stem} (128, 3, 7, 7) in the checkpoint, '
        '(64, 3, 7, 7) in the model']


def test_parts_of_another_task_are_named():
    model = {'backbone.w': torch.zeros(1), 'bbox_head.cls.weight': torch.zeros(1)}
    checkpoint = {'backbone.w': torch.zeros(1), 'decode_head.conv_seg.weight': torch.zeros(1)}
    assert checkpoint_mismatches(model, checkpoint) == [
        'bbox_head: the config builds it, the checkpoint has no bbox_head',
        'decode_head: the checkpoint has a decode_head, the config builds none']


def test_batchnorm_counters_are_tolerated_both_ways():
    model = {'neck.bn.weight': torch.zeros(2), 'neck.bn.num_batches_tracked': torch.tensor(0)}
    old_checkpoint = {'neck.bn.weight': torch.zeros(2)}
    assert checkpoint_mismatches(model, old_checkpoint) == []
    assert checkpoint_mismatches(old_checkpoint, model) == []


@pytest.fixture(scope='module')
def toy_coco(tmp_path_factory):
    return make_toy_coco(str(tmp_path_factory.mktemp('data') / 'coco'), num_train=2, num_val=2)


def _saved_model(build_model, config, path, **changes):
    """An untrained model of ``config`` (with ``changes`` to its model dict), saved as mmengine
    does, plus an EMA copy as mmengine's EMAHook stores it."""
    cfg = Config.fromfile(config)
    cfg.merge_from_dict({f'model.{key}': value for key, value in changes.items()})
    model = build_model(cfg)
    state = model.state_dict()
    torch.save(dict(meta=dict(iter=1), state_dict=state,
                    ema_state_dict={f'module.{k}': v for k, v in state.items()}), path)
    return str(path)


def test_tools_test_refuses_an_s24_checkpoint_on_the_s12_config(tmp_path, toy_coco,
                                                                build_model):
    checkpoint = _saved_model(build_model, TOY_RETINANET, tmp_path / 's24.pth',
                              **{'backbone.arch': 's24'})
    with pytest.raises(ValueError) as err:
        run_testing([TOY_RETINANET, checkpoint, '--data-root', toy_coco,
                     '--work-dir', str(tmp_path / 'w')])
    message = str(err.value)
    assert f"checkpoint '{checkpoint}' does not fit the model of '{TOY_RETINANET}'" in message
    assert 'backbone: checkpoint has 4/4/12/4 blocks, the config builds 2/2/6/2' in message
    assert 'Test metrics' not in message


@pytest.mark.slow
def test_tools_test_refuses_a_segmentor_checkpoint_on_a_detector_config(tmp_path, toy_coco,
                                                                        build_model):
    checkpoint = _saved_model(build_model, TOY_FPN, tmp_path / 'fpn.pth')
    with pytest.raises(ValueError, match='bbox_head: the config builds it, the checkpoint has no '
                       'bbox_head'):
        run_testing([TOY_RETINANET, checkpoint, '--data-root', toy_coco,
                     '--work-dir', str(tmp_path / 'w')])


@pytest.mark.slow
def test_tools_test_accepts_its_own_checkpoint_with_an_ema_copy(tmp_path, toy_coco, build_model):
    checkpoint = _saved_model(build_model, TOY_RETINANET, tmp_path / 's12.pth')
    metrics = run_testing([TOY_RETINANET, checkpoint, '--data-root', toy_coco,
                           '--work-dir', str(tmp_path / 'w'), '--eval', 'bbox'])
    assert 'coco/bbox_mAP' in metrics


@pytest.mark.slow
def test_infer_refuses_a_checkpoint_of_another_arch(tmp_path, build_model):
    ade = make_toy_ade(str(tmp_path / 'ade'), num_train=1, num_val=1)
    checkpoint = _saved_model(build_model, TOY_FPN, tmp_path / 'fpn_s24.pth',
                              **{'backbone.arch': 's24'})
    with pytest.raises(ValueError, match='backbone: checkpoint has 4/4/12/4 blocks, the config '
                       'builds 2/2/6/2'):
        draw_predictions(TOY_FPN, checkpoint, [f'{ade}/images/validation'],
                         str(tmp_path / 'out'))
    assert not (tmp_path / 'out').exists()


def test_checkpoint_with_the_old_parameter_names_still_fits(tmp_path):
    from test_checkpoint_naming import to_old_names

    from poolformer_mm.models.checkpoint_fit import check_checkpoint_fits

    class Detector(torch.nn.Module):

        def __init__(self):
            super().__init__()
            self.backbone = PoolFormer('s12')

    model = Detector()
    old = to_old_names(model.backbone.state_dict(), 'poolformer_s12')
    assert 'stem.proj.weight' in old  # the old naming, as checkpoints before the rename have it
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in old.items()}}, tmp_path / 'old.pth')
    check_checkpoint_fits(model, str(tmp_path / 'old.pth'))
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in old.items()
                               if not k.startswith('stem.')}}, tmp_path / 'no_stem.pth')
    with pytest.raises(ValueError, match=r'backbone: 2 missing, e.g. backbone\.stem\.conv\.'):
        check_checkpoint_fits(model, str(tmp_path / 'no_stem.pth'))


def test_a_folded_checkpoint_is_named_as_such(tmp_path):
    from poolformer_mm.models.checkpoint_fit import check_checkpoint_fits

    class Detector(torch.nn.Module):

        def __init__(self):
            super().__init__()
            self.backbone = PoolFormer('s12')

    folded = Detector().eval()
    folded.backbone.switch_to_deploy()
    torch.save({'state_dict': folded.state_dict()}, tmp_path / 'folded.pth')
    with pytest.raises(ValueError, match=r"holds a model folded for inference \(keys such as "
                       r"'backbone\.stages\.0\.blocks\.0\.fc1_weight'.*test the checkpoint "
                       r'written by training instead'):
        check_checkpoint_fits(Detector(), str(tmp_path / 'folded.pth'))
