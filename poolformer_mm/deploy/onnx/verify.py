"""Compare an exported model in ONNX Runtime, within :data:`TOLERANCES`, with the PyTorch model's
``predict`` (backbone not folded) on the same input: folding, export and post-processing; and
:func:`onnx_variants`, an export checked against its config, to time beside PyTorch.
"""
import copy
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn
from mmdet.evaluation.functional import bbox_overlaps
from mmdet.structures import DetDataSample

from ...utils.errors import InputNotFoundError
from ..fold import switch_backbone_to_deploy
from . import export as onnx_export
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
            iou = bbox_overlaps(theirs[:, :4], ours[:, :4])
            iou[torch_out['labels'][:, None] != onnx_out['labels'][None]] = -1
            match = iou.argmax(axis=1)
            matched = iou[np.arange(len(theirs)), match] > 0.5
            stats['unmatched'] = int((~matched).sum()) + len(ours) - len(set(match[matched]))
        if matched.any():
            pairs_theirs, pairs_ours = theirs[matched], ours[match[matched]]
            box_diff = np.abs(pairs_ours[:, :4] - pairs_theirs[:, :4])
            stats['box_rel'] = float((box_diff / np.maximum(np.abs(pairs_theirs[:, :4]), 1)).max())
            stats['score_abs'] = float(np.abs(pairs_ours[:, 4] - pairs_theirs[:, 4]).max())
        if 'masks' in torch_out:
            # pixels both mark / pixels either marks, over all matched detections
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
    """The figures of :func:`compare` of ``onnx_path`` in ONNX Runtime and ``model`` (PyTorch,
    not folded) on an image, and the input ``shape`` (for a dynamic model: as given, or the
    export size keeping the image's aspect ratio)."""
    session = ort_session(onnx_path)
    info = session_deploy_info(session)
    inputs = load_input(image_path, info, shape)
    outputs = dict(zip(info['outputs'], session.run(None, {'input': inputs})))
    if info['task'] == 'detection':
        outputs = detections_of(outputs, info, inputs.shape[2:])
    result = compare(outputs, run_torch(model, inputs, info['task']), info['task'])
    return dict(result, shape=list(inputs.shape[2:]))


class OnnxRuntimeModel(nn.Module):
    """An ONNX Runtime CPU session called like a module, not busy-waiting (which would slow the
    variant timed next) after a run; returns its outputs as tensors."""

    def __init__(self, path, threads=None):
        super().__init__()
        self.session = ort_session(path, threads, spinning=False)

    def forward(self, inputs):
        return tuple(map(torch.from_numpy, self.session.run(None, {'input': inputs.numpy()})))


def onnx_variants(config, onnx_path, checkpoint=None, threads=None, batch=1, shape=None):
    """The export as 'eager' (the config's model), 'deploy' (folded) and 'onnxruntime' (the file,
    its ``input_size`` its own or ``shape``), checked to be one network that takes ``batch``."""
    try:
        runtime = OnnxRuntimeModel(onnx_path, threads)
    except Exception as error:  # onnxruntime's own classes: InvalidProtobuf, Fail, ...
        raise ValueError(f"--onnx {onnx_path}: ONNX Runtime cannot load it ({error}); give a "
                         'file written by tools/deployment/pytorch2onnx.py') from error
    try:  # the timings rely on its task, outputs and sizes
        runtime.info = info = session_deploy_info(runtime.session)
    except ValueError as error:
        raise ValueError(f'--onnx {onnx_path}: {error}') from error
    model = onnx_export.build_model(config, checkpoint)[0]
    task = 'segmentation' if hasattr(model, 'decode_head') else 'detection'
    if info['task'] != task:
        raise ValueError(f'--onnx {onnx_path} was exported from a {info["task"]} model, and '
                         f'{config} builds a {task} model ({type(model).__name__}); give the '
                         'config it was exported from')
    if info.get('model_digest') != onnx_export.model_digest(model):
        why = (f'and {config} builds a model with other layers (arch, classes or heads); give '
               'the config it was exported from (and --checkpoint, the weights it was exported '
               'with)' if 'model_digest' in info else 'before 0.2.0 (no digest of its layers '
               'to check against the config); export it again')
        raise ValueError(f"--onnx {onnx_path} was exported from {info.get('config', '?')}, {why}")
    exported, _, height, width = runtime.session.get_inputs()[0].shape
    if isinstance(exported, int) and exported != batch:
        why = ('its export takes one image at a time, also with --dynamic' if info.get('dynamic')
               else 'exported without a dynamic batch axis')
        raise ValueError(f'--onnx {onnx_path} takes batches of {exported} ({why}); use --batch '
                         f'{exported}')
    if isinstance(height, int) and shape and [height, width] != (shape * 2)[:2]:
        raise ValueError(f'--onnx {onnx_path} was exported for {height}x{width} inputs only; '
                         'leave out --shape, or export with --dynamic')
    if not isinstance(height, int):
        height, width = (shape * 2)[:2] if shape else info['input_size']
    if height % info['size_divisor'] or width % info['size_divisor']:
        raise ValueError(f'--shape {height} {width}: --onnx {onnx_path} takes sides that are '
                         f"multiples of {info['size_divisor']} (the size divisor of its config)")
    runtime.input_size = height, width
    deploy = copy.deepcopy(model)
    switch_backbone_to_deploy(deploy)
    wrap = (onnx_export.SegmentorExport if task == 'segmentation' else
            onnx_export.MaskRCNNExport if 'masks' in info['outputs'] else
            onnx_export.SingleStageDetectorExport)
    logits = ('logits' in info['outputs'], ) if task == 'segmentation' else ()
    return dict(eager=wrap(model, *logits).eval(), deploy=wrap(deploy, *logits).eval(),
                onnxruntime=runtime)
