"""mmseg's segmentation heads with the loss computed band by band.

Each class here is an mmseg head (same modules, parameters and predictions, so checkpoints load
into either) whose ``loss_by_feat`` computes the cross-entropy with
:func:`~poolformer_mm.models.losses.upsampled_cross_entropy` instead of resizing the logits to
the label size first. Same loss and gradients; at 512x512 with 150 classes and batch 2 the
loss runs about 4x faster on a CPU under bf16 autocast, and no tensor of the full-resolution
logits' size is kept for the backward pass.
"""
from typing import List

import torch
import torch.nn as nn
from mmseg.models.decode_heads import FCNHead, FPNHead, UPerHead
from mmseg.models.losses import CrossEntropyLoss
from mmseg.models.utils import resize
from mmseg.registry import MODELS
from torch import Tensor

from ..losses import upsampled_cross_entropy


class UpsampledLossMixin:
    """``loss_by_feat`` by :func:`upsampled_cross_entropy`, for a subclass of an mmseg
    ``BaseDecodeHead``. The loss configuration must be one that it computes exactly: a single
    softmax ``CrossEntropyLoss`` with mean reduction, no class weights and no pixel sampler;
    anything else is refused when the head is built, naming the mmseg head to use instead."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._check_loss_is_plain_cross_entropy()

    def _check_loss_is_plain_cross_entropy(self) -> None:
        loss = self.loss_decode
        if isinstance(loss, nn.ModuleList) and len(loss) == 1:  # a one-element list of configs
            loss = loss[0]
        problems = []
        if isinstance(loss, nn.ModuleList):
            problems.append(f'{len(loss)} losses')
        elif type(loss) is not CrossEntropyLoss:  # a subclass may compute something else
            problems.append(type(loss).__name__)
        else:
            problems += [name for name in ('use_sigmoid', 'use_mask') if getattr(loss, name)]
            if loss.class_weight is not None:
                problems.append('class_weight')
            if loss.reduction != 'mean':
                problems.append(f"reduction='{loss.reduction}'")
        if self.sampler is not None:
            problems.append('a pixel sampler')
        if problems:
            upstream = next(cls for cls in type(self).__mro__
                            if cls.__module__.startswith('mmseg.')).__name__
            raise ValueError(
                f'{type(self).__name__} computes only a single softmax CrossEntropyLoss with '
                f"mean reduction, no class weights and no sampler; this config has "
                f"{', '.join(problems)}. Use type='{upstream}' for it.")

    @property
    def _cross_entropy(self) -> CrossEntropyLoss:
        loss = self.loss_decode
        return loss[0] if isinstance(loss, nn.ModuleList) else loss

    def loss_by_feat(self, seg_logits: Tensor, batch_data_samples: List) -> dict:
        labels = self._stack_batch_gt(batch_data_samples).squeeze(1)
        cross_entropy = self._cross_entropy
        loss, accuracy = upsampled_cross_entropy(
            seg_logits, labels, ignore_index=self.ignore_index,
            align_corners=self.align_corners, avg_non_ignore=cross_entropy.avg_non_ignore,
            loss_weight=cross_entropy.loss_weight)
        return {cross_entropy.loss_name: loss, 'acc_seg': accuracy}


@MODELS.register_module()
class LowMemoryFPNHead(UpsampledLossMixin, FPNHead):
    """mmseg's Semantic FPN head (``FPNHead``) with the loss computed band by band.

    Its forward sums the scale heads as ``FPNHead`` does, minus two costs that change no value:
    it does not resize a map that already has the output's size (each coarser scale head ends
    by upsampling to it; ``FPNHead`` copies it again, a 128-channel map at 1/4 of the input
    resolution per level), and, without autograd, it adds into the sum in place.

    Args:
        **kwargs: ``FPNHead``'s arguments; the loss as :class:`UpsampledLossMixin` requires.
    """

    def forward(self, inputs):
        x = self._transform_inputs(inputs)
        output = self.scale_heads[0](x[0])
        for scale_head, feature in zip(self.scale_heads[1:], x[1:]):
            scaled = scale_head(feature)
            if scaled.shape[2:] != output.shape[2:]:
                scaled = resize(scaled, size=output.shape[2:], mode='bilinear',
                                align_corners=self.align_corners)
            # under autograd the sum must be a new tensor: the first term is the output of an
            # in-place ReLU, which its backward reads
            if (torch.is_grad_enabled() or scaled.shape != output.shape
                    or torch.promote_types(output.dtype, scaled.dtype) != output.dtype):
                output = output + scaled
            else:
                output += scaled
        return self.cls_seg(output)


@MODELS.register_module()
class LowMemoryUPerHead(UpsampledLossMixin, UPerHead):
    """mmseg's UPerNet head (``UPerHead``) with the loss computed band by band.

    Args:
        **kwargs: ``UPerHead``'s arguments; the loss as :class:`UpsampledLossMixin` requires.
    """


@MODELS.register_module()
class LowMemoryFCNHead(UpsampledLossMixin, FCNHead):
    """mmseg's FCN head (``FCNHead``, UPerNet's auxiliary head) with the loss computed band by
    band.

    Args:
        **kwargs: ``FCNHead``'s arguments; the loss as :class:`UpsampledLossMixin` requires.
    """
