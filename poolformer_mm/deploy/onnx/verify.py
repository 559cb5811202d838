"""Run an exported model in ONNX Runtime and compare it, within :data:`TOLERANCES`, with the
PyTorch model as mmseg / mmdet run it (``model.predict``, backbone not folded) on the same
normalised input: the check covers the folding, the export and the NumPy post-processing.
"""
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn
from mmdet.structures import DetDataSample

from ...utils.errors import InputNotFoundError
from .postprocess import detections_of, normalize, resize_for_model, session_deploy_info

TOLERANCES = dict(pixel_agreement=0.999, logits_rel=1e-4, box_rel=1e-3, score_abs=1e-4,
                  mask_iou=0.99)


def ort_session(path: str, threads: Optional[int] = None, spinning: bool = True):
    """A CPU ONNX Runtime session for ``path``; ``spinning=False`` stops its threads from
    busy-waiting after each run, which would take the CPU from whatever runs next."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def load_input(image_path: str, info: dict, shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """The model's normalised (1, 3, H, W) input for an image file."""
    image = cv2.imread(image_path, cv2.IMREAD_COLOR)
    if image is None:
        raise InputNotFoundError(f"image '{image_path}' cannot be read")
    return normalize(resize_for_model(image, info, shape)[0], info)


def run_torch(model: nn.Module, inputs: np.ndarray, task: str) -> dict:
    """The PyTorch model's prediction for image 0, in the ONNX model's layout."""
    x = torch.from_numpy(inputs)
    with torch.no_grad():
        if task == 'segmentation':
            sample = model.predict(x)[0]
            return dict(output=sample.pred_sem_seg.data[None].numpy(),
                        logits=sample.seg_logits.data[None].numpy())
        shape = tuple(x.shape[2:])
        sample = DetDataSample(metainfo=dict(img_shape=shape, ori_shape=shape, pad_shape=shape,
                                             batch_input_shape=shape, scale_factor=(1., 1.)))
        result = model.predict(x, [sample], rescale=False)[0].pred_instances
    dets = torch.cat([result.bboxes, result.scores[:, None]], dim=1)
    out = dict(dets=dets.numpy(), labels=result.labels.numpy())
    if 'masks' in result:
        out['masks'] = result.masks.numpy().astype(bool)
    return out


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area = lambda boxes: np.prod(boxes[:, 2:4] - boxes[:, :2], axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)


def compare(onnx_out: dict, torch_out: dict, task: str) -> dict:
    """Agreement figures and whether they are within :data:`TOLERANCES` (key ``ok``)."""
    ok = True
    if task == 'segmentation':
        stats = dict(pixel_agreement=float((onnx_out['output'] == torch_out['output']).mean()))
        if 'logits' in onnx_out:
            diff = np.abs(onnx_out['logits'] - torch_out['logits']).max()
            stats['logits_rel'] = float(diff / max(np.abs(torch_out['logits']).max(), 1e-12))
    else:
        ours, theirs = onnx_out['dets'], torch_out['dets']
        # while one side has none, every detection of the other is unmatched
        stats = dict(detections_onnx=len(ours), detections_torch=len(theirs), box_rel=0.0,
                     score_abs=0.0, unmatched=len(ours) + len(theirs))
        match, matched = np.zeros(len(theirs), int), np.zeros(len(theirs), bool)
        if len(ours) and len(theirs):
            # pair each PyTorch detection with the best-overlapping ONNX one of the same class
            iou = _box_iou(theirs, ours)
            iou[torch_out['labels'][:, None] != onnx_out['labels'][None]] = -1
            match = iou.argmax(axis=1)
            matched = iou[np.arange(len(theirs)), match] > 0.5
            stats['unmatched'] = int((~matched).sum()) + len(ours) - len(set(match[matched]))
        if matched.any():
            pairs_theirs, pairs_ours = theirs[matched], ours[match[matched]]
            box_diff = np.abs(pairs_ours[:, :4] - pairs_theirs[:, :4])
            stats['box_rel'] = float(
                (box_diff / np.maximum(np.abs(pairs_theirs[:, :4]), 1.0)).max())
            stats['score_abs'] = float(np.abs(pairs_ours[:, 4] - pairs_theirs[:, 4]).max())
        if 'masks' in torch_out:
            # over all matched detections: pixels both mark / pixels either marks (the
            # background, which would dominate an agreement over the whole image, left out)
            mine, reference = onnx_out['masks'][match[matched]], torch_out['masks'][matched]
            union = np.logical_or(mine, reference).sum()
            stats['mask_iou'] = float(np.logical_and(mine, reference).sum() / union if union
                                      else 1.0)
        ok = len(ours) == len(theirs) and stats['unmatched'] == 0
    # agreements must reach their tolerance, differences must not exceed theirs
    return dict(stats, ok=bool(ok and all(
        stats[key] >= limit if key in ('pixel_agreement', 'mask_iou') else stats[key] <= limit
        for key, limit in TOLERANCES.items() if key in stats)))


def verify_onnx(onnx_path: str, model: nn.Module, image_path: str,
                shape: Optional[Sequence[int]] = None) -> dict:
    """Compare ``onnx_path`` in ONNX Runtime with ``model`` (PyTorch, not folded) on an image.

    Args:
        shape (Sequence[int], optional): (H, W) input size for a dynamic model; default: the
            export size keeping the image's aspect ratio.

    Returns:
        dict: the figures of :func:`compare` and the input ``shape``.
    """
    session = ort_session(onnx_path)
    info = session_deploy_info(session)
    inputs = load_input(image_path, info, shape)
    outputs = dict(zip(info['outputs'], session.run(None, {'input': inputs})))
    if info['task'] == 'detection':
        outputs = detections_of(outputs, info, inputs.shape[2:])
    result = compare(outputs, run_torch(model, inputs, info['task']), info['task'])
    return dict(result, shape=list(inputs.shape[2:]))
