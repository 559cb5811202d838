"""What runs around an exported ONNX model: pre-processing, detection post-processing, drawing.

NumPy and OpenCV only, no torch and no import from the rest of the package:
``tools/deployment/ort_infer.py`` loads this file by its path, so that running an exported model
needs ONNX Runtime, NumPy and OpenCV alone. Everything a step needs comes from the deploy
information that :mod:`poolformer_mm.deployment.export` writes into the ONNX model's
``metadata_props`` (key :data:`METADATA_KEY`).

Detection post-processing (RetinaNet): the graph ends at the head's raw per-level outputs, and
:func:`retinanet_postprocess` does what mmdet's ``BaseDenseHead.predict_by_feat`` does with the
config's ``test_cfg``, step for step: sigmoid scores, per level the ``nms_pre`` best
(anchor, class) pairs above ``score_thr``, ``DeltaXYWHBBoxCoder`` decoding with clipping to the
image, boxes no larger than ``min_bbox_size`` dropped, per-class NMS, the ``max_per_img`` best.
"""
import json

import cv2
import numpy as np

METADATA_KEY = 'poolformer_mm.deploy'


def read_deploy_info(metadata: dict) -> dict:
    """The deploy information from an ONNX model's custom metadata (a str -> str mapping, e.g.
    ``InferenceSession.get_modelmeta().custom_metadata_map``)."""
    if METADATA_KEY not in metadata:
        raise ValueError(f'the ONNX model has no {METADATA_KEY!r} metadata: export it with '
                         'tools/deployment/pytorch2onnx.py')
    return json.loads(metadata[METADATA_KEY])


def resize_for_model(image: np.ndarray, info: dict, shape=None):
    """Resize a BGR ``image`` for the model; returns the resized image and its (h, w) scale.

    A static model takes its export size. A dynamic one takes ``shape`` (H, W) if given, or keeps
    the aspect ratio within the export size; either way rounded up to the size divisor (the
    model's inputs are multiples of it, as in the configs' test pipelines).
    """
    height, width = image.shape[:2]
    if not info['dynamic']:
        target = tuple(info['input_size'])
    elif shape is not None:
        target = tuple(shape)
    else:
        ratio = min(info['input_size'][0] / height, info['input_size'][1] / width)
        divisor = info.get('size_divisor', 1)
        target = tuple(int(np.ceil(round(side * ratio) / divisor) * divisor)
                       for side in (height, width))
    resized = cv2.resize(image, target[::-1], interpolation=cv2.INTER_LINEAR)
    return resized, (target[0] / height, target[1] / width)


def normalize(image: np.ndarray, info: dict) -> np.ndarray:
    """(H, W, 3) BGR uint8 -> (1, 3, H, W) float32, as the config's data preprocessor does."""
    pixels = image[..., ::-1] if info['to_rgb'] else image
    pixels = (pixels.astype(np.float32) - np.float32(info['mean'])) / np.float32(info['std'])
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


# ---------------------------------------------------------------------------------- detection
def grid_anchors(base_anchors: np.ndarray, stride, height: int, width: int) -> np.ndarray:
    """All anchors of one level, ordered as the head's (H, W, anchor) outputs."""
    shift_x = np.arange(width, dtype=np.float32) * np.float32(stride[0])
    shift_y = np.arange(height, dtype=np.float32) * np.float32(stride[1])
    xx, yy = np.meshgrid(shift_x, shift_y)
    shifts = np.stack([xx.ravel(), yy.ravel(), xx.ravel(), yy.ravel()], axis=1)
    return (shifts[:, None, :] + base_anchors[None]).reshape(-1, 4)


def decode_deltas(anchors: np.ndarray, deltas: np.ndarray, coder: dict, image_shape):
    """``DeltaXYWHBBoxCoder.decode``: (dx, dy, dw, dh) deltas on anchors -> clipped boxes."""
    deltas = deltas * np.float32(coder['stds']) + np.float32(coder['means'])
    centers = (anchors[:, :2] + anchors[:, 2:]) * np.float32(0.5)
    sizes = anchors[:, 2:] - anchors[:, :2]
    max_ratio = np.float32(abs(np.log(coder['wh_ratio_clip'])))
    centers = centers + sizes * deltas[:, :2]
    sizes = sizes * np.exp(np.clip(deltas[:, 2:], -max_ratio, max_ratio))
    boxes = np.concatenate([centers - sizes * np.float32(0.5),
                            centers + sizes * np.float32(0.5)], axis=1)
    if coder['clip_border']:
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, image_shape[1])
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, image_shape[0])
    return boxes


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS, best score first (mmcv's ``nms`` with ``offset=0``)."""
    order = np.argsort(-scores, kind='stable')
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        top_left = np.maximum(boxes[best, :2], boxes[rest, :2])
        bottom_right = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
        iou = inter / (areas[best] + areas[rest] - inter)
        order = rest[~(iou > iou_threshold)]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes, scores, labels, iou_threshold):
    """Per-class NMS through one NMS call on class-offset boxes, as mmcv's ``batched_nms``."""
    if not len(boxes):
        return np.zeros(0, np.int64)
    offsets = labels.astype(boxes.dtype) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def retinanet_postprocess(outputs, info: dict, image_shape):
    """Raw head outputs of one image -> ``dets`` (K, 5) x1, y1, x2, y2, score and ``labels`` (K,).

    Args:
        outputs (Sequence[np.ndarray]): the model's outputs for one image: the per-level class
            logits (A * C, H, W), then the per-level box deltas (A * 4, H, W).
        info (dict): the deploy information (:func:`read_deploy_info`).
        image_shape (tuple): (H, W) of the model's input; boxes are clipped to it.
    """
    det = info['detection']
    cfg, num_classes = det['test_cfg'], det['num_classes']
    num_levels = len(det['strides'])
    all_boxes, all_scores, all_labels = [], [], []
    for level in range(num_levels):
        logits, deltas = outputs[level], outputs[num_levels + level]
        height, width = logits.shape[-2:]
        scores = 1 / (1 + np.exp(-logits.transpose(1, 2, 0).reshape(-1, num_classes)))
        deltas = deltas.transpose(1, 2, 0).reshape(-1, 4)
        anchors = grid_anchors(np.float32(det['base_anchors'][level]), det['strides'][level],
                               height, width)
        # the nms_pre best (anchor, class) pairs above score_thr, as filter_scores_and_topk
        anchor_index, label = np.nonzero(scores > cfg['score_thr'])
        kept = scores[anchor_index, label]
        order = np.argsort(-kept, kind='stable')
        if cfg['nms_pre'] > 0:
            order = order[:cfg['nms_pre']]
        anchor_index, label = anchor_index[order], label[order]
        all_boxes.append(decode_deltas(anchors[anchor_index], deltas[anchor_index],
                                       det['bbox_coder'], image_shape))
        all_scores.append(kept[order])
        all_labels.append(label)
    boxes, scores = np.concatenate(all_boxes), np.concatenate(all_scores)
    labels = np.concatenate(all_labels)
    if cfg['min_bbox_size'] >= 0:
        sizes = boxes[:, 2:] - boxes[:, :2]
        valid = (sizes > cfg['min_bbox_size']).all(axis=1)
        boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
    keep = batched_nms(boxes, scores, labels, cfg['iou_threshold'])[:cfg['max_per_img']]
    dets = np.concatenate([boxes[keep], scores[keep, None]], axis=1).astype(np.float32)
    return dets, labels[keep].astype(np.int64)


# ---------------------------------------------------------------------------------- drawing
def _colours(count: int) -> np.ndarray:
    rng = np.random.default_rng(42)  # fixed, so a class keeps its colour between runs
    return rng.integers(40, 256, (count, 3))


def draw_segmentation(image: np.ndarray, classes: np.ndarray, info: dict,
                      opacity: float = 0.5) -> np.ndarray:
    """Blend a colour per class (the config's palette, RGB) over a BGR image of the same size."""
    palette = info.get('palette') or _colours(len(info['classes'])).tolist()
    colours = np.asarray(palette, np.uint8)[:, ::-1]  # RGB -> BGR
    overlay = colours[np.clip(classes, 0, len(colours) - 1)]
    return cv2.addWeighted(image, 1 - opacity, overlay, opacity, 0)


def draw_detections(image: np.ndarray, dets: np.ndarray, labels: np.ndarray, info: dict,
                    score_thr: float = 0.3) -> np.ndarray:
    """Boxes with class name and score for detections at or above ``score_thr``."""
    image = image.copy()
    names = info['classes']
    colours = _colours(len(names))
    for (x1, y1, x2, y2, score), label in zip(dets, labels):
        if score < score_thr:
            continue
        colour = tuple(int(c) for c in colours[label])
        cv2.rectangle(image, (int(x1), int(y1)), (int(x2), int(y2)), colour, 1)
        cv2.putText(image, f'{names[label]} {score:.2f}', (int(x1), max(int(y1) - 2, 8)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.3, colour, 1, cv2.LINE_AA)
    return image
