"""ONNX export of (Cascade) Mask R-CNN: mmdet's ``TwoStageDetector.predict`` up to the mask
pasting (:func:`.postprocess.paste_masks`), one image per run (proposals differ in number).
"""
import torch
import torch.nn as nn

from ...utils.errors import InvalidInputError
from .ops import (
    decode_boxes,
    dense_head_candidates,
    image_size_xyxy,
    multi_level_roi_align,
    nms_by_class,
    padded_detections,
)


class MaskRCNNExport(nn.Module):
    """input (1, 3, H, W) -> ``dets`` (1, K, 5), ``labels`` (1, K), ``masks`` (1, K, m, m)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def proposals(self, feats, input: torch.Tensor) -> torch.Tensor:
        """The RPN's proposals (P, 4) of image 0, best first (NMS per level, as mmdet's)."""
        rpn = self.detector.rpn_head
        cfg = rpn.test_cfg
        found = dense_head_candidates(rpn, *rpn(feats), input, cfg)
        selected = nms_by_class(found['boxes'], found['scores'], found['levels'],
                                found['valid'], cfg.nms.iou_threshold, cfg.max_per_img)
        return found['boxes'][0, selected[:, 1]]

    def box_predictions(self, feats, proposals: torch.Tensor, input: torch.Tensor) -> tuple:
        """Class logits (R, C + 1) and boxes (R, C, 4) for the proposals (R, 4); a cascade
        refines the rois stage by stage and averages the logits (``CascadeRoIHead``)."""
        roi_head = self.detector.roi_head
        max_xyxy = image_size_xyxy(input)
        heads, extractors = _stages(roi_head.bbox_head), _stages(roi_head.bbox_roi_extractor)
        rois, stage_scores = proposals, []
        for stage, (head, extractor) in enumerate(zip(heads, extractors)):
            cls_score, bbox_pred = head(multi_level_roi_align(extractor, feats, rois))
            stage_scores.append(cls_score)
            boxes = _decode(head, rois, bbox_pred, max_xyxy)
            if stage < len(heads) - 1:
                if boxes.shape[1] > 1:  # class-specific boxes: those of the best class
                    best = cls_score[:, :-1].argmax(dim=1)
                    boxes = torch.gather(boxes, 1, best[:, None, None].expand(-1, 1, 4))
                rois = boxes[:, 0]
        return (cls_score if len(heads) == 1 else sum(stage_scores) / len(heads)), boxes

    def mask_probabilities(self, feats, boxes: torch.Tensor, labels: torch.Tensor):
        """(K, m, m) mask probabilities of each box's class (a cascade averages its stages)."""
        roi_head = self.detector.roi_head
        stages = []
        for head, extractor in zip(_stages(roi_head.mask_head),
                                   _stages(roi_head.mask_roi_extractor)):
            mask_preds = head(multi_level_roi_align(extractor, feats, boxes))
            channel = labels if mask_preds.shape[1] > 1 else torch.zeros_like(labels)
            stages.append(torch.gather(mask_preds, 1, channel[:, None, None, None].expand(
                -1, 1, *mask_preds.shape[2:]))[:, 0].sigmoid())
        return sum(stages) / len(stages)

    def forward(self, input: torch.Tensor):
        feats = self.detector.extract_feat(input)
        proposals = self.proposals(feats, input)
        cfg = self.detector.roi_head.test_cfg
        cls_score, boxes = self.box_predictions(feats, proposals, input)
        num_classes = cls_score.shape[1] - 1
        scores = cls_score.softmax(dim=-1)[:, :num_classes]  # the last column is background
        labels = torch.arange(num_classes)[None].expand_as(scores)
        # the (proposal, class) pairs of image 0 as one batch of candidates
        boxes = boxes.expand(-1, num_classes, -1).reshape(1, -1, 4)
        scores, labels = scores.reshape(1, -1), labels.reshape(1, -1)
        selected = nms_by_class(boxes, scores, labels, scores > cfg.score_thr,
                                cfg.nms.iou_threshold, cfg.max_per_img,
                                cfg.nms.get('class_agnostic', False))
        dets, labels = padded_detections(boxes, scores, labels, selected, cfg.max_per_img)
        masks = self.mask_probabilities(feats, dets[0, :, :4], labels[0].clamp(min=0))
        masks = torch.where((labels[0] >= 0)[:, None, None], masks, torch.zeros_like(masks))
        return dets, labels, masks[None]


def _stages(module: nn.Module) -> list:
    """A cascade's stages (a ``ModuleList``), or Mask R-CNN's one."""
    return list(module) if isinstance(module, nn.ModuleList) else [module]


def _decode(head, rois: torch.Tensor, bbox_pred: torch.Tensor, max_xyxy) -> torch.Tensor:
    """A box head's (R, 1 or C, 4) boxes: class-agnostic or one per class."""
    classes = 1 if head.reg_class_agnostic else head.num_classes
    return decode_boxes(head.bbox_coder, rois[:, None], bbox_pred.reshape(-1, classes, 4),
                        max_xyxy)


def check_mask_rcnn(model: nn.Module) -> None:
    """Refuse, with the reason, a two-stage detector :class:`MaskRCNNExport` does not compute."""
    name = type(model).__name__
    roi_head = model.roi_head
    if type(roi_head).__name__ not in ('StandardRoIHead', 'CascadeRoIHead'):
        raise InvalidInputError(
            f'ONNX export of {name} with {type(roi_head).__name__} is not supported: two-stage '
            'export handles Mask R-CNN and Cascade Mask R-CNN (StandardRoIHead, CascadeRoIHead)')
    rpn = model.rpn_head
    bbox_heads = _stages(roi_head.bbox_head)
    heads = [rpn, *bbox_heads]
    if (not roi_head.with_mask or not rpn.use_sigmoid_cls
            or {type(head.bbox_coder).__name__ for head in heads} != {'DeltaXYWHBBoxCoder'}
            or any(head.bbox_coder.add_ctr_clamp for head in heads)
            or any(head.custom_cls_channels or getattr(head.loss_cls, 'use_sigmoid', False)
                   for head in bbox_heads)
            or any(cfg.get('nms', {}).get('type', 'nms') != 'nms'
                   for cfg in (rpn.test_cfg, roi_head.test_cfg))):
        raise InvalidInputError(
            f'ONNX export of {name} is not supported: two-stage export handles Mask R-CNN and '
            'Cascade Mask R-CNN (RPN with sigmoid scores, softmax box heads with '
            'DeltaXYWHBBoxCoder boxes, a mask head, plain NMS)')


def mask_rcnn_info(model: nn.Module) -> dict:
    """The detection part of the deploy information (see export.deploy_info)."""
    rpn, rcnn = model.rpn_head.test_cfg, model.roi_head.test_cfg
    return dict(num_classes=_stages(model.roi_head.bbox_head)[-1].num_classes,
                test_cfg=dict(score_thr=float(rcnn.score_thr),
                              iou_threshold=float(rcnn.nms.iou_threshold),
                              max_per_img=int(rcnn.max_per_img)),
                rpn_test_cfg=dict(nms_pre=int(rpn.get('nms_pre', -1)),
                                  min_bbox_size=float(rpn.get('min_bbox_size', -1)),
                                  iou_threshold=float(rpn.nms.iou_threshold),
                                  max_per_img=int(rpn.max_per_img)),
                mask_thr_binary=float(rcnn.mask_thr_binary))
