"""Bad data gets a clear error naming the file, or one warning line with a count, never an
obscure failure far away or silence."""
import glob
import json
import os.path as osp

import cv2
import numpy as np
import pytest
import torch

from poolformer_mm.apis.inference import draw_predictions
from poolformer_mm.cli.train_test import (
    config_for_testing,
    config_for_training,
    run_testing,
    run_training,
    train_parser,
)
from poolformer_mm.cli.train_test import test_parser as make_test_parser
from poolformer_mm.datasets import make_toy_ade, make_toy_coco
from poolformer_mm.datasets.checks import read_image_for_inference
from poolformer_mm.engine.hooks.data_checks import add_data_checks

TOY_RETINANET = 'configs/detection/toy/retinanet_poolformer_s12_toy.py'
TOY_FPN = 'configs/segmentation/toy/fpn_poolformer_s12_toy.py'
# No validation and no checkpoint: only what the tests look at.
NO_VAL_NO_CHECKPOINT = ['val_cfg=None', 'val_dataloader=None', 'val_evaluator=None',
                        'default_hooks.checkpoint.save_last=False']
# Two iterations of two images: the four training images of the toy set, each seen once.
SEG_TWO_ITERS = ['--cfg-options', 'train_cfg.max_iters=2', 'train_dataloader.batch_size=2',
                 'default_hooks.logger.interval=1', *NO_VAL_NO_CHECKPOINT]


@pytest.fixture
def ade(tmp_path):
    return make_toy_ade(str(tmp_path / 'ade'), num_train=4, num_val=1)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory, build_model):
    """Checkpoints of the untrained toy models, for tools/test.py and tools/infer.py."""
    from mmengine.config import Config
    paths = {}
    for config in (TOY_RETINANET, TOY_FPN):
        model = build_model(Config.fromfile(config))
        model.init_weights()
        paths[config] = str(tmp_path_factory.mktemp('ckpt') / 'model.pth')
        torch.save({'state_dict': model.state_dict(), 'meta': {}}, paths[config])
    return paths


def _label(root, split='training', index=4):
    return osp.join(root, 'annotations', split, f'ADE_{split}_{index:08d}.png')


def _read_label(path):
    return cv2.imread(path, cv2.IMREAD_UNCHANGED)


def _load_every_training_sample(root, work_dir):
    """What a training run's data loader does, for every sample, without building a model."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS
    cfg = config_for_training(train_parser().parse_args(
        [TOY_FPN, '--data-root', root, '--work-dir', work_dir]))
    init_default_scope('mmseg')
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    return [dataset[i] for i in range(len(dataset))]


# ----------------------------------------------------------------------------------------------
# segmentation labels


@pytest.mark.slow
def test_rgb_label_deep_in_the_data_set_is_refused_naming_the_file(tmp_path, ade):
    label = _read_label(_label(ade))
    cv2.imwrite(_label(ade), np.stack([label * 40, label * 20, label], axis=-1))
    with pytest.raises(ValueError, match=r"segmentation label '.*ADE_training_00000004.png' has 3 "
                       r'channels \(shape \(128, 160, 3\)\): expected a single-channel image of '
                       r'class indices.*colour-coded label: map each colour to its class index'):
        run_training([TOY_FPN, '--data-root', ade, '--work-dir', str(tmp_path / 'w'),
                      *SEG_TWO_ITERS])


def test_label_of_class_indices_saved_as_rgb_is_refused_with_the_simple_fix(tmp_path, ade):
    cv2.imwrite(_label(ade, index=3), cv2.cvtColor(_read_label(_label(ade, index=3)),
                                                   cv2.COLOR_GRAY2BGR))
    with pytest.raises(ValueError, match=r"label '.*ADE_training_00000003.png' has 3 channels.*"
                       r'channels are identical.*save it as a single-channel \(grayscale\) PNG'):
        _load_every_training_sample(ade, str(tmp_path / 'w'))


def test_label_of_another_size_than_its_image_is_refused_naming_both(tmp_path, ade):
    cv2.imwrite(_label(ade), _read_label(_label(ade))[:100, :120])
    with pytest.raises(ValueError, match=r"segmentation label '.*ADE_training_00000004.png' is "
                       r"100x120 \(height x width\) but its image '.*ADE_training_00000004.jpg' "
                       r'is 128x160: expected one class index per image pixel. Regenerate'):
        _load_every_training_sample(ade, str(tmp_path / 'w'))


def test_label_size_is_checked_against_the_original_image_in_test_pipelines(tmp_path, ade):
    # the test pipeline resizes the image before it loads the label: compare with ori_shape
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'')
    cfg = config_for_testing(make_test_parser().parse_args(
        [TOY_FPN, str(checkpoint), '--data-root', ade, '--work-dir', str(tmp_path / 'w')]))
    init_default_scope('mmseg')
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    assert dataset[0]['data_samples'].gt_sem_seg.shape == (128, 160)  # the good label passes
    path = _label(ade, 'validation', 1)
    cv2.imwrite(path, cv2.resize(_read_label(path), (80, 64), interpolation=cv2.INTER_NEAREST))
    with pytest.raises(ValueError, match=r"label '.*ADE_validation_00000001.png' is 64x80 .*"
                       r"image '.*ADE_validation_00000001.jpg' is 128x160"):
        dataset[0]


def test_16_bit_label_with_class_ids_over_255_is_refused_not_wrapped(tmp_path, ade):
    cv2.imwrite(_label(ade), _read_label(_label(ade)).astype(np.uint16) + 255)
    with pytest.raises(ValueError, match=r"segmentation label '.*ADE_training_00000004.png' is a "
                       r'uint16 image with values up to 260: .* would wrap around silently '
                       r'\(260 would become 4\). Expected class indices 0..255 \(255 = ignore_index'
                       r'.*save the label as an 8-bit PNG'):
        _load_every_training_sample(ade, str(tmp_path / 'w'))


@pytest.mark.parametrize('backend', ['pillow', 'cv2'])
def test_label_that_is_not_an_image_is_refused_naming_the_file(tmp_path, backend):
    from poolformer_mm.datasets.transforms import LoadCheckedAnnotations
    path = tmp_path / 'label.png'
    path.write_bytes(b'not a png')
    with pytest.raises(ValueError, match=r"segmentation label '.*label.png' could not be decoded "
                       'as an image: the file is damaged'):
        LoadCheckedAnnotations(imdecode_backend=backend)(
            dict(seg_map_path=str(path), seg_fields=[], reduce_zero_label=False))


def test_good_labels_load_exactly_as_with_mmseg(tmp_path, ade):
    from mmseg.datasets.transforms import LoadAnnotations

    from poolformer_mm.datasets.transforms import LoadCheckedAnnotations
    label = _read_label(_label(ade))
    label[:8] = 255  # ignored pixels stay ignored
    cv2.imwrite(_label(ade), label)
    cv2.imwrite(_label(ade, index=3), _read_label(_label(ade, index=3)).astype(np.uint16))
    for index in (3, 4):
        for reduce_zero_label, label_map in ((True, None), (False, {1: 2, 2: 1})):
            results = [loader(dict(seg_map_path=_label(ade, index=index), seg_fields=[],
                                   reduce_zero_label=reduce_zero_label, label_map=label_map,
                                   ori_shape=(128, 160)))['gt_seg_map']
                       for loader in (LoadAnnotations(), LoadCheckedAnnotations())]
            assert results[0].dtype == results[1].dtype == np.uint8
            np.testing.assert_array_equal(results[0], results[1])
    assert len(_load_every_training_sample(ade, str(tmp_path / 'w'))) == 4


@pytest.mark.parametrize('config', sorted(glob.glob('configs/segmentation/*.py')) + [TOY_FPN])
def test_every_segmentation_config_gets_the_checking_label_loader(config):
    from mmengine.config import Config
    cfg = Config.fromfile(config)
    add_data_checks(cfg)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        types = [t['type'] for t in cfg[loader].dataset.pipeline]
        assert 'LoadAnnotations' not in types and 'LoadCheckedAnnotations' in types, loader
    assert {'type': 'IgnoredLabelBatchHook'} in cfg.custom_hooks
    assert 'poolformer_mm.datasets.transforms' in cfg.custom_imports['imports']


def _warnings(work_dir):
    (log, ) = glob.glob(osp.join(work_dir, '*', '*.log'))
    with open(log) as f:
        return [line for line in f if ' - WARNING - ' in line]


@pytest.mark.slow
def test_batches_of_labels_ignored_everywhere_warn_once_then_count(tmp_path, ade):
    for index in range(1, 5):  # only zeros: with reduce_zero_label every pixel becomes 255
        cv2.imwrite(_label(ade, index=index), np.zeros((128, 160), np.uint8))
    work_dir = str(tmp_path / 'w')
    run_training([TOY_FPN, '--data-root', ade, '--work-dir', work_dir, *SEG_TWO_ITERS,
                  'train_cfg.max_iters=3'])
    warnings = [line for line in _warnings(work_dir) if 'ignore_index' in line]
    assert len(warnings) == 2, warnings
    assert 'iteration 1: the labels of this training batch are ignore_index (255) at every ' \
           'pixel (' in warnings[0]
    assert 'ADE_training_0000000' in warnings[0] and 'loss is 0 and its accuracy 100' in warnings[0]
    assert '3 of 3 training batches of this run had labels that were ignore_index (255) at ' \
           'every pixel (6 of 6 samples were)' in warnings[1]


# ----------------------------------------------------------------------------------------------
# COCO annotations


@pytest.mark.slow
def test_coco_annotations_mmdet_drops_are_summarised_in_one_line(tmp_path, checkpoints):
    coco = make_toy_coco(str(tmp_path / 'coco'), num_train=1, num_val=2)
    path = osp.join(coco, 'annotations', 'instances_val2017.json')
    with open(path) as f:
        content = json.load(f)
    good = content['annotations'][0]
    bad = [dict(good, category_id=99), dict(good, category_id=7), dict(good, category_id=99),
           dict(good, bbox=[10, 10, 0, 12], area=0),
           dict(good, segmentation=[[10, 10, 20, 20]])]
    for i, ann in enumerate(bad):
        ann['id'] = 1000 + i
    content['annotations'] += bad
    with open(path, 'w') as f:
        json.dump(content, f)
    work_dir = str(tmp_path / 'w')
    run_testing([TOY_RETINANET, checkpoints[TOY_RETINANET], '--data-root', coco, '--work-dir',
                 work_dir])
    warnings = [line for line in _warnings(work_dir) if 'annotation file' in line]
    assert len(warnings) == 1, warnings
    total = len(content['annotations'])
    assert (f"annotation file '{path}' ({total} annotations): 3 annotations with category ids not "
            'in its categories (ids 7, 99), 1 box of zero area (under 1 pixel wide or high, or '
            'area 0), 1 polygon of fewer than 3 points. mmdet skips these without a word'
            in warnings[0])


# ----------------------------------------------------------------------------------------------
# tools/infer.py


@pytest.mark.parametrize('config', [TOY_RETINANET, TOY_FPN])
def test_one_pixel_image_gives_a_one_pixel_picture(tmp_path, checkpoints, config):
    # the test resize scales it up like any small image; the model runs on that
    cv2.imwrite(str(tmp_path / 'dot.png'), np.full((1, 1, 3), 200, np.uint8))
    (written, ) = draw_predictions(config, checkpoints[config], [str(tmp_path / 'dot.png')],
                                   str(tmp_path / 'out'), score_thr=0.0)
    assert cv2.imread(written).shape == (1, 1, 3)


@pytest.mark.parametrize('config, shape', [(TOY_RETINANET, (10, 10000, 3)),
                                           (TOY_FPN, (10000, 10, 3))])
def test_image_too_thin_for_the_test_resize_is_refused_naming_the_file(
        tmp_path, checkpoints, config, shape):
    cv2.imwrite(str(tmp_path / 'strip.png'), np.full(shape, 128, np.uint8))
    height, width = shape[:2]
    with pytest.raises(ValueError, match=rf"image '.*strip.png' is {width}x{height} pixels "
                       r"\(width x height\), an aspect ratio of 1000:1: the config's test "
                       r'resize, Resize\(scale=.*keep_ratio=True\), squeezes it to .*too thin '
                       r'for the model, which needs 32 pixels across.*Crop or tile it into '
                       r'pieces of aspect ratio up to about [45]:1'):
        draw_predictions(config, checkpoints[config], [str(tmp_path / 'strip.png')],
                         str(tmp_path / 'out'))


def test_truncated_jpeg_is_refused_naming_the_file(tmp_path, checkpoints):
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / 'photo.jpg'), rng.integers(0, 255, (96, 128, 3), np.uint8))
    data = (tmp_path / 'photo.jpg').read_bytes()
    (tmp_path / 'photo.jpg').write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"image '.*photo.jpg' is truncated: the file ends before "
                       'its image data does.*Fetch or export it again'):
        draw_predictions(TOY_FPN, checkpoints[TOY_FPN], [str(tmp_path / 'photo.jpg')],
                         str(tmp_path / 'out'))


@pytest.mark.parametrize('content, message', [
    (b'', r'is empty \(0 bytes\)'),
    (b'not an image at all', 'could not be decoded: it is damaged or not in a format OpenCV reads'),
    ('png-cut', 'is truncated'),
])
def test_damaged_image_files_are_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / 'picture.png'
    if content == 'png-cut':
        cv2.imwrite(str(path), np.zeros((40, 40, 3), np.uint8))
        content = path.read_bytes()[:-20]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"image '.*picture.png' {message}"):
        read_image_for_inference(str(path))


# ----------------------------------------------------------------------------------------------
# --cfg-options


@pytest.mark.parametrize('make_parser, argv', [(train_parser, [TOY_FPN]),
                                               (make_test_parser, [TOY_FPN, 'model.pth'])])
def test_cfg_options_token_without_equals_is_a_usage_error_naming_it(capsys, make_parser, argv):
    with pytest.raises(SystemExit) as exit_info:
        make_parser().parse_args([*argv, '--cfg-options', 'train_cfg.max_iters=2', 'garbage'])
    assert exit_info.value.code == 2
    assert ("argument --cfg-options: expected KEY=VALUE pairs (e.g. train_cfg.max_epochs=1 "
            "model.backbone.init_cfg=None), got 'garbage' (no '=')" in capsys.readouterr().err)


def test_cfg_options_with_unbalanced_brackets_is_a_usage_error_naming_it(capsys):
    with pytest.raises(SystemExit):
        train_parser().parse_args([TOY_FPN, '--cfg-options', 'model.backbone.out_indices=[0,1'])
    assert "bad value in 'model.backbone.out_indices=[0,1'" in capsys.readouterr().err


def test_good_cfg_options_parse_as_before():
    args = train_parser().parse_args([TOY_FPN, '--cfg-options', 'a=1', 'b.c=[1,(2,3)]',
                                      'd=None', 'e=x=y'])
    assert args.cfg_options == {'a': 1, 'b.c': [1, (2, 3)], 'd': None, 'e': 'x=y'}


def test_coco_file_of_other_classes_is_refused_and_one_of_some_other_classes_warned(tmp_path):
    from poolformer_mm.engine.hooks.data_checks import coco_annotation_summary
    from poolformer_mm.utils.errors import InvalidInputError
    coco = make_toy_coco(str(tmp_path / 'coco'), num_train=0, num_val=4)
    ann_file = osp.join(coco, 'annotations', 'instances_val2017.json')
    with pytest.raises(InvalidInputError, match=r"has the categories \('circle', 'square', "
                       r"'triangle'\), none of which is among the classes of the config's data set "
                       r"\('person', 'car'\).*metainfo=dict\(classes=\('circle', 'square', "
                       r"'triangle'\)\)"):
        coco_annotation_summary(ann_file, ['person', 'car'])
    with open(ann_file) as f:
        squares = sum(a['category_id'] == 2 for a in json.load(f)['annotations'])
    summary = coco_annotation_summary(ann_file, ('circle', 'triangle'))
    assert f"{squares} annotation{'s' if squares != 1 else ''} of categories the config's " \
        'classes do not name (square)' in summary
    assert coco_annotation_summary(ann_file, ('circle', 'square', 'triangle')) is None
