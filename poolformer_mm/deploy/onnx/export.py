"""ONNX export of mmseg segmentors and mmdet detectors with a folded backbone and detection
post-processing (docs/deployment.md); what the runtime side needs is in ``metadata_props``.
"""
import copy
import hashlib
import json
import os.path as osp
import warnings
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdet.registry import MODELS as DET_MODELS
from mmengine.config import Config
from mmengine.registry import DATASETS, init_default_scope
from mmengine.runner import load_checkpoint
from mmseg.models.utils import Upsample
from mmseg.registry import MODELS as SEG_MODELS

from ...models.checkpoint_fit import check_checkpoint_fits
from ...models.layers.blocks import DeployPoolFormerBlock, PositionEmbedding
from ...utils.config import read_config, task_of
from ...utils.errors import InvalidInputError
from ...utils.model_parts import find_backbone
from ..fold import switch_backbone_to_deploy
from .ops import dense_head_candidates, nms_by_class, padded_detections
from .postprocess import METADATA_KEY
from .two_stage import MaskRCNNExport, check_mask_rcnn, mask_rcnn_info

OPSET_VERSION = 17
DEFAULT_SIZE_DIVISOR = 32


def build_model(config: str, checkpoint: Optional[str] = None,
                cfg_options: Optional[dict] = None) -> tuple:
    """The config's model in eval mode with the checkpoint's weights; returns (model, cfg)."""
    cfg = read_config(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = task_of(cfg)
    init_default_scope(scope)
    model_cfg = copy.deepcopy(cfg.model)  # building writes test_cfg into the heads' configs
    # the checkpoint replaces every weight: no download of the backbone's pretrained weights
    if model_cfg.get('backbone', {}).get('init_cfg') is not None:
        model_cfg.backbone.init_cfg = None
    model = (DET_MODELS if scope == 'mmdet' else SEG_MODELS).build(model_cfg)
    if checkpoint is not None:
        check_checkpoint_fits(model, checkpoint, config)
        load_checkpoint(model, checkpoint, map_location='cpu', logger='silent')
    return model.eval(), cfg


def _moments(tokens: torch.Tensor, eps: float) -> tuple:
    """Per-sample mean and 1 / sqrt(var + eps) of (N, H, W, C) tokens, in plain reductions."""
    mean = tokens.mean(dim=(1, 2, 3), keepdim=True)
    var = (tokens - mean).square().mean(dim=(1, 2, 3), keepdim=True)
    return mean, torch.rsqrt(var + eps)


class ExportPoolFormerBlock(nn.Module):
    """:class:`DeployPoolFormerBlock`'s computation (same buffers, same maths) in ops every ONNX
    runtime has, not ``torch.native_group_norm`` and oneDNN's private fused kernels."""

    supports_token_layout = True

    def __init__(self, block: DeployPoolFormerBlock):
        super().__init__()
        for name in ('mixer_scale', 'fc1_weight', 'fc1_bias', 'fc2_weight', 'fc2_bias'):
            self.register_buffer(name, getattr(block, name))
        self.eps1, self.eps2 = block.eps1, block.eps2
        self.token_mixer = block.token_mixer
        self.act = block.act

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        _, inv_std = _moments(tokens, self.eps1)
        tokens = tokens + self.token_mixer.forward_tokens(tokens) * (inv_std * self.mixer_scale)
        mean, inv_std = _moments(tokens, self.eps2)
        hidden = self.act(F.linear((tokens - mean) * inv_std, self.fc1_weight, self.fc1_bias))
        return tokens + F.linear(hidden, self.fc2_weight, self.fc2_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def fold_for_export(model: nn.Module) -> nn.Module:
    """Fold the backbone (``switch_to_deploy``, where it has one), give its folded blocks
    plain-op forms, and swap the modules a trace would fix to the export size."""
    if hasattr(find_backbone(model), 'switch_to_deploy'):  # MetaFormer has no folded form
        switch_backbone_to_deploy(model)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, DeployPoolFormerBlock):
                setattr(module, name, ExportPoolFormerBlock(child))
            elif isinstance(child, Upsample) and not child.size:
                setattr(module, name, ScaleUpsample(child))
            elif isinstance(child, PositionEmbedding):
                setattr(module, name, ExportPositionEmbedding(child))
            elif _is_fixed_bin_pool(child):
                setattr(module, name, StaticAdaptiveAvgPool2d(child))
    return model


class ScaleUpsample(nn.Module):
    """mmseg's ``Upsample`` by a scale factor traced as a scale, not as the export size's
    Python ints: the same output size (floor) and sampling positions."""

    def __init__(self, upsample: nn.Module):
        super().__init__()
        self.scale_factor = upsample.scale_factor
        self.mode = upsample.mode
        self.align_corners = upsample.align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode,
                             align_corners=self.align_corners)


class ExportPositionEmbedding(nn.Module):
    """:class:`PositionEmbedding` that always resizes (bicubic, unchanged at the embedding's own
    grid, where the backbone skips it and a trace at that size would skip it at every size)."""

    def __init__(self, embedding: PositionEmbedding):
        super().__init__()
        self.weight = embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.interpolate(self.weight, size=x.shape[-2:], mode='bicubic',
                                 align_corners=False)


class StaticAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as explicit bins (the same edges), each averaged, which ONNX
    lacks; the bins are fixed at the traced size: one input size only."""

    def __init__(self, pool: nn.AdaptiveAvgPool2d):
        super().__init__()
        size = pool.output_size
        self.output_size = (size, size) if isinstance(size, int) else tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = int(x.shape[2]), int(x.shape[3])
        out_h, out_w = (o or s for o, s in zip(self.output_size, (height, width)))
        rows = []
        for i in range(out_h):
            top, bottom = i * height // out_h, -(-(i + 1) * height // out_h)
            rows.append(torch.cat([
                x[:, :, top:bottom, j * width // out_w:-(-(j + 1) * width // out_w)].mean(
                    dim=(2, 3), keepdim=True) for j in range(out_w)], dim=3))
        return torch.cat(rows, dim=2)


def _is_fixed_bin_pool(module: nn.Module) -> bool:
    """An adaptive average pool with more than one bin (global pooling exports as it is)."""
    return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size not in (1, (1, 1))


class SegmentorExport(nn.Module):
    """input -> class map (and logits) at the input size, as mmseg's whole-image inference."""

    def __init__(self, segmentor: nn.Module, with_logits: bool = False):
        super().__init__()
        self.segmentor = segmentor
        self.with_logits = with_logits

    def forward(self, input: torch.Tensor):
        head = self.segmentor.decode_head
        logits = head(self.segmentor.extract_feat(input))
        logits = F.interpolate(logits, size=input.shape[2:], mode='bilinear',
                               align_corners=head.align_corners)
        if head.out_channels == 1:  # binary head: a threshold instead of an argmax
            output = (logits.sigmoid() > head.threshold).long()
        else:
            output = logits.argmax(dim=1, keepdim=True)
        return (output, logits) if self.with_logits else output


class SingleStageDetectorExport(nn.Module):
    """input -> ``dets`` (N, K, 5) and ``labels`` (N, K) after NMS, K = ``max_per_img``
    (:func:`~poolformer_mm.deploy.onnx.ops.padded_detections`)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, input: torch.Tensor):
        head = self.detector.bbox_head
        cfg = head.test_cfg
        found = dense_head_candidates(head, *head(self.detector.extract_feat(input)), input, cfg)
        selected = nms_by_class(found['boxes'], found['scores'], found['labels'],
                                found['valid'], cfg.nms.iou_threshold, cfg.max_per_img,
                                cfg.nms.get('class_agnostic', False))
        return padded_detections(found['boxes'], found['scores'], found['labels'], selected,
                                 cfg.max_per_img)


def _class_names(cfg: Config, num_classes: int) -> tuple:
    """Class names and palette from the test set's metainfo or its dataset class."""
    dataset = cfg.get('test_dataloader', {}).get('dataset', {})
    metainfo = dict(dataset.get('metainfo') or {})
    if 'classes' not in metainfo:
        try:
            metainfo = {**getattr(DATASETS.get(dataset.get('type')), 'METAINFO', {}), **metainfo}
        except (KeyError, TypeError):
            pass
    classes = list(metainfo.get('classes', ()))
    if len(classes) != num_classes:
        return [f'class_{i}' for i in range(num_classes)], None
    palette = metainfo.get('palette')
    return classes, [list(map(int, c)) for c in palette] if palette else None


def _detection_info(detector: nn.Module) -> dict:
    cfg = detector.bbox_head.test_cfg
    return dict(num_classes=detector.bbox_head.num_classes,
                test_cfg=dict(score_thr=float(cfg.get('score_thr', 0)),
                              nms_pre=int(cfg.get('nms_pre', -1)),
                              min_bbox_size=float(cfg.get('min_bbox_size', -1)),
                              iou_threshold=float(cfg.nms.iou_threshold),
                              class_agnostic=bool(cfg.nms.get('class_agnostic', False)),
                              max_per_img=int(cfg.max_per_img)))


def check_exportable(model: nn.Module, task: str, dynamic: bool = False) -> None:
    """Refuse, with what is supported, a model this exporter does not handle."""
    if dynamic and any(map(_is_fixed_bin_pool, model.modules())):
        raise InvalidInputError(
            f'{type(model).__name__} has adaptive average pooling to more than one bin (e.g. '
            "UPerNet's pyramid pooling), which ONNX cannot follow to other input sizes: export "
            'without --dynamic, at the size it will run at (--shape H W)')
    head = getattr(model, 'bbox_head', None)
    if task == 'segmentation':
        if not hasattr(model, 'decode_head') or getattr(model, 'cascade', False):
            raise InvalidInputError('ONNX export handles encoder-decoder segmentors; '
                                    f'{type(model).__name__} is not one')
    elif hasattr(model, 'roi_head'):
        check_mask_rcnn(model)
    elif (not hasattr(head, 'prior_generator')
          or type(getattr(head, 'bbox_coder', None)).__name__ != 'DeltaXYWHBBoxCoder'
          or head.bbox_coder.add_ctr_clamp or not head.use_sigmoid_cls
          or head.test_cfg.get('nms', {}).get('type', 'nms') != 'nms'):
        raise InvalidInputError(
            f'ONNX export of {type(model).__name__} with {type(head).__name__} is not supported: '
            'detection export handles anchor-based single-stage detectors with sigmoid scores, '
            'DeltaXYWHBBoxCoder and plain NMS (RetinaNet), and Mask R-CNN')


def deploy_info(model: nn.Module, cfg: Config, shape: Sequence[int], dynamic: bool,
                task: str) -> dict:
    """What the runtime side needs, stored in the ONNX file (see postprocess.read_deploy_info)."""
    preprocessor = model.data_preprocessor
    if task == 'segmentation':
        num_classes = model.decode_head.num_classes
    else:
        detection = (mask_rcnn_info(model) if hasattr(model, 'roi_head')
                     else _detection_info(model))
        num_classes = detection['num_classes']
    classes, palette = _class_names(cfg, num_classes)
    info = dict(
        format=1, task=task, config=osp.basename(cfg.filename or ''),
        input_size=[int(s) for s in shape], dynamic=bool(dynamic),
        size_divisor=int(getattr(preprocessor, 'pad_size_divisor', 1) or 1)
        if task == 'detection' else DEFAULT_SIZE_DIVISOR,
        mean=preprocessor.mean.flatten().tolist(), std=preprocessor.std.flatten().tolist(),
        # mmengine's ImgDataPreprocessor and mmseg's SegDataPreProcessor name it differently
        to_rgb=bool(getattr(preprocessor, '_channel_conversion',
                            getattr(preprocessor, 'channel_conversion', False))),
        classes=classes, palette=palette)
    if task == 'detection':
        info['detection'] = detection
    info['model_digest'] = model_digest(model)
    return info


def model_digest(model: nn.Module) -> str:
    """A short hash of the names and shapes of the (unfolded) model's weights: one per arch,
    class count and heads, whatever the checkpoint or the config's file name."""
    layout = '\n'.join(f'{name}:{tuple(value.shape)}'
                       for name, value in sorted(model.state_dict().items()))
    return hashlib.sha256(layout.encode()).hexdigest()[:16]


def export_onnx(model: nn.Module, cfg: Config, out: str, shape: Sequence[int] = (512, 512),
                dynamic: bool = False, with_logits: bool = False) -> dict:
    """Fold ``model``'s backbone and move it to the CPU (in place), export it to ``out`` and
    return the stored deploy information."""
    import onnx  # the optional deploy extra

    model.cpu()
    task = 'detection' if task_of(cfg) == 'mmdet' else 'segmentation'
    check_exportable(model, task, dynamic)
    info = deploy_info(model, cfg, shape, dynamic, task)
    info['backbone_folded'] = hasattr(find_backbone(model), 'switch_to_deploy')
    fold_for_export(model)
    if task == 'segmentation':
        wrapper = SegmentorExport(model, with_logits)
        outputs = ['output', 'logits'] if with_logits else ['output']
    elif hasattr(model, 'roi_head'):
        wrapper = MaskRCNNExport(model)
        outputs = ['dets', 'labels', 'masks']
    else:
        wrapper = SingleStageDetectorExport(model)
        outputs = ['dets', 'labels']
    info['outputs'] = outputs
    axes = None
    if dynamic:
        # Mask R-CNN runs one image at a time; detections have max_per_img rows at every size
        batch = {} if isinstance(wrapper, MaskRCNNExport) else {0: 'batch'}
        axes = {name: {**batch, 2: 'height', 3: 'width'}
                if name == 'input' or task == 'segmentation' else batch
                for name in ['input', *outputs]}
    # an input that requires grad keeps the CPU fast paths (fused oneDNN kernels, in-place
    # accumulation), which run without autograd only, out of the graph
    dummy = torch.zeros(1, 3, *shape, requires_grad=True)
    # keep_initializers_as_inputs: torch 2.13's deduplication of equal initializers leaves nodes
    # reading a removed one; they are taken out of the graph inputs afterwards. The tracer warns
    # at every shape turned into a number: the branches on sizes take the same path at any size.
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        # indexing by the selected candidates: never negative indices, which it warns about
        warnings.filterwarnings('ignore', 'Exporting aten::index operator')
        torch.onnx.export(wrapper, (dummy, ), out, dynamo=False, opset_version=OPSET_VERSION,
                          input_names=['input'], output_names=outputs, dynamic_axes=axes,
                          do_constant_folding=True, keep_initializers_as_inputs=True)
    onnx_model = onnx.load(out)
    initializers = {tensor.name for tensor in onnx_model.graph.initializer}
    inputs = [value for value in onnx_model.graph.input if value.name not in initializers]
    del onnx_model.graph.input[:]
    onnx_model.graph.input.extend(inputs)
    check_plain_ops(onnx_model)
    onnx.checker.check_model(onnx_model)
    onnx_model.metadata_props.add(key=METADATA_KEY, value=json.dumps(info))
    onnx.save(onnx_model, out)
    return info


def check_plain_ops(onnx_model) -> None:
    """Refuse an op outside the standard ONNX domain (an ATen fallback, a private oneDNN
    kernel), which ONNX Runtime or TensorRT could not run."""
    custom = sorted({f'{node.domain}::{node.op_type}' for node in onnx_model.graph.node
                     if node.domain not in ('', 'ai.onnx')})
    if custom:
        raise RuntimeError(f'the exported graph holds non-standard ops: {", ".join(custom)}')
