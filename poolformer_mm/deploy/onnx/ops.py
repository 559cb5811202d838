"""Detection post-processing written for an ONNX graph: anchors, box decoding, NMS, RoIAlign.

Each computes what mmdet computes and traces to standard ONNX ops that follow the input size
(NMS, RoIAlign: mmcv's kernels, whose ``symbolic`` writes the standard op). Candidates that must
not reach NMS keep their place with the score :data:`SKIP_SCORE`, which NMS ignores.
"""
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from mmcv.ops import nms, roi_align
from torch import Tensor

SKIP_SCORE = -1.0
SKIP_THRESHOLD = -0.5


class NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` (corner boxes): boxes (N, B, 4), scores (N, C, B) ->
    selected (S, 3) int64 rows (image, class, box), best first, at most ``max_per_class`` per
    image and class."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float,
                score_threshold: float) -> Tensor:
        selected = []
        for image in range(scores.shape[0]):
            for cls in range(scores.shape[1]):
                candidates = (scores[image, cls] > score_threshold).nonzero()[:, 0]
                if not len(candidates):
                    continue
                # mmcv's nms (no +1 in widths) returns the kept boxes best first, as ONNX does
                _, keep = nms(boxes[image, candidates], scores[image, cls, candidates],
                              iou_threshold)
                keep = candidates[keep[:max_per_class]]
                selected.append(torch.stack(
                    [torch.full_like(keep, image), torch.full_like(keep, cls), keep], dim=1))
        return torch.cat(selected) if selected else boxes.new_zeros((0, 3), dtype=torch.long)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class, iou_threshold, score_threshold):
        constant = lambda value, dtype: g.op(  # noqa: E731
            'Constant', value_t=torch.tensor([value], dtype=dtype))
        return g.op('NonMaxSuppression', boxes, scores, constant(max_per_class, torch.long),
                    constant(iou_threshold, torch.float), constant(score_threshold, torch.float))


class RoiAlign(torch.autograd.Function):
    """ONNX ``RoiAlign`` (average, half-pixel centres), mmcv's ``aligned=True``: feats
    (N, C, H, W), rois (R, 4) in input pixels, image index of each roi (R,) -> (R, C, s, s)."""

    @staticmethod
    def forward(ctx, feats: Tensor, rois: Tensor, image_index: Tensor, output_size: int,
                spatial_scale: float, sampling_ratio: int) -> Tensor:
        if not len(rois):
            return feats.new_zeros((0, feats.shape[1], output_size, output_size))
        rois = torch.cat([image_index[:, None].to(rois.dtype), rois], dim=1)
        # mmcv's CPU kernel reads the map as contiguous NCHW whatever its strides
        return roi_align(feats.contiguous(), rois, output_size, spatial_scale, sampling_ratio,
                         'avg', True)

    @staticmethod
    def symbolic(g, feats, rois, image_index, output_size, spatial_scale, sampling_ratio):
        return g.op('RoiAlign', feats, rois, image_index,
                    coordinate_transformation_mode_s='half_pixel', mode_s='avg',
                    output_height_i=output_size, output_width_i=output_size,
                    sampling_ratio_i=sampling_ratio, spatial_scale_f=spatial_scale)


def image_size_xyxy(image: Tensor) -> Tensor:
    """(W, H, W, H) of an (N, C, H, W) tensor as floats, traced from its shape."""
    return torch._shape_as_tensor(image)[2:].to(torch.float32)[[1, 0, 1, 0]]


def grid_anchors(base_anchors: Tensor, stride: Sequence[float], feat: Tensor) -> Tensor:
    """The anchors of one level, (H * W * A, 4), in the order of a head's (H, W, A) outputs
    (mmdet's ``AnchorGenerator.single_level_grid_priors``), for the map's traced size."""
    shift_x = torch.arange(feat.shape[3], dtype=torch.float32) * stride[0]
    shift_y = torch.arange(feat.shape[2], dtype=torch.float32) * stride[1]
    yy, xx = torch.meshgrid(shift_y, shift_x, indexing='ij')
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    shifts = torch.stack([xx, yy, xx, yy], dim=1)
    return (shifts[:, None, :] + base_anchors.to(torch.float32)[None]).reshape(-1, 4)


def decode_boxes(coder, priors: Tensor, deltas: Tensor, max_xyxy: Tensor) -> Tensor:
    """``DeltaXYWHBBoxCoder.decode`` (``delta2bbox``) of (..., 4) deltas on (..., 4) priors,
    clipped to the image when the coder clips."""
    deltas = deltas * deltas.new_tensor(coder.stds) + deltas.new_tensor(coder.means)
    centers = (priors[..., :2] + priors[..., 2:]) * 0.5
    sizes = priors[..., 2:] - priors[..., :2]
    max_ratio = abs(math.log(16 / 1000))  # delta2bbox's default wh_ratio_clip
    centers = centers + sizes * deltas[..., :2]
    sizes = sizes * deltas[..., 2:].clamp(min=-max_ratio, max=max_ratio).exp()
    boxes = torch.cat([centers - sizes * 0.5, centers + sizes * 0.5], dim=-1)
    if coder.clip_border:
        boxes = torch.min(boxes.clamp(min=0), max_xyxy)
    return boxes


def top_candidates(scores: Tensor, deltas: Tensor, anchors: Tensor, nms_pre: int) -> tuple:
    """The ``nms_pre`` best (anchor, class) pairs of one level (all if ``nms_pre`` <= 0) as
    mmdet's dense heads pick them: scores, classes, deltas, anchors (padded to a constant K)."""
    num_classes = scores.shape[2]
    if nms_pre > 0:
        padding = -(-nms_pre // num_classes)
        scores = F.pad(scores, (0, 0, 0, padding), value=SKIP_SCORE)
        deltas = F.pad(deltas, (0, 0, 0, padding))
        anchors = F.pad(anchors, (0, 0, 0, padding))
        scores, index = scores.flatten(1).topk(nms_pre, dim=1)
    else:
        index = torch.arange(scores.shape[1] * num_classes)[None].expand(scores.shape[0], -1)
        scores = scores.flatten(1)
    anchor_index = torch.div(index, num_classes, rounding_mode='floor')
    deltas = torch.gather(deltas, 1, anchor_index[..., None].expand(-1, -1, 4))
    return scores, index % num_classes, deltas, anchors[anchor_index]


def nms_by_class(boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor,
                 iou_threshold: float, max_num: int, class_agnostic: bool = False) -> Tensor:
    """Per-class NMS of each image's candidates as mmcv's ``batched_nms``: boxes (N, M, 4),
    scores, labels and valid (N, M) -> (S, 2) rows (image, candidate index), per image best
    first, at most ``max_num`` each."""
    largest = torch.where(valid[..., None], boxes, torch.zeros_like(boxes)).amax(dim=(1, 2))
    offsets = labels.to(boxes.dtype) * (0 if class_agnostic else largest[:, None] + 1)
    scores = torch.where(valid, scores, torch.full_like(scores, SKIP_SCORE))
    selected = NonMaxSuppression.apply(boxes + offsets[..., None], scores[:, None], max_num,
                                       iou_threshold, SKIP_THRESHOLD)
    return selected[:, [0, 2]]


def padded_detections(boxes: Tensor, scores: Tensor, labels: Tensor, selected: Tensor,
                      max_per_img: int) -> tuple:
    """The selected candidates of each image as ``dets`` (N, K, 5) and ``labels`` (N, K), best
    first, K = ``max_per_img``; an image with fewer detections gets rows of zeros, label -1."""
    image, index = selected[:, 0], selected[:, 1]
    kept = torch.cat([boxes[image, index], scores[image, index, None]], dim=1)  # (S, 5)
    images = torch.arange(boxes.shape[0])
    mine = (image[None] == images[:, None])  # (N, S)
    dets = torch.where(mine[..., None], kept[None], torch.zeros_like(kept[None]))
    kept_labels = torch.where(mine, labels[image, index][None],
                              torch.full_like(mine, -1, dtype=torch.long))
    # K padding rows, so that TopK always has K to pick from
    dets = torch.cat([dets, torch.zeros_like(boxes[:, :1, :1]).repeat(1, max_per_img, 5)], 1)
    kept_labels = torch.cat(
        [kept_labels, torch.full_like(labels[:, :1], -1).repeat(1, max_per_img)], dim=1)
    _, order = dets[..., 4].topk(max_per_img, dim=1)
    return (torch.gather(dets, 1, order[..., None].expand(-1, -1, 5)),
            torch.gather(kept_labels, 1, order))


def roi_levels(rois: Tensor, finest_scale: float, num_levels: int) -> Tensor:
    """The feature level of each (R, 4) roi by its scale, mmdet's
    ``SingleRoIExtractor.map_roi_levels``."""
    scale = torch.sqrt((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


def multi_level_roi_align(extractor, feats: Sequence[Tensor], rois: Tensor) -> Tensor:
    """mmdet's ``SingleRoIExtractor`` on the rois (R, 4) of image 0: each roi pooled from its
    own level only (not every level, which large rois on the finest map would make slow)."""
    layer = extractor.roi_layers[0]
    if not getattr(layer, 'aligned', True) or layer.pool_mode != 'avg':
        raise ValueError('ONNX export supports RoIAlign with aligned=True and pool_mode avg')
    feats = feats[:extractor.num_inputs]
    levels = roi_levels(rois, extractor.finest_scale, len(feats))
    pooled, order = [], []
    for level, (feat, stride) in enumerate(zip(feats, extractor.featmap_strides)):
        index = (levels == level).nonzero()[:, 0]
        pooled.append(RoiAlign.apply(feat, rois[index], torch.zeros_like(index),
                                     layer.output_size[0], 1 / stride, layer.sampling_ratio))
        order.append(index)
    return torch.cat(pooled)[torch.argsort(torch.cat(order))]


def dense_head_candidates(head, cls_scores: Sequence[Tensor], bbox_preds: Sequence[Tensor],
                          image: Tensor, cfg) -> dict:
    """An anchor-based dense head's candidates before NMS (``predict_by_feat`` of RetinaNet and
    RPN heads): ``boxes`` (N, M, 4), ``scores``, ``labels``, ``levels`` and ``valid`` (N, M: those
    over ``cfg.score_thr`` and larger than ``cfg.min_bbox_size``)."""
    max_xyxy = image_size_xyxy(image)
    priors = head.prior_generator
    parts = dict(boxes=[], scores=[], labels=[], levels=[])
    for level, (cls_score, bbox_pred) in enumerate(zip(cls_scores, bbox_preds)):
        num_images = cls_score.shape[0]
        scores = cls_score.permute(0, 2, 3, 1).reshape(num_images, -1, head.cls_out_channels)
        deltas = bbox_pred.permute(0, 2, 3, 1).reshape(num_images, -1, 4)
        anchors = grid_anchors(priors.base_anchors[level], priors.strides[level], cls_score)
        scores, labels, deltas, anchors = top_candidates(
            scores.sigmoid(), deltas, anchors, cfg.get('nms_pre', -1))
        parts['boxes'].append(decode_boxes(head.bbox_coder, anchors, deltas, max_xyxy))
        parts['scores'].append(scores)
        parts['labels'].append(labels)
        parts['levels'].append(torch.full_like(labels, level))
    candidates = {name: torch.cat(values, dim=1) for name, values in parts.items()}
    scores, boxes = candidates['scores'], candidates['boxes']
    valid = scores > cfg.get('score_thr', SKIP_THRESHOLD)
    if cfg.get('min_bbox_size', -1) >= 0:
        sizes = boxes[..., 2:] - boxes[..., :2]
        valid = valid & (sizes > cfg.min_bbox_size).all(dim=-1)
    candidates['valid'] = valid
    return candidates
