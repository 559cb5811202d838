"""ONNX export of the toy Mask R-CNN (RPN, RoIAlign, NMS and mask head in the graph), checked in
ONNX Runtime against mmdet's ``predict``; the NumPy mask pasting against mmdet's.

Random weights saved as an mmengine checkpoint (no training), one 64x96 export with dynamic
height and width.
"""
import glob
import subprocess
import sys
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from poolformer_mm.datasets.synthetic import make_toy_coco
from poolformer_mm.deploy.onnx import build_model, export_onnx, verify_onnx
from poolformer_mm.deploy.onnx.ops import RoiAlign, roi_levels
from poolformer_mm.deploy.onnx.postprocess import paste_masks, read_deploy_info
from poolformer_mm.deploy.onnx.verify import load_input, ort_session, run_torch

pytestmark = pytest.mark.skipif(
    find_spec('onnx') is None or find_spec('onnxruntime') is None,
    reason='onnx / onnxruntime (the deploy extra: pip install -e .[deploy]) not installed')

CONFIG = 'configs/detection/toy/mask_rcnn_poolformer_s12_toy.py'
SHAPE = (64, 96)
SECOND_SHAPE = (128, 96)


@pytest.fixture(scope='module')
def image(tmp_path_factory):
    root = tmp_path_factory.mktemp('toy')
    make_toy_coco(str(root), num_train=0, num_val=1)
    return glob.glob(str(root / 'val2017/*.png'))[0]


@pytest.fixture(scope='module')
def mask_rcnn(tmp_path_factory):
    """(PyTorch model loaded from a checkpoint, the exported file)."""
    folder = tmp_path_factory.mktemp('mask_rcnn')
    torch.manual_seed(0)
    model = build_model(CONFIG)[0]
    # A fresh mask head predicts about 0.5 everywhere, right at mask_thr_binary: spread it.
    with torch.no_grad():
        model.roi_head.mask_head.conv_logits.weight.normal_(0, 0.05)
    checkpoint = str(folder / 'mask_rcnn.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, checkpoint)
    model, cfg = build_model(CONFIG, checkpoint)
    path = str(folder / 'mask_rcnn.onnx')
    export_onnx(build_model(CONFIG, checkpoint)[0], cfg, path, SHAPE, dynamic=True)
    return model, path


@pytest.mark.slow
@pytest.mark.parametrize('shape', [SHAPE, SECOND_SHAPE], ids=['export_size', 'second_size'])
def test_mask_rcnn_agrees_with_mmdet_in_onnx_runtime(mask_rcnn, image, shape):
    model, path = mask_rcnn
    result = verify_onnx(path, model, image, shape)
    assert result['shape'] == list(shape)
    assert result['detections_torch'] == 20  # the toy config's max_per_img: real boxes
    assert result['detections_onnx'] == 20 and result['unmatched'] == 0
    assert result['box_rel'] <= 1e-3 and result['score_abs'] <= 1e-4
    assert result['mask_iou'] >= 0.99
    assert result['ok']


def test_mask_rcnn_outputs_and_metadata(mask_rcnn, image):
    import onnx
    _, path = mask_rcnn
    session = ort_session(path)
    info = read_deploy_info(session.get_modelmeta().custom_metadata_map)
    assert info['outputs'] == ['dets', 'labels', 'masks']
    assert info['detection']['test_cfg'] == dict(score_thr=0.05, iou_threshold=0.5,
                                                 max_per_img=20)
    assert info['detection']['rpn_test_cfg']['max_per_img'] == 100
    assert info['detection']['mask_thr_binary'] == 0.5
    dets, labels, masks = session.run(None, {'input': load_input(image, info, SECOND_SHAPE)})
    assert dets.shape == (1, 20, 5) and labels.shape == (1, 20) and masks.shape == (1, 20, 28, 28)
    assert 0 <= masks.min() and masks.max() <= 1
    graph = onnx.load(path).graph
    assert {'NonMaxSuppression', 'RoiAlign'} <= {node.op_type for node in graph.node}
    assert {node.domain for node in graph.node} <= {'', 'ai.onnx'}
    batch, _, height, width = graph.input[0].type.tensor_type.shape.dim
    assert batch.dim_value == 1 and height.dim_param and width.dim_param


def test_paste_masks_matches_mmdet():
    from mmdet.models.roi_heads.mask_heads.fcn_mask_head import _do_paste_mask
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 1, 28, 28, generator=generator)
    # fractional corners, a box over the image border, a tiny one
    boxes = torch.tensor([[3.3, 4.7, 40.2, 30.9], [-5.0, 10.0, 20.5, 70.0], [50, 2, 95, 60],
                          [10, 10, 10.8, 11.5], [0, 0, 96, 64], [60.5, 40.25, 90, 63.9]])
    expected = _do_paste_mask(masks, boxes, 64, 96, skip_empty=False)[0] >= 0.5
    pasted = paste_masks(masks[:, 0].numpy(), boxes.numpy(), (64, 96), 0.5)
    assert pasted.shape == (6, 64, 96)
    np.testing.assert_array_equal(pasted, expected.numpy())


def test_rois_go_to_levels_by_scale_as_mmdet():
    from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor
    extractor = SingleRoIExtractor(dict(type='RoIAlign', output_size=7, sampling_ratio=0), 8,
                                   [4, 8, 16, 32])
    sides = torch.tensor([0., 10, 111.9, 112, 224, 447, 448, 2000])
    rois = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    expected = extractor.map_roi_levels(torch.cat([torch.zeros(8, 1), rois], 1), 4)
    assert roi_levels(rois, 56, 4).tolist() == expected.tolist() == [0, 0, 0, 1, 2, 2, 3, 3]


def test_onnx_roi_align_is_mmcv_aligned_roi_align(tmp_path):
    """The ONNX op with half-pixel centres, in ONNX Runtime, against mmcv's aligned=True; and
    no rois at all (a level no box goes to) gives an empty result."""
    from mmcv.ops import roi_align

    class Pool(torch.nn.Module):
        def forward(self, feats, rois):
            return RoiAlign.apply(feats, rois, torch.zeros_like(rois[:, 0]).long(), 7, 0.25, 0)

    torch.manual_seed(0)
    feats = torch.randn(1, 4, 16, 24)
    rois = torch.tensor([[3.3, 4.7, 40.2, 30.9], [0, 0, 96, 64], [50.5, 2, 52, 3]])
    path = str(tmp_path / 'roi_align.onnx')
    torch.onnx.export(Pool(), (feats, rois), path, dynamo=False, opset_version=17,
                      input_names=['feats', 'rois'], dynamic_axes={'rois': {0: 'count'}})
    session = ort_session(path)
    expected = roi_align(feats, torch.cat([torch.zeros(3, 1), rois], 1), 7, 0.25, 0, 'avg', True)
    actual = session.run(None, {'feats': feats.numpy(), 'rois': rois.numpy()})[0]
    np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-5, atol=1e-5)
    empty = session.run(None, {'feats': feats.numpy(), 'rois': np.zeros((0, 4), np.float32)})
    assert empty[0].shape == (0, 4, 7, 7)


def test_run_torch_gives_mmdet_masks_at_the_input_size(mask_rcnn, image):
    model, path = mask_rcnn
    info = read_deploy_info(ort_session(path).get_modelmeta().custom_metadata_map)
    out = run_torch(model, load_input(image, info, SHAPE), 'detection')
    assert out['masks'].shape == (20, *SHAPE) and out['masks'].dtype == bool
    assert 0 < out['masks'].sum() < out['masks'].size  # neither empty nor full: a real check


@pytest.mark.slow
def test_ort_infer_draws_masks_without_torch(mask_rcnn, image, tmp_path):
    import cv2
    picture = tmp_path / 'picture.png'
    code = ('import runpy, sys\n'
            f'sys.argv = ["ort_infer.py", {mask_rcnn[1]!r}, {image!r}, "--out", '
            f'{str(picture)!r}, "--score-thr", "0.05", "--threads", "1"]\n'
            'runpy.run_path("tools/deployment/ort_infer.py", run_name="__main__")\n'
            'print("torch imported:", "torch" in sys.modules)\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'torch imported: False' in result.stdout and '20 detections >= 0.05' in result.stdout
    drawn, original = cv2.imread(str(picture)), cv2.imread(image)
    assert drawn.shape == original.shape and (drawn != original).any()


def test_compare_fails_when_a_pasted_mask_differs():
    from poolformer_mm.deploy.onnx.verify import compare
    dets = np.array([[0, 0, 10, 10, 0.9], [20, 20, 40, 40, 0.8]], np.float32)
    labels = np.array([0, 1])
    masks = np.zeros((2, 50, 50), bool)
    masks[0, :10, :10] = masks[1, 20:40, 20:40] = True
    same = compare(dict(dets=dets, labels=labels, masks=masks),
                   dict(dets=dets, labels=labels, masks=masks), 'detection')
    assert same['mask_iou'] == 1.0 and same['ok']
    changed = masks.copy()
    changed[1, 20:22, 20:40] = False  # 40 of the 500 pixels the two masks mark
    result = compare(dict(dets=dets, labels=labels, masks=changed),
                     dict(dets=dets, labels=labels, masks=masks), 'detection')
    assert result['mask_iou'] == pytest.approx(460 / 500) and not result['ok']


@pytest.mark.slow
def test_cascade_export_module_computes_mmdet_predict():
    """The cascade's export form in PyTorch: the same boxes, scores, labels and masks as mmdet
    (the ONNX file of the full-size cascade takes too long to export for this suite; the README
    gives its figures)."""
    from mmdet.structures import DetDataSample

    from poolformer_mm.deploy.onnx.two_stage import MaskRCNNExport
    torch.manual_seed(0)
    model = build_model('configs/detection/cascade_mask_rcnn_poolformer_s12.py')[0]
    model.roi_head.test_cfg.score_thr = 0.005  # a fresh 80-class head scores about 1 / 81
    model.rpn_head.test_cfg.max_per_img = 100  # 1000 proposals through 3 stages: slow on CPU
    for head in model.roi_head.mask_head:
        with torch.no_grad():
            head.conv_logits.weight.normal_(0, 0.05)
    inputs = torch.randn(1, 3, *SHAPE)
    meta = dict(img_shape=SHAPE, ori_shape=SHAPE, pad_shape=SHAPE, batch_input_shape=SHAPE,
                scale_factor=(1., 1.))
    with torch.no_grad():
        expected = model.predict(inputs, [DetDataSample(metainfo=meta)])[0].pred_instances
        dets, labels, masks = MaskRCNNExport(model)(inputs)
    count = len(expected)
    assert 10 < count and (labels[0, count:] == -1).all()
    torch.testing.assert_close(dets[0, :count, :4], expected.bboxes)
    torch.testing.assert_close(dets[0, :count, 4], expected.scores)
    assert labels[0, :count].tolist() == expected.labels.tolist()
    pasted = paste_masks(masks[0, :count].numpy(), dets[0, :count, :4].numpy(), SHAPE)
    np.testing.assert_array_equal(pasted, expected.masks.numpy())
