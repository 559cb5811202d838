"""A damaged or missing image or label of a data set ends tools/train.py and tools/test.py with exit
code 1 and one line ``error: ...`` naming the file, with or without data loader workers."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, build_model_of

from poolformer_mm.datasets import make_toy_ade, make_toy_coco

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
        return root, os.path.join(root, 'train', '000002.png')
    root = make_toy_ade(str(tmp_path / 'ade'), num_train=4, num_val=1)  # JPEG images, PNG labels
    return root, os.path.join(root, 'images', 'training', 'ADE_training_00000003.jpg')


def _seg_label(root, split='training', index=3):
    return os.path.join(root, 'annotations', split, f'ADE_{split}_{index:08d}.png')


def _cut_in_half(path):
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])


def _train(tmp_path, config, root, workers):
    return subprocess.run(
        [sys.executable, 'tools/train.py', config, '--data-root', root, '--work-dir',
         str(tmp_path / 'w'), '--cfg-options', *SHORT[config], *QUIET,
         f'train_dataloader.num_workers={workers}'],
        cwd=REPO, capture_output=True, text=True, timeout=300)


def _error_line(result, path, *words):
    assert result.returncode == 1, result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith('error: '), result.stderr
    assert f"'{path}'" in lines[0] and all(word in lines[0] for word in words), lines[0]


@pytest.mark.slow
@pytest.mark.parametrize('config, workers', [(DET, 0), (SEG, 2)])
def test_empty_training_image_is_named(tmp_path, config, workers):
    root, image = _data_set(tmp_path, config)
    open(image, 'wb').close()
    _error_line(_train(tmp_path, config, root, workers), image, 'is empty (0 bytes)',
                'Fetch or export it again')


@pytest.mark.slow
@pytest.mark.parametrize('config, workers', [(DET, 2), (SEG, 0)])
def test_truncated_training_image_is_named(tmp_path, config, workers):
    root, image = _data_set(tmp_path, config)
    _cut_in_half(image)  # a PNG (detection) or a JPEG (segmentation)
    _error_line(_train(tmp_path, config, root, workers), image, 'is truncated')


@pytest.mark.slow
@pytest.mark.parametrize('workers', [0, 2])
def test_image_missing_from_the_annotation_file_is_named(tmp_path, workers):
    root, image = _data_set(tmp_path, DET)
    os.remove(image)
    _error_line(_train(tmp_path, DET, root, workers), image, 'not found',
                'remove its entry from the annotation file')


@pytest.mark.slow
@pytest.mark.parametrize('damage, workers', [('missing', 2), ('empty', 0), ('truncated', 2)])
def test_missing_or_damaged_segmentation_label_is_named(tmp_path, damage, workers):
    root, _ = _data_set(tmp_path, SEG)
    label = _seg_label(root)
    {'missing': os.remove, 'empty': lambda path: open(path, 'wb').close(),
     'truncated': _cut_in_half}[damage](label)
    word = {'missing': 'not found', 'empty': 'is empty', 'truncated': 'is truncated'}[damage]
    _error_line(_train(tmp_path, SEG, root, workers), label, word)


@pytest.mark.slow
def test_missing_label_in_tools_test_is_named(tmp_path):
    from mmengine.config import Config
    root, _ = _data_set(tmp_path, SEG)
    label = _seg_label(root, 'validation', 1)
    os.remove(label)
    checkpoint = str(tmp_path / 'model.pth')
    torch.save({'state_dict': build_model_of(Config.fromfile(SEG)).state_dict(), 'meta': {}},
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

    from poolformer_mm.apis.data_checks import add_data_checks
    from poolformer_mm.datasets.loading import LoadCheckedImageFromFile
    cfg = Config.fromfile(config)
    add_data_checks(cfg)
    assert cfg.test_dataloader.dataset.pipeline[0]['type'] == 'LoadImageFromFile'
    assert 'poolformer_mm.datasets.loading' in cfg.custom_imports['imports']
    registry = __import__(f'{scope}.registry', fromlist=['TRANSFORMS']).TRANSFORMS
    assert registry.get('LoadImageFromFile') is LoadCheckedImageFromFile
