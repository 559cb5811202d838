"""Every bad input gets one clear error that names the problem; harmless oddities just work."""
import json
import os
import os.path as osp

import cv2
import numpy as np
import pytest
import torch

from poolformer_mm.apis.inference import draw_predictions
from poolformer_mm.checkpoint_io import AtomicLocalBackend
from poolformer_mm.cli.train_test import run_testing, run_training
from poolformer_mm.datasets import make_toy_ade, make_toy_coco

TOY_RETINANET = 'configs/detection/toy/retinanet_poolformer_s12_toy.py'
TOY_FPN = 'configs/segmentation/toy/fpn_poolformer_s12_toy.py'
ONE_EPOCH = ['--cfg-options', 'train_cfg.max_epochs=1', 'train_cfg.val_interval=100',
             'default_hooks.checkpoint.interval=1', 'train_dataloader.batch_size=2']


@pytest.fixture
def coco(tmp_path):
    return make_toy_coco(str(tmp_path / 'coco'), num_train=4, num_val=2)


def _rewrite_annotations(root, split, **changes):
    path = osp.join(root, 'annotations', f'instances_{split}.json')
    with open(path) as f:
        content = json.load(f)
    content.update(changes)
    with open(path, 'w') as f:
        json.dump(content, f)


def test_annotation_file_without_images_is_refused(tmp_path, coco):
    _rewrite_annotations(coco, 'train2017', images=[], annotations=[])
    with pytest.raises(ValueError, match=r"data set '.*annotations/instances_train2017.json' has "
                       'no usable samples'):
        run_training([TOY_RETINANET, '--data-root', coco, '--work-dir', str(tmp_path / 'w'),
                      *ONE_EPOCH])


def test_annotation_file_without_annotations_is_refused_for_training(tmp_path, coco):
    _rewrite_annotations(coco, 'train2017', annotations=[])
    with pytest.raises(ValueError, match='no image has an annotation'):
        run_training([TOY_RETINANET, '--data-root', coco, '--work-dir', str(tmp_path / 'w'),
                      *ONE_EPOCH])


def test_empty_annotation_file_is_refused(tmp_path, coco):
    open(osp.join(coco, 'annotations', 'instances_train2017.json'), 'w').close()
    with pytest.raises(ValueError, match=r"annotation file '.*instances_train2017.json' is empty"):
        run_training([TOY_RETINANET, '--data-root', coco, '--work-dir', str(tmp_path / 'w'),
                      *ONE_EPOCH])


def test_missing_image_names_the_file(tmp_path, coco):
    os.remove(osp.join(coco, 'train2017', '000002.png'))
    with pytest.raises(FileNotFoundError, match='000002.png'):
        run_training([TOY_RETINANET, '--data-root', coco, '--work-dir', str(tmp_path / 'w'),
                      *ONE_EPOCH])


def test_file_that_is_not_an_image_names_the_file(tmp_path, coco):
    with open(osp.join(coco, 'train2017', '000003.png'), 'wb') as f:
        f.write(b'this is not a png')
    with pytest.raises(Exception, match='failed to load image: .*000003.png'):
        run_training([TOY_RETINANET, '--data-root', coco, '--work-dir', str(tmp_path / 'w'),
                      *ONE_EPOCH])


def test_misspelt_backbone_argument_in_a_config_suggests_the_right_one(tmp_path, coco):
    from poolformer_mm.utils.errors import UserInputError
    # a user error (the tools print its message alone) that is still the TypeError of Python
    with pytest.raises(UserInputError, match=r"'out_indice' \(did you mean 'out_indices'\?\)") \
            as error:
        run_training([TOY_RETINANET, '--data-root', coco, '--work-dir', str(tmp_path / 'w'),
                      '--cfg-options', 'model.backbone.out_indice=[1,2,3]'])
    assert isinstance(error.value, TypeError)
    # refused before the runner starts (and logs its environment and the whole config)
    assert not [p for p in (tmp_path / 'w').iterdir() if p.is_dir()]


def _checkpoint_of_untrained(build_model, config, path):
    from mmengine.config import Config
    model = build_model(Config.fromfile(config))
    model.init_weights()
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['gray', 'rgba', 'tiny', 'odd'])
def test_grayscale_rgba_tiny_and_odd_images_just_work(tmp_path, mode, build_model):
    rng = np.random.default_rng(0)
    shape = {'gray': (96, 80), 'rgba': (96, 80, 4), 'tiny': (32, 32, 3), 'odd': (333, 517, 3)}
    image = rng.integers(0, 255, shape[mode], dtype=np.uint8)
    cv2.imwrite(str(tmp_path / f'{mode}.png'), image)
    for config in (TOY_RETINANET, TOY_FPN):
        checkpoint = _checkpoint_of_untrained(build_model, config, tmp_path / 'model.pth')
        out_dir = tmp_path / osp.basename(config)
        (written, ) = draw_predictions(config, checkpoint, [str(tmp_path / f'{mode}.png')],
                                       str(out_dir), score_thr=0.0)
        assert cv2.imread(written).shape[:2] == shape[mode][:2]


def _garbage(seed: int) -> bytes:
    """Bytes that are no checkpoint; some start as a pickle, a zip or a safetensors file do, so
    that the loaders get past their first check."""
    rng = np.random.default_rng(seed)
    body = rng.integers(0, 256, int(rng.choice([1, 10, 100, 5000])), dtype=np.uint8).tobytes()
    prefix = [b'', b'\x80\x02', b'PK\x03\x04', (40).to_bytes(8, 'little') + b'{"a":'][seed % 4]
    return prefix + body


def test_garbage_files_of_every_kind_are_one_clear_error_from_the_loader(tmp_path):
    # The restricted unpickler fails on random bytes with UnpicklingError, but also with
    # IndexError, KeyError, UnicodeDecodeError ...: every one must be the same clear error.
    from poolformer_mm.checkpoint_io import load_weights_only
    from poolformer_mm.utils.errors import InvalidInputError
    path = tmp_path / 'garbage.pth'
    for seed in range(400):
        path.write_bytes(_garbage(seed))
        with pytest.raises(InvalidInputError, match="'.*garbage.pth' is not a readable|refused to "
                           "load '.*garbage.pth'"):
            load_weights_only(str(path))


def test_checkpoint_of_random_bytes_is_refused_by_test_script(tmp_path, coco):
    bad = tmp_path / 'random.pth'
    bad.write_bytes(_garbage(48))  # one whose unpickling fails with an IndexError
    with pytest.raises(ValueError, match="is not a readable PyTorch checkpoint|refused to load"):
        run_testing([TOY_RETINANET, str(bad), '--data-root', coco, '--work-dir',
                     str(tmp_path / 'w')])


class _CreatesMarker:

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


@pytest.mark.parametrize('how', ['test', 'resume'])
def test_checkpoint_whose_pickle_would_run_code_is_refused_and_nothing_runs(
        tmp_path, coco, how):
    marker = tmp_path / 'marker'
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': {'x': _CreatesMarker(str(marker))}}, evil)
    with pytest.raises(ValueError, match=r"refused to load '.*evil.pth'.*could run code"):
        if how == 'test':
            run_testing([TOY_RETINANET, str(evil), '--data-root', coco, '--work-dir',
                         str(tmp_path / 'w')])
        else:
            run_training([TOY_RETINANET, '--resume', str(evil), '--data-root', coco,
                          '--work-dir', str(tmp_path / 'w'), *ONE_EPOCH])
    assert not marker.exists()


@pytest.mark.slow
def test_nan_loss_stops_with_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path, coco):
    work_dir = str(tmp_path / 'w')
    run_training([TOY_RETINANET, '--data-root', coco, '--work-dir', work_dir, *ONE_EPOCH])
    assert osp.isfile(osp.join(work_dir, 'epoch_1.pth'))
    # std 0 turns every input into inf/NaN: the loss of the next iteration is NaN
    with pytest.raises(FloatingPointError,
                       match=r'loss became nan at iteration 3 \(epoch 2\).*last good checkpoint '
                       r'is .*epoch_1.pth'):
        run_training([TOY_RETINANET, '--data-root', coco, '--work-dir', work_dir, '--resume',
                      '--cfg-options', 'train_cfg.max_epochs=2', 'train_cfg.val_interval=100',
                      'default_hooks.checkpoint.interval=1', 'train_dataloader.batch_size=2',
                      'model.data_preprocessor.std=[0,0,0]'])
    assert not osp.exists(osp.join(work_dir, 'epoch_2.pth'))
    assert torch.load(osp.join(work_dir, 'epoch_1.pth'), weights_only=True)['meta']['epoch'] == 1


def test_interrupted_checkpoint_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    from mmengine.runner.checkpoint import save_checkpoint
    target = tmp_path / 'epoch_1.pth'
    save_checkpoint({'state_dict': {'w': torch.ones(3)}}, str(target))
    assert torch.load(target, weights_only=True)['state_dict']['w'].sum() == 3

    def killed(fd):
        raise KeyboardInterrupt('simulated kill during the write')

    monkeypatch.setattr(os, 'fsync', killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({'state_dict': {'w': torch.zeros(10_000_000)}}, str(target))
    # the old, complete file is still there, and no temporary file is left behind
    assert torch.load(target, weights_only=True)['state_dict']['w'].sum() == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ['epoch_1.pth']


def test_mmengine_writes_local_files_through_the_atomic_backend(tmp_path):
    from mmengine.fileio import get_file_backend
    assert isinstance(get_file_backend(str(tmp_path / 'x.pth')), AtomicLocalBackend)


def test_segmentation_data_root_missing_for_training(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data root '.*nowhere/' not found.*"
                       r'images/training.*annotations/training'):
        run_training([TOY_FPN, '--data-root', str(tmp_path / 'nowhere')])
    make_toy_ade(str(tmp_path / 'ade'), num_train=1, num_val=1)  # the real layout passes
