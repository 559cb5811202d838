"""ONNX export of Mask R-CNN: proposals, RoI heads, NMS and mask head, all in the graph.

:class:`MaskRCNNExport` computes what mmdet's ``TwoStageDetector.predict`` computes with a
``StandardRoIHead``, up to the mask pasting:

1. RPN: per level the ``rpn.nms_pre`` best anchors, decoded, boxes without area dropped, NMS
   per level, the ``rpn.max_per_img`` best as proposals (their number follows the image);
2. RoIAlign of each proposal on its level (mmdet's ``SingleRoIExtractor`` rule), the box head,
   softmax scores and per-class boxes, per-class NMS over the (proposal, class) pairs over
   ``rcnn.score_thr``: ``dets`` (1, K, 5) and ``labels`` (1, K), K = ``rcnn.max_per_img``,
   zeros and label -1 after the last detection;
3. RoIAlign of each detection's box, the mask head, the sigmoid of its class's map: ``masks``
   (1, K, 28, 28), as mmdeploy's end-to-end Mask R-CNN. Pasting them into the image and the
   ``rcnn.mask_thr_binary`` threshold are the NumPy step
   :func:`poolformer_mm.deployment.postprocess.paste_masks`.

One image per run: proposals differ in number between images, so a batch axis would need a
per-image selection that ONNX has no op for.
"""
import torch
import torch.nn as nn

from ..errors import InvalidInputError
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
        """The RPN's proposals (P, 4) of image 0, best first."""
        rpn = self.detector.rpn_head
        cfg = rpn.test_cfg
        found = dense_head_candidates(rpn, *rpn(feats), input, cfg)
        # NMS per level, as mmdet's RPN head does
        selected = nms_by_class(found['boxes'], found['scores'], found['levels'],
                                found['valid'], cfg.nms.iou_threshold, cfg.max_per_img)
        return found['boxes'][0, selected[:, 1]]

    def forward(self, input: torch.Tensor):
        feats = self.detector.extract_feat(input)
        proposals = self.proposals(feats, input)
        roi_head = self.detector.roi_head
        cfg, bbox_head = roi_head.test_cfg, roi_head.bbox_head
        num_classes = bbox_head.num_classes
        cls_score, bbox_pred = bbox_head(
            multi_level_roi_align(roi_head.bbox_roi_extractor, feats, proposals))
        scores = cls_score.softmax(dim=-1)[:, :num_classes]  # the last column is background
        boxes = decode_boxes(bbox_head.bbox_coder, proposals[:, None],
                             bbox_pred.reshape(-1, num_classes, 4), image_size_xyxy(input))
        labels = torch.arange(num_classes)[None].expand_as(scores)
        # the (proposal, class) pairs of image 0 as one batch of candidates
        boxes = boxes.reshape(1, -1, 4)
        scores, labels = scores.reshape(1, -1), labels.reshape(1, -1)
        selected = nms_by_class(boxes, scores, labels, scores > cfg.score_thr,
                                cfg.nms.iou_threshold, cfg.max_per_img)
        dets, labels = padded_detections(boxes, scores, labels, selected, cfg.max_per_img)
        mask_preds = roi_head.mask_head(
            multi_level_roi_align(roi_head.mask_roi_extractor, feats, dets[0, :, :4]))
        detected = labels[0] >= 0
        channel = labels[0].clamp(min=0) if mask_preds.shape[1] > 1 else torch.zeros_like(
            labels[0])
        masks = torch.gather(mask_preds, 1, channel[:, None, None, None].expand(
            -1, 1, *mask_preds.shape[2:]))[:, 0].sigmoid()
        masks = torch.where(detected[:, None, None], masks, torch.zeros_like(masks))
        return dets, labels, masks[None]


def check_mask_rcnn(model: nn.Module) -> None:
    """Refuse, with the reason, a two-stage detector :class:`MaskRCNNExport` does not compute."""
    name = type(model).__name__
    roi_head = model.roi_head
    if type(roi_head).__name__ != 'StandardRoIHead':
        raise InvalidInputError(
            f'ONNX export of {name} with {type(roi_head).__name__} is not supported: two-stage '
            'export handles Mask R-CNN (StandardRoIHead); a cascade refines its boxes over '
            'several stages and averages their scores, which the exporter does not rewrite')
    bbox_head, rpn = roi_head.bbox_head, model.rpn_head
    coders = {type(head.bbox_coder).__name__ for head in (bbox_head, rpn)}
    if (not roi_head.with_mask or coders != {'DeltaXYWHBBoxCoder'} or not rpn.use_sigmoid_cls
            or bbox_head.custom_cls_channels or getattr(bbox_head.loss_cls, 'use_sigmoid', False)
            or bbox_head.reg_class_agnostic
            or any(head.bbox_coder.add_ctr_clamp for head in (bbox_head, rpn))
            or any(cfg.get('nms', {}).get('type', 'nms') != 'nms'
                   for cfg in (rpn.test_cfg, roi_head.test_cfg))):
        raise InvalidInputError(
            f'ONNX export of {name} is not supported: two-stage export handles Mask R-CNN '
            '(RPN with sigmoid scores, softmax box head with per-class DeltaXYWHBBoxCoder boxes, '
            'a mask head, plain NMS)')


def mask_rcnn_info(model: nn.Module) -> dict:
    """The detection part of the deploy information (see export.deploy_info)."""
    rpn, rcnn = model.rpn_head.test_cfg, model.roi_head.test_cfg
    return dict(num_classes=model.roi_head.bbox_head.num_classes,
                test_cfg=dict(score_thr=float(rcnn.score_thr),
                              iou_threshold=float(rcnn.nms.iou_threshold),
                              max_per_img=int(rcnn.max_per_img)),
                rpn_test_cfg=dict(nms_pre=int(rpn.get('nms_pre', -1)),
                                  min_bbox_size=float(rpn.get('min_bbox_size', -1)),
                                  iou_threshold=float(rpn.nms.iou_threshold),
                                  max_per_img=int(rpn.max_per_img)),
                mask_thr_binary=float(rcnn.mask_thr_binary))
