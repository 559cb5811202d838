"""mmdet's DetInferencer and mmseg's MMSegInferencer run this project's configs and checkpoints,
as users call them, and tools/infer.py draws its pictures through them."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config

from poolformer_mm.apis.inference import collect_images, draw_predictions, init_inferencer
from poolformer_mm.datasets import make_toy_ade, make_toy_coco
from poolformer_mm.utils.errors import InputNotFoundError, InvalidInputError

REPO = Path(__file__).resolve().parents[2]

TOY_RETINANET = 'configs/detection/toy/retinanet_poolformer_s12_toy.py'
TOY_MASK_RCNN = 'configs/detection/toy/mask_rcnn_poolformer_s12_toy.py'
TOY_FPN = 'configs/segmentation/toy/fpn_poolformer_s12_toy.py'
DETECTORS = [TOY_RETINANET, TOY_MASK_RCNN]
TOY_CLASSES = {TOY_RETINANET: 3, TOY_MASK_RCNN: 3, TOY_FPN: 5}


def _dataset_meta(cfg):
    """What mmengine's runner saves as ``meta['dataset_meta']``: the training set's metainfo."""
    if cfg.default_scope == 'mmdet':
        from mmdet.registry import DATASETS
    else:
        from mmseg.registry import DATASETS
    dataset = copy.deepcopy(cfg.train_dataloader.dataset)
    return DATASETS.build(dict(dataset, lazy_init=True)).metainfo


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory, build_model):
    """Untrained toy models saved as a training run saves them (weights and dataset_meta).

    An untrained RetinaNet scores every anchor about 0.01, below its test score threshold, and
    would predict nothing; a classification bias of 0 makes every anchor score 0.5, so there
    are boxes whose structure the tests can check.
    """
    folder = tmp_path_factory.mktemp('checkpoints')
    paths = {}
    torch.manual_seed(0)
    for config in (*DETECTORS, TOY_FPN):
        cfg = Config.fromfile(config)
        model = build_model(cfg)
        model.init_weights()
        state = model.state_dict()
        if config == TOY_RETINANET:
            state['bbox_head.retina_cls.bias'].zero_()
        paths[config] = str(folder / (os.path.basename(config)[:-3] + '.pth'))
        torch.save({'state_dict': state, 'meta': {'dataset_meta': _dataset_meta(cfg)}},
                   paths[config])
    return paths


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """Two toy pictures per task: one as the toy set has it, one twice as large and not square
    (the test resize halves it, so predictions must be scaled back to its own pixels)."""
    folder = tmp_path_factory.mktemp('data')
    coco = make_toy_coco(str(folder / 'coco'), num_train=1, num_val=1)
    ade = make_toy_ade(str(folder / 'ade'), num_train=1, num_val=1)
    found = {}
    for task, image in [('mmdet', f'{coco}/val2017/000001.png'),
                        ('mmseg', f'{ade}/images/validation/ADE_validation_00000001.jpg')]:
        large = cv2.resize(cv2.imread(image), None, fx=2.0, fy=1.5)
        large_path = str(folder / f'{task}_large.png')
        cv2.imwrite(large_path, large)
        found[task] = [image, large_path]
    return found


def _shape(path):
    return cv2.imread(path).shape[:2]


# ----------------------------------------------------------------------------------------------
# mmdet's DetInferencer


@pytest.fixture(scope='module')
def det_results(checkpoints, images, tmp_path_factory):
    """DetInferencer on both toy detectors, as a user calls it, with pictures in out_dir."""
    from mmdet.apis import DetInferencer
    results = {}
    for config in DETECTORS:
        inferencer = DetInferencer(model=config, weights=checkpoints[config], device='cpu',
                                   show_progress=False)
        out_dir = tmp_path_factory.mktemp('det_out')
        results[config] = (inferencer, inferencer(images['mmdet'], out_dir=str(out_dir)),
                           out_dir)
    return results


@pytest.mark.slow
@pytest.mark.parametrize('config', DETECTORS)
def test_det_inferencer_reads_the_classes_saved_with_the_weights(det_results, config):
    inferencer, _, _ = det_results[config]
    assert inferencer.model.dataset_meta['classes'] == ('circle', 'square', 'triangle')


@pytest.mark.parametrize('config', DETECTORS)
def test_det_inferencer_boxes_lie_in_the_image_with_known_labels_and_scores(
        det_results, images, config):
    _, results, _ = det_results[config]
    assert len(results['predictions']) == len(images['mmdet'])
    for image, prediction in zip(images['mmdet'], results['predictions']):
        height, width = _shape(image)
        boxes = np.array(prediction['bboxes'])
        labels, scores = np.array(prediction['labels']), np.array(prediction['scores'])
        assert len(boxes) > 0 and boxes.shape == (len(labels), 4) == (len(scores), 4)
        assert ((labels >= 0) & (labels < TOY_CLASSES[config])).all()
        assert ((scores >= 0) & (scores <= 1)).all()
        assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
        assert (boxes >= 0).all()
        assert (boxes[:, [0, 2]] <= width).all() and (boxes[:, [1, 3]] <= height).all()
    # the large image is seen at half size: boxes past that size are in its own pixels
    large = np.array(results['predictions'][1]['bboxes'])
    assert large[:, 2].max() > _shape(images['mmdet'][1])[1] / 2


def test_det_inferencer_masks_cover_the_image(det_results, images):
    from pycocotools import mask as mask_utils
    _, results, _ = det_results[TOY_MASK_RCNN]
    for image, prediction in zip(images['mmdet'], results['predictions']):
        masks = mask_utils.decode(prediction['masks'])
        assert masks.shape == (*_shape(image), len(prediction['labels']))


@pytest.mark.parametrize('config', DETECTORS)
def test_det_inferencer_draws_every_image_into_out_dir(det_results, images, config):
    _, _, out_dir = det_results[config]
    for image in images['mmdet']:
        picture = cv2.imread(str(out_dir / 'vis' / os.path.basename(image)))
        assert picture.shape[:2] == _shape(image)
        assert (picture != cv2.imread(image)).any()  # something is drawn on it


@pytest.mark.slow
@pytest.mark.parametrize('config', DETECTORS)
def test_det_inferencer_predicts_what_inference_detector_predicts(
        det_results, checkpoints, images, config):
    from mmdet.apis import inference_detector, init_detector
    model = init_detector(config, checkpoints[config], device='cpu')
    _, results, _ = det_results[config]
    for image, prediction in zip(images['mmdet'], results['predictions']):
        expected = inference_detector(model, image).pred_instances.numpy()
        np.testing.assert_allclose(prediction['bboxes'], expected.bboxes, rtol=1e-5, atol=1e-3)
        np.testing.assert_array_equal(prediction['labels'], expected.labels)
        np.testing.assert_allclose(prediction['scores'], expected.scores, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# mmseg's MMSegInferencer


@pytest.fixture(scope='module')
def seg_results(checkpoints, images, tmp_path_factory):
    from mmseg.apis import MMSegInferencer
    inferencer = MMSegInferencer(model=TOY_FPN, weights=checkpoints[TOY_FPN], device='cpu')
    out_dir = tmp_path_factory.mktemp('seg_out')
    return inferencer, inferencer(images['mmseg'], out_dir=str(out_dir)), out_dir


@pytest.mark.slow
def test_seg_inferencer_reads_the_classes_saved_with_the_weights(seg_results):
    inferencer, _, _ = seg_results
    assert inferencer.model.dataset_meta['classes'] == ('sky', 'tree', 'grass', 'water', 'road')


def test_seg_inferencer_label_map_has_the_image_size_and_known_classes(seg_results, images):
    _, results, _ = seg_results
    assert len(results['predictions']) == len(images['mmseg'])
    for image, label_map in zip(images['mmseg'], results['predictions']):
        assert label_map.shape == _shape(image)
        assert label_map.min() >= 0 and label_map.max() < TOY_CLASSES[TOY_FPN]


def test_seg_inferencer_draws_and_saves_label_maps_into_out_dir(seg_results, images):
    _, results, out_dir = seg_results
    for index, (image, label_map) in enumerate(zip(images['mmseg'], results['predictions'])):
        picture = cv2.imread(str(out_dir / 'vis' / os.path.basename(image)))
        assert picture.shape[:2] == _shape(image)
        saved = cv2.imread(str(out_dir / 'pred' / f'{index:08d}_pred.png'), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(saved, label_map)


def test_seg_inferencer_predicts_what_inference_model_predicts(seg_results, checkpoints, images):
    from mmseg.apis import inference_model, init_model
    model = init_model(TOY_FPN, checkpoints[TOY_FPN], device='cpu')
    _, results, _ = seg_results
    for image, label_map in zip(images['mmseg'], results['predictions']):
        expected = inference_model(model, image).pred_sem_seg.data[0].numpy()
        np.testing.assert_array_equal(label_map, expected)


def test_seg_inferencer_runs_the_config_a_training_saves(checkpoints, images, seg_results):
    from poolformer_mm.engine.hooks.data_checks import add_data_checks
    cfg = Config.fromfile(TOY_FPN)
    add_data_checks(cfg)  # as tools/train.py, which saves it to the work dir
    assert 'LoadCheckedAnnotations' in str(cfg.test_dataloader.dataset.pipeline)
    inferencer = init_inferencer(cfg, checkpoints[TOY_FPN])
    _, results, _ = seg_results
    label_map = inferencer(images['mmseg'][0])['predictions']
    np.testing.assert_array_equal(label_map, results['predictions'][0])


# ----------------------------------------------------------------------------------------------
# weights through the project's loader


class _WritesMarker:
    """Unpickling it creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


@pytest.mark.parametrize('config', [TOY_RETINANET, TOY_FPN])
def test_inferencers_refuse_a_checkpoint_whose_pickle_runs_code(tmp_path, config):
    from mmdet.apis import DetInferencer
    from mmseg.apis import MMSegInferencer
    marker = tmp_path / 'marker'
    checkpoint = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': {'dataset_meta': _WritesMarker(str(marker))}},
               checkpoint)
    inferencer = DetInferencer if config == TOY_RETINANET else MMSegInferencer
    with pytest.raises(ValueError, match=r"refused to load '.*evil.pth': its pickle asks for "
                       'something other than tensors'):
        inferencer(model=config, weights=str(checkpoint), device='cpu')
    assert not marker.exists()


@pytest.mark.slow
def test_config_import_alone_makes_det_inferencer_loading_safe(tmp_path):
    # a user's script imports only mmdet: the config's custom_imports brings in poolformer_mm,
    # and with it the weights-only loaders, before the inferencer reads the weights
    marker = tmp_path / 'marker'
    checkpoint = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': {'dataset_meta': _WritesMarker(str(marker))}},
               checkpoint)
    script = ('import sys\n'
              'from mmdet.apis import DetInferencer\n'
              "assert 'poolformer_mm' not in sys.modules\n"
              f"DetInferencer(model='{TOY_RETINANET}', weights='{checkpoint}', device='cpu')\n")
    result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 1
    assert f"refused to load '{checkpoint}': its pickle asks for something" in result.stderr
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# poolformer_mm.apis.inference and tools/infer.py


def test_init_inferencer_gives_the_upstream_inferencer_of_the_task(checkpoints):
    from mmdet.apis import DetInferencer
    from mmseg.apis import MMSegInferencer
    assert isinstance(init_inferencer(TOY_RETINANET, checkpoints[TOY_RETINANET]), DetInferencer)
    assert isinstance(init_inferencer(TOY_FPN, checkpoints[TOY_FPN]), MMSegInferencer)


def _folded_blocks(model):
    from poolformer_mm.models.layers.blocks import DeployPoolFormerBlock
    return sum(isinstance(module, DeployPoolFormerBlock) for module in model.backbone.modules())


@pytest.mark.slow
@pytest.mark.parametrize('config', [TOY_RETINANET, TOY_FPN])
def test_deploy_inferencer_folds_the_backbone_and_predicts_the_same(checkpoints, images, config):
    task = Config.fromfile(config).default_scope
    plain = init_inferencer(config, checkpoints[config])
    folded = init_inferencer(config, checkpoints[config], deploy=True)
    assert _folded_blocks(folded.model) == 12 and _folded_blocks(plain.model) == 0  # S12: 2+2+6+2
    image = images[task][1]
    expected = plain(image, return_datasamples=True)
    got = folded(image, return_datasamples=True)
    if task == 'mmseg':
        np.testing.assert_array_equal(got.pred_sem_seg.data, expected.pred_sem_seg.data)
    else:
        expected, got = expected['predictions'][0], got['predictions'][0]
        np.testing.assert_allclose(got.pred_instances.scores, expected.pred_instances.scores,
                                   atol=1e-4)
        np.testing.assert_allclose(got.pred_instances.bboxes, expected.pred_instances.bboxes,
                                   atol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize('config', [TOY_MASK_RCNN, TOY_FPN])
def test_pictures_land_in_out_dir_as_png_named_after_the_image(tmp_path, checkpoints, images,
                                                                config):
    task = Config.fromfile(config).default_scope
    out_dir = tmp_path / 'pictures'
    image = images[task][0]  # a JPEG for segmentation
    (written, ) = draw_predictions(config, checkpoints[config], [image], str(out_dir))
    name = os.path.splitext(os.path.basename(image))[0] + '.png'
    assert written == str(out_dir / name)
    assert os.listdir(out_dir) == [name]  # no vis/ or pred/ folders
    assert cv2.imread(written).shape == cv2.imread(image).shape


@pytest.mark.slow
def test_picture_is_the_one_the_inferencer_draws(tmp_path, checkpoints, images):
    # boxes only: mmdet jitters mask colours at random on every drawing
    image = images['mmdet'][0]
    (written, ) = draw_predictions(TOY_RETINANET, checkpoints[TOY_RETINANET], [image],
                                   str(tmp_path / 'tool'), score_thr=0.3)
    inferencer = init_inferencer(TOY_RETINANET, checkpoints[TOY_RETINANET])
    inferencer(image, out_dir=str(tmp_path / 'upstream'), pred_score_thr=0.3)
    upstream = cv2.imread(str(tmp_path / 'upstream' / 'vis' / os.path.basename(image)))
    np.testing.assert_array_equal(cv2.imread(written), upstream)


def test_missing_input_and_folder_without_images_are_refused(tmp_path):
    with pytest.raises(InputNotFoundError, match=f"input '{tmp_path / 'nothing'}' is neither an "
                       'image file nor a folder: check the path'):
        collect_images([str(tmp_path / 'nothing')])
    (tmp_path / 'notes.txt').write_text('not an image')
    with pytest.raises(InputNotFoundError, match=r'no images \(.jpg, .jpeg, .png.*\) found in '
                       f'{tmp_path}'):
        collect_images([str(tmp_path)])


def test_two_images_that_would_give_one_picture_are_refused_before_the_model_is_built(tmp_path):
    for name in ('photo.jpg', 'photo.png'):
        cv2.imwrite(str(tmp_path / name), np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(InvalidInputError, match=r"images '.*photo.jpg' and '.*photo.png' would "
                       "both be drawn to '.*out/photo.png'"):
        draw_predictions(TOY_FPN, str(tmp_path / 'no_checkpoint_needed.pth'), [str(tmp_path)],
                         str(tmp_path / 'out'))


@pytest.mark.slow
def test_infer_tool_prints_no_start_up_noise_and_errors_without_traceback(tmp_path, checkpoints,
                                                                         images):
    def infer(*args):
        return subprocess.run([sys.executable, 'tools/infer.py', *map(str, args)], cwd=REPO,
                              capture_output=True, text=True)

    result = infer(TOY_FPN, checkpoints[TOY_FPN], images['mmseg'][0], '--out-dir',
                   tmp_path / 'out')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f'wrote 1 picture to {tmp_path / "out"}/'
    assert 'Warning' not in result.stderr and 'WARNING' not in result.stdout + result.stderr
    assert os.listdir(tmp_path / 'out') == ['ADE_validation_00000001.png']

    (tmp_path / 'broken.jpg').write_bytes(b'')
    result = infer(TOY_FPN, checkpoints[TOY_FPN], tmp_path / 'broken.jpg')
    assert result.returncode == 1
    assert result.stderr == (f"error: image '{tmp_path / 'broken.jpg'}' is empty (0 bytes). "
                             'Fetch or export it again, or leave it out of the inputs.\n')
