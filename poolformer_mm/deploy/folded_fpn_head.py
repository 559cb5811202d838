"""A folded FPN that also applies the Semantic FPN head's first convolution on its finest level.

mmseg's ``FPNHead`` reads the FPN's finest output only through one 3x3 convolution (its batch
norm folded into it by ``--deploy``), before its ReLU. The FPN's finest output is itself a 3x3
convolution of ``lateral1x1(x) + up2x(coarser)``, so the two convolutions compose into one 5x5
convolution of that sum, again computed term by term:

- ``x`` (the backbone's finest stage, 64 channels in S12) through the composed 5x5 kernel,
  straight to the head's 128 channels;
- the nearest-upsampled coarser map through the composed 5x5 kernel: an output pixel of a given
  row and column parity sees 3x3 distinct coarse pixels under its 25 taps, so each parity is a
  3x3 convolution at the coarse resolution, and the four run as one;
- the lateral bias through the 5x5 kernel, less the taps that fall on the zero padding.

Composition is exact inside the map. On its one-pixel border the head's convolution reads zero
padding, where the composed kernel reads what the FPN's convolution would give one pixel
outside the map; that ring is computed from the map's outermost rows and columns (three-tap
convolutions of one row or column) and taken off.

Semantic FPN-S12 at 512x512: the FPN's finest level and the head's first convolution take 8.2
instead of 11.7 GMACs (6.9 of them in the folded FPN; 9.9 + 4.8 in the plain model).
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmseg.models.decode_heads import FPNHead
from torch import Tensor

from ..models.decode_heads.low_memory_heads import LowMemoryFPNHead
from .folded_fpn import (
    FPN_SETTINGS,
    FoldedFPN,
    add_parities,
    drop_padded_taps,
    weights_used_as_stored,
)

# Row parity 0 of a nearest-upsampled map sees coarse rows (i-1, i-1, i, i, i+1) under a 5-tap
# kernel's taps (-2 ... +2), parity 1 sees (i-1, i, i, i+1, i+1): taps on the same coarse row add
_FIVE_TAPS_ON_THREE_COARSE = ([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]],
                              [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]])


class ConvAppliedByNeck(nn.Conv2d):
    """A 3x3 convolution of a head whose kernel the neck applies (:class:`FoldedFPNWithHeadConv`):
    it passes its input through. Its parameters stay where they are, under the same names, so
    the state dict, ``.to()`` and refolding after a state dict is loaded work as before."""

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
    """Why the first convolution of ``head`` cannot be merged into the folded ``fpn`` (None if
    it can): ``head`` must be mmseg's ``FPNHead`` (or this project's ``LowMemoryFPNHead``) that
    reads the FPN's finest output once, through a first scale head that is only a 3x3
    convolution (its batch norm folded) and an activation; and merging must do fewer
    multiply-adds."""
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
            or list(conv_module.order).index('conv') != 0
            or conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1)
            or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != 'zeros'):
        return ("the head's first scale head is not one 3x3 convolution (norm folded) and an "
                'activation')
    # multiply-adds per output pixel: 25 taps on the backbone's channels and 9 coarse taps,
    # against the folded FPN's 9 and 4 and the head's 9 taps on the FPN's channels
    in_channels, channels = fpn.lateral_convs[0].conv.in_channels, fpn.out_channels
    if 25 * in_channels * conv.out_channels >= 9 * in_channels * channels + 4 * channels**2:
        return 'merging would not save multiply-adds with these channel counts'
    return None


class FoldedFPNWithHeadConv(FoldedFPN):
    """A :class:`FoldedFPN` whose finest output is already the Semantic FPN head's first
    convolution of it (before the activation); that convolution in the head passes its input
    through (:class:`ConvAppliedByNeck`). The model's predictions are the same up to rounding;
    the neck's finest output itself is not the FPN's but the head's convolution of it, so this
    is for a model whose only reader of that level is the head (see
    :func:`why_head_conv_not_mergeable`). Where :class:`FoldedFPN` computes the finest level the
    plain way, this applies the head's convolution to it.

    Args:
        folded_fpn (FoldedFPN): The folded neck; its modules are taken over.
        head_conv (nn.Conv2d): The head's convolution; its class becomes
            :class:`ConvAppliedByNeck`.
    """

    def __init__(self, folded_fpn: FoldedFPN, head_conv: nn.Conv2d):
        # not FoldedFPN.__init__: it checks and folds an upstream FPN, which folded_fpn has been
        nn.Module.__init__(self)
        for name in FPN_SETTINGS:
            setattr(self, name, getattr(folded_fpn, name))
        self.lateral_convs = folded_fpn.lateral_convs
        self.fpn_convs = folded_fpn.fpn_convs
        # a plain attribute: the head owns the module, its parameters and their state dict keys
        self.__dict__['_head_conv'] = head_conv
        head_conv.__class__ = ConvAppliedByNeck
        self._fold_finest_level()

    def _finest_level_parameters(self):
        conv = self._head_conv
        return super()._finest_level_parameters() + [
            p for p in (conv.weight, conv.bias) if p is not None]

    @torch.inference_mode(False)
    @torch.no_grad()
    def _fold_finest_level(self) -> None:
        lateral, output, head = (self.lateral_convs[0].conv, self.fpn_convs[0].conv,
                                 self._head_conv)
        # in float64, so that folding adds no rounding of its own
        lateral_weight = lateral.weight.double()[:, :, 0, 0]
        output_weight, head_weight = output.weight.double(), head.weight.double()
        zeros = lateral_weight.new_zeros
        lateral_bias = (lateral.bias.double() if lateral.bias is not None else
                        zeros(lateral.out_channels))
        output_bias = (output.bias.double() if output.bias is not None else
                       zeros(output.out_channels))
        head_bias = head.bias.double() if head.bias is not None else zeros(head.out_channels)
        dtype = head.weight.dtype
        previous = self._buffers.get('folded_weight')
        layout = (torch.channels_last if previous is not None and not previous.is_contiguous()
                  else torch.contiguous_format)
        composed = _compose(head_weight, output_weight)
        self.register_buffer(
            'folded_weight',
            torch.einsum('omyx,mc->ocyx', composed, lateral_weight).to(
                dtype, memory_format=layout), persistent=False)
        # what the lateral bias contributes through each of the 25 taps
        bias_taps = torch.einsum('omyx,m->oyx', composed, lateral_bias)
        self.register_buffer('bias_taps', bias_taps.to(dtype), persistent=False)
        # the FPN's bias is taken off with the rest of the ring outside the map (below)
        self.register_buffer(
            'folded_bias',
            (head_bias + torch.einsum('omyx,m->o', head_weight, output_bias)
             + bias_taps.sum((1, 2))).to(dtype), persistent=False)
        merge = [output_weight.new_tensor(rows) for rows in _FIVE_TAPS_ON_THREE_COARSE]
        self.register_buffer(
            'parity_weight',
            torch.cat([
                torch.einsum('ay,omyx,bx->omab', merge[row], composed, merge[col])
                for row in (0, 1) for col in (0, 1)
            ]).to(dtype, memory_format=layout), persistent=False)
        self._folded_from = self._parameter_versions()

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
        """The composed kernel reads the FPN's convolution one pixel outside the map, where the
        head's convolution reads zero padding: take what those pixels contribute off the
        border. Each is a three-tap convolution of the sum's outermost row or column; the four
        corners are counted with the rows."""
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
