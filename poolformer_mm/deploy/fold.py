"""Fold the backbone and an FPN neck for inference once the checkpoint to test is loaded."""
from collections import Counter
from typing import NamedTuple, Optional

from mmcv.cnn import ConvModule, fuse_conv_bn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..models.folded_weights import refuse_unfolded_weights
from ..utils.errors import InvalidInputError
from ..utils.model_parts import find_backbone, unwrap_model
from .folded_fpn import FoldedFPN, weights_used_as_stored
from .folded_fpn_head import FoldedFPNWithHeadConv, levels_read, why_head_conv_not_mergeable
from .precision import to_channels_last


def switch_backbone_to_deploy(model) -> None:
    """Call ``switch_to_deploy()`` on ``model``'s backbone, or say why it cannot be done."""
    backbone = find_backbone(model)
    if not hasattr(backbone, 'switch_to_deploy'):
        raise InvalidInputError(
            f'--deploy folds a PoolFormer backbone for inference, but this model\'s backbone is '
            f'{type(backbone).__name__}, which has no switch_to_deploy(); drop --deploy.')
    backbone.switch_to_deploy()


def fold_fpn_neck(model) -> Optional[str]:
    """Replace the model's mmdet or mmseg ``FPN`` neck by its :class:`FoldedFPN`. Returns why
    it was left as it is, or None when it was folded (or already was)."""
    detector = unwrap_model(model)
    neck = getattr(detector, 'neck', None)
    if neck is None:
        return 'the model has no neck'
    if isinstance(neck, FoldedFPN):
        return None
    reason = FoldedFPN.why_not_foldable(neck)
    if reason is None:
        detector.neck = FoldedFPN(neck)
    return reason


def merge_head_conv_into_neck(model) -> Optional[str]:
    """Replace a folded FPN neck by :class:`FoldedFPNWithHeadConv` when a Semantic FPN head
    reads its finest level only through one 3x3 convolution (after :func:`fold_fpn_neck` and
    :func:`fold_batch_norms`). Returns why it was left as it is, or None when it was merged (or
    already was)."""
    segmentor = unwrap_model(model)
    neck, head = getattr(segmentor, 'neck', None), getattr(segmentor, 'decode_head', None)
    if isinstance(neck, FoldedFPNWithHeadConv):
        return None
    if head is None:
        return 'the model has no decode head'
    reason = why_head_conv_not_mergeable(neck, head)
    if reason is not None:
        return reason
    # the neck's finest output becomes the head's convolution of it, and that convolution a
    # pass-through: both must have no other user
    auxiliary = getattr(segmentor, 'auxiliary_head', None) or nn.ModuleList()
    if any(0 in levels_read(aux, neck.num_outs)
           for aux in (auxiliary if isinstance(auxiliary, nn.ModuleList) else [auxiliary])):
        return "an auxiliary head reads the FPN's finest level too"
    conv_module = head.scale_heads[0][0]
    uses = Counter(id(child) for module in segmentor.modules() for child in module.children())
    if uses[id(conv_module)] > 1 or uses[id(conv_module.conv)] > 1:
        return "the head's first convolution is shared with another module"
    segmentor.neck = FoldedFPNWithHeadConv(neck, conv_module.conv)
    return None


def _foldable_batch_norm(module, parts_in_use: Counter) -> bool:
    """Whether the BatchNorm of ConvModule ``module`` can be folded into its convolution: one
    used as stored and shared with no other ConvModule (as RTMDet's head shares one), then the
    norm straight after it (or no activation anywhere), with running statistics and affine."""
    norm = module.norm
    conv = weights_used_as_stored(module)
    if not (isinstance(norm, _BatchNorm) and norm.affine and norm.track_running_stats):
        return False
    if conv is None or parts_in_use[id(conv)] > 1 or parts_in_use[id(norm)] > 1:
        return False
    order = list(module.order)
    return (order.index('norm') == order.index('conv') + 1
            or (order.index('conv') < order.index('norm') and not module.with_activation))


def fold_batch_norms(model) -> int:
    """Fold each BatchNorm of an mmcv ``ConvModule`` that runs right after its convolution into
    it with mmcv's ``fuse_conv_bn``, for inference: only in ConvModules, whose order of
    operations is known (``fuse_conv_bn`` on a whole model pairs modules in the order they were
    registered), and only where it is exact. Returns how many were folded."""
    conv_modules = [m for m in unwrap_model(model).modules()
                    if isinstance(m, ConvModule) and m.with_norm]
    in_use = Counter(id(part) for m in conv_modules for part in (m.conv, m.norm))
    folded = 0
    for module in conv_modules:
        if _foldable_batch_norm(module, in_use):
            fuse_conv_bn(module)
            # mmcv's eval-time conv+BN path would otherwise read the Identity left in its place
            module.efficient_conv_bn_eval_forward = None
            folded += 1
    return folded


class InferenceForm(NamedTuple):
    """What :func:`prepare_for_inference` changed beyond the backbone."""
    neck_left_because: Optional[str]  # None: the FPN neck was folded
    batch_norms_folded: int
    head_conv_left_because: Optional[str]  # None: merged into the folded neck

    def describe(self) -> str:
        neck = (f'neck not folded ({self.neck_left_because})' if self.neck_left_because else
                'FPN neck folded (FoldedFPN)')
        if self.head_conv_left_because is None:
            neck = ('FPN neck folded (FoldedFPNWithHeadConv: the decode head\'s first 3x3 '
                    'convolution merged into its finest level)')
        elif not self.neck_left_because and self.head_conv_left_because != (
                'the model has no decode head'):
            neck += f" (the head's first convolution not merged: {self.head_conv_left_because})"
        return (f'backbone switched to its deploy (folded) form; {neck}; '
                f'{self.batch_norms_folded} batch norm(s) folded into their convolutions; neck '
                'and head convolutions channels-last')


def prepare_for_inference(model) -> InferenceForm:
    """The fastest inference form of a detector or segmentor with a PoolFormer backbone, same
    predictions up to rounding: the backbone, an ``FPN`` neck and BatchNorms folded, a Semantic
    FPN head's first convolution merged into that neck (then the neck's finest output is the
    head's convolution of the FPN's), the neck and head channels-last (:func:`to_channels_last`).
    Afterwards ``load_state_dict`` refuses the unfolded model's weights: load them first."""
    keys_before = list(unwrap_model(model).state_dict())
    switch_backbone_to_deploy(model)
    neck_left_because = fold_fpn_neck(model)
    batch_norms_folded = fold_batch_norms(model)
    head_conv_left_because = (merge_head_conv_into_neck(model) if neck_left_because is None
                              else 'the neck is not a folded FPN')
    to_channels_last(model)
    refuse_unfolded_weights(unwrap_model(model), keys_before, 'This model')
    return InferenceForm(neck_left_because, batch_norms_folded, head_conv_left_because)
