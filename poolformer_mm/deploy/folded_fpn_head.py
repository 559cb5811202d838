"""A folded FPN that also applies the Semantic FPN head's first convolution on its finest level.

mmseg's ``FPNHead`` reads the FPN's finest output, a 3x3 convolution of ``lateral1x1(x) +
up2x(coarser)``, only through one 3x3 convolution (batch norm folded) before its ReLU: the two
compose into one 5x5 convolution of that sum, computed term by term as in :mod:`.folded_fpn`,
less what the FPN's output one pixel outside the map adds on the border. Semantic FPN-S12 at
512x512: 8.2 instead of 11.7 GMACs for the finest level and the head's first convolution.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmseg.models.decode_heads import FPNHead
from torch import Tensor

from ..models.decode_heads.low_memory_heads import LowMemoryFPNHead
from .folded_fpn import (
    FoldedFPN,
    add_parities,
    double_bias,
    drop_padded_taps,
    plain_geometry,
    weights_used_as_stored,
)

# Row parity 0 of a nearest-upsampled map sees coarse rows (i-1, i-1, i, i, i+1) under a 5-tap
# kernel's taps (-2 ... +2), parity 1 sees (i-1, i, i, i+1, i+1): taps on the same coarse row add
_FIVE_TAPS_ON_THREE_COARSE = ([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]],
                              [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]])


class ConvAppliedByNeck(nn.Conv2d):
    """A head's 3x3 convolution that the neck applies (:class:`FoldedFPNWithHeadConv`): it passes
    its input through, and keeps its parameters, under the same names."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def _compose(outer: Tensor, inner: Tensor) -> Tensor:
    """The kernel of ``conv(conv(x, inner), outer)`` (3x3 kernels, stride 1): offsets add, so
    the result is 5x5."""
    composed = outer.new_zeros(outer.shape[0], inner.shape[1], 5, 5)
    for qy in range(3):
        for qx in range(3):
            for ry in range(3):
                for rx in range(3):
                    composed[:, :, qy + ry, qx + rx] += outer[:, :, qy, qx] @ inner[:, :, ry, rx]
    return composed


def levels_read(head: nn.Module, num_outs: int) -> list:
    """The neck outputs a decode head reads (``in_index`` resolved against ``num_outs``)."""
    in_index = head.in_index if isinstance(head.in_index, (list, tuple)) else [head.in_index]
    return [index % num_outs for index in in_index]


def why_head_conv_not_mergeable(fpn: nn.Module, head: nn.Module) -> Optional[str]:
    """Why the first convolution of ``head`` cannot be merged into the folded ``fpn``, or None
    if it can (an ``FPNHead`` that reads the finest level once, through a first scale head that
    is one 3x3 convolution, its norm folded, and an activation; and fewer multiply-adds)."""
    if isinstance(head, nn.ModuleList):
        return 'the model has several decode heads (a cascade)'
    if type(head) not in (FPNHead, LowMemoryFPNHead):  # a subclass may compute something else
        return f'the decode head is {type(head).__name__}, not FPNHead'
    if type(fpn) is not FoldedFPN:
        return 'the neck is not a folded FPN'
    levels = levels_read(head, fpn.num_outs)
    if levels[0] != 0 or 0 in levels[1:]:
        return "the head does not read the FPN's finest level once, with its first scale head"
    conv_module = head.scale_heads[0][0] if len(head.scale_heads[0]) == 1 else None
    conv = weights_used_as_stored(conv_module) if conv_module is not None else None
    norm = getattr(conv_module, 'norm', None)
    if (conv is None or getattr(conv_module, 'with_explicit_padding', True)
            or not (norm is None or isinstance(norm, nn.Identity))
            or list(conv_module.order).index('conv') != 0 or not plain_geometry(conv, 3, 1)):
        return ("the head's first scale head is not one 3x3 convolution (norm folded) and an "
                'activation')
    # multiply-adds per output pixel: 25 taps on the backbone's channels and 9 coarse taps,
    # against the folded FPN's 9 and 4 and the head's 9 taps on the FPN's channels
    in_channels, channels = fpn.lateral_convs[0].conv.in_channels, fpn.out_channels
    if 25 * in_channels * conv.out_channels >= 9 * in_channels * channels + 4 * channels**2:
        return 'merging would not save multiply-adds with these channel counts'
    return None


class FoldedFPNWithHeadConv(FoldedFPN):
    """A :class:`FoldedFPN` (its modules taken over) whose finest output is already the
    Semantic FPN head's first convolution ``head_conv`` of it, which becomes a
    :class:`ConvAppliedByNeck`: the same predictions up to rounding, for a model whose only
    reader of that level is the head (:func:`why_head_conv_not_mergeable`)."""

    _parity_taps = _FIVE_TAPS_ON_THREE_COARSE

    def __init__(self, folded_fpn: FoldedFPN, head_conv: nn.Conv2d):
        # not FoldedFPN.__init__: it checks and folds an upstream FPN, which folded_fpn has been
        nn.Module.__init__(self)
        # a plain attribute: the head owns the module, its parameters and their state dict keys
        self.__dict__['_head_conv'] = head_conv
        head_conv.__class__ = ConvAppliedByNeck
        self._take_over(folded_fpn)

    def _finest_convs(self):
        return super()._finest_convs() + [self._head_conv]

    def _kernel(self, output_weight: Tensor, output_bias: Tensor) -> tuple:
        head_weight = self._head_conv.weight.double()
        # the FPN's bias is taken off with the rest of the ring outside the map
        return (_compose(head_weight, output_weight),
                double_bias(self._head_conv) + torch.einsum('omyx,m->o', head_weight, output_bias))

    def _plain_finest_output(self, x: Tensor, coarser: Tensor) -> Tensor:
        head = self._head_conv
        return F.conv2d(super()._plain_finest_output(x, coarser), head.weight, head.bias,
                        padding=1)

    def _finest_output(self, x: Tensor, coarser: Tensor) -> Tensor:
        if not self._computes_folded(x, coarser):
            return self._plain_finest_output(x, coarser)
        out = F.conv2d(x, self.folded_weight, self.folded_bias, padding=2)
        # coarse output (i, j) of a parity's 3x3 kernel covers coarse rows i-1 ... i+1, which is
        # what fine pixel (2i + row, 2j + col) sees under the 5x5 kernel
        add_parities(out, F.conv2d(coarser, self.parity_weight, padding=1), shifted=False)
        drop_padded_taps(out, self.bias_taps)
        self._drop_ring_outside(out, x, coarser)
        return out

    def _drop_ring_outside(self, out: Tensor, x: Tensor, coarser: Tensor) -> None:
        """Take off the border what the FPN's output one pixel outside the map contributes
        (zero padding for the head's convolution): three-tap convolutions of the sum's outermost
        rows and columns, the corners counted with the rows."""
        weight, bias = self.fpn_convs[0].conv.weight, self.fpn_convs[0].conv.bias
        head_weight = self._head_conv.weight
        lateral = self.lateral_convs[0]

        def summed(rows: slice, cols: slice, dim: int) -> Tensor:
            # lateral1x1(x) + up2x(coarser) on the outermost row or column
            up = coarser[:, :, rows, cols].repeat_interleave(2, dim=dim)
            return lateral(x[:, :, rows, cols]) + up

        everything = slice(None)
        for rows, fpn_tap, head_tap in ((slice(0, 1), 2, 0), (slice(-1, None), 0, 2)):
            # the FPN's output on the row outside, from column -1 to the width
            outside = F.conv2d(F.pad(summed(rows, everything, 3), (2, 2)),
                               weight[:, :, fpn_tap:fpn_tap + 1], bias)
            out[:, :, rows] -= F.conv2d(outside, head_weight[:, :, head_tap:head_tap + 1])
        for cols, fpn_tap, head_tap in ((slice(0, 1), 2, 0), (slice(-1, None), 0, 2)):
            outside = F.conv2d(F.pad(summed(everything, cols, 2), (0, 0, 1, 1)),
                               weight[:, :, :, fpn_tap:fpn_tap + 1], bias)
            out[:, :, :, cols] -= F.conv2d(F.pad(outside, (0, 0, 1, 1)),
                                           head_weight[:, :, :, head_tap:head_tap + 1])
