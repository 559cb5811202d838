"""A damaged or missing image or label of a data set ends tools/train.py and tools/test.py with exit
code 1 and one line ``error: ...`` naming the file, with or without data loader workers."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from poolformer_mm.cli.train_test import run_training
from poolformer_mm.datasets import make_toy_ade, make_toy_coco
from poolformer_mm.utils.errors import UserInputError

REPO = Path(__file__).resolve().parents[2]

DET = 'configs/detection/toy/retinanet_poolformer_s12_toy.py'
SEG = 'configs/segmentation/toy/fpn_poolformer_s12_toy.py'
# Two iterations of two images, no validation, no checkpoint.
SHORT = {DET: ['train_cfg.max_epochs=1'], SEG: ['train_cfg.max_iters=2']}
QUIET = ['train_dataloader.batch_size=2', 'train_dataloader.persistent_workers=False',
         'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None',
         'default_hooks.checkpoint.save_last=False']


def _data_set(tmp_path, config):
    if config == DET:  # PNG images listed by a COCO annotation file
        root = make_toy_coco(str(tmp_path / 'coco'), num_train=4, num_val=1)
        return root, os.path.join(root, 'train2017', '000002.png')
    root = make_toy_ade(str(tmp_path / 'ade'), num_train=4, num_val=1)  # JPEG images, PNG labels
    return root, os.path.join(root, 'images', 'training', 'ADE_training_00000003.jpg')


def _seg_label(root, split='training', index=3):
    return os.path.join(root, 'annotations', split, f'ADE_{split}_{index:08d}.png')


def _cut_in_half(path):
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])


def _argv(tmp_path, config, root, workers):
    return [config, '--data-root', root, '--work-dir', str(tmp_path / 'w'), '--cfg-options',
            *SHORT[config], *QUIET, f'train_dataloader.num_workers={workers}']


def _train_in_a_process(tmp_path, config, root, workers=2):
    """tools/train.py as a user runs it: what reaches the terminal, also through workers."""
    return subprocess.run([sys.executable, 'tools/train.py',
                           *_argv(tmp_path, config, root, workers)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def _error_line(result, path, *words):
    assert result.returncode == 1, result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith('error: '), result.stderr
    assert f"'{path}'" in lines[0] and all(word in lines[0] for word in words), lines[0]


def _refused(tmp_path, config, root, path, *words):
    """run_training in this process (no workers) stops with a user error naming ``path``."""
    with pytest.raises(UserInputError) as error:
        run_training(_argv(tmp_path, config, root, workers=0))
    message = str(error.value)
    assert f"'{path}'" in message and all(word in message for word in words), message


@pytest.mark.slow
def test_empty_training_image_is_one_line_naming_it_through_workers(tmp_path):
    root, image = _data_set(tmp_path, DET)
    open(image, 'wb').close()
    _error_line(_train_in_a_process(tmp_path, DET, root), image, 'is empty (0 bytes)',
                'Fetch or export it again')


@pytest.mark.slow
def test_missing_segmentation_label_is_one_line_naming_it_through_workers(tmp_path):
    root, _ = _data_set(tmp_path, SEG)
    label = _seg_label(root)
    os.remove(label)
    _error_line(_train_in_a_process(tmp_path, SEG, root), label, 'not found')


@pytest.mark.slow
@pytest.mark.parametrize('config', [DET, SEG])
def test_empty_or_truncated_training_image_is_named(tmp_path, config):
    root, image = _data_set(tmp_path, config)
    open(image, 'wb').close()
    _refused(tmp_path, config, root, image, 'is empty (0 bytes)')
    root, image = _data_set(tmp_path / 'again', config)
    _cut_in_half(image)  # a PNG (detection) or a JPEG (segmentation)
    _refused(tmp_path, config, root, image, 'is truncated')


def test_image_missing_from_the_annotation_file_is_named(tmp_path):
    root, image = _data_set(tmp_path, DET)
    os.remove(image)
    _refused(tmp_path, DET, root, image, 'not found', 'remove its entry from the annotation file')


@pytest.mark.slow
@pytest.mark.parametrize('damage', ['empty', 'truncated'])
def test_damaged_segmentation_label_is_named(tmp_path, damage):
    root, _ = _data_set(tmp_path, SEG)
    label = _seg_label(root)
    {'empty': lambda path: open(path, 'wb').close(), 'truncated': _cut_in_half}[damage](label)
    _refused(tmp_path, SEG, root, label, {'empty': 'is empty', 'truncated': 'is truncated'}[damage])


@pytest.mark.slow
def test_missing_label_in_tools_test_is_one_line_naming_it(tmp_path, build_model):
    from mmengine.config import Config
    root, _ = _data_set(tmp_path, SEG)
    label = _seg_label(root, 'validation', 1)
    os.remove(label)
    checkpoint = str(tmp_path / 'model.pth')
    torch.save({'state_dict': build_model(Config.fromfile(SEG)).state_dict(), 'meta': {}},
               checkpoint)
    result = subprocess.run(
        [sys.executable, 'tools/test.py', SEG, checkpoint, '--data-root', root, '--work-dir',
         str(tmp_path / 'w'), '--cfg-options', 'test_dataloader.num_workers=2'],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    _error_line(result, label, 'not found')


@pytest.mark.parametrize('config, scope', [(DET, 'mmdet'), (SEG, 'mmseg')])
def test_configs_keep_the_upstream_image_loader_name(config, scope):
    # mmdet's and mmseg's inferencers look for 'LoadImageFromFile' in the dumped config
    from mmengine.config import Config

    from poolformer_mm.datasets.loading import LoadCheckedImageFromFile
    from poolformer_mm.engine.hooks.data_checks import add_data_checks
    cfg = Config.fromfile(config)
    add_data_checks(cfg)
    assert cfg.test_dataloader.dataset.pipeline[0]['type'] == 'LoadImageFromFile'
    assert 'poolformer_mm.datasets.loading' in cfg.custom_imports['imports']
    registry = __import__(f'{scope}.registry', fromlist=['TRANSFORMS']).TRANSFORMS
    assert registry.get('LoadImageFromFile') is LoadCheckedImageFromFile
