"""mmdet's and mmseg's ``FPN`` in an inference form with fewer multiply-adds.

The finest level an FPN outputs is ``conv3x3(lateral1x1(x) + up2x(coarser))``, a linear map of
two inputs, computed term by term:

- ``conv3x3(lateral1x1(x))`` is one 3x3 convolution of ``x`` with the product of the two kernels,
  on the backbone's channels (64 in S12) instead of the FPN's (256). The lateral bias passes
  through the 3x3 kernel as a constant, except on the border, where the zero padding drops taps.
- ``conv3x3(up2x(coarser))``: an output pixel of a given row and column parity sees only 2x2
  distinct coarse pixels under its nine taps, so each of the four parities is a 2x2 convolution
  at the coarse resolution; the four run as one convolution and are added in interleaved.

Semantic FPN-S12 at 512x512: 6.9 instead of 9.9 GMACs for this level (10.3 instead of 13.4).
"""
import functools
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdet.models.necks import FPN as MMDetFPN
from mmseg.models.necks import FPN as MMSegFPN
from torch import Tensor

# The attributes of an FPN that its folded forms keep (besides its modules)
FPN_SETTINGS = ('in_channels', 'out_channels', 'num_outs', 'start_level', 'backbone_end_level',
                'add_extra_convs', 'relu_before_extra_convs', 'upsample_cfg')
# Row parity 0 of the upsampled map sees coarse rows (i-1, i, i) under a 3-tap kernel's taps (-1,
# 0, +1), parity 1 sees (i, i, i+1): the taps that read the same coarse row add up
_THREE_TAPS_ON_TWO_COARSE = ([[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]])


@functools.lru_cache(maxsize=256)
def _tap_regions(n: int, radius: int = 1) -> tuple:
    """The runs of a dimension of ``n`` pixels by which of a kernel's taps (-radius ... +radius)
    fall inside it: (pixels, 1 for each tap inside and 0 for each outside)."""
    regions = []
    for i in range(n):
        taps = tuple(int(0 <= i + tap < n) for tap in range(-radius, radius + 1))
        if regions and regions[-1][1] == taps:
            regions[-1] = (slice(regions[-1][0].start, i + 1), taps)
        else:
            regions.append((slice(i, i + 1), taps))
    return tuple(regions)


def drop_padded_taps(out: Tensor, bias_taps: Tensor) -> None:
    """``out`` counts a constant (a bias) under every tap of a square kernel, ``bias_taps``
    (channels, k, k) saying what each tap adds; on the border, the taps that fall on the zero
    padding read zeros instead, so their share is taken off in place."""
    radius = bias_taps.shape[-1] // 2
    for rows, row_taps in _tap_regions(out.shape[-2], radius):
        for cols, col_taps in _tap_regions(out.shape[-1], radius):
            dropped = [1 - r * c for r in row_taps for c in col_taps]
            if any(dropped):
                # elementwise, not a matrix product, which autocast would round to bf16
                share = (bias_taps.flatten(1) * bias_taps.new_tensor(dropped)).sum(1)
                out[:, :, rows, cols] -= share.view(1, -1, 1, 1).to(out.dtype)


def add_parities(out: Tensor, parities: Tensor, shifted: bool) -> None:
    """Add to each row and column parity of ``out`` (N, C, 2h, 2w), in the order (0, 0), (0, 1),
    (1, 0), (1, 1), its C channels of ``parities`` (N, 4C, h, w); ``shifted``: ``parities`` is
    (h + 1, w + 1) and parity (row, col) starts at coarse pixel (row, col)."""
    n, channels, height, width = out.shape
    coarse_height, coarse_width = height // 2, width // 2
    interleaved = out.view(n, channels, coarse_height, 2, coarse_width, 2)
    for index, (row, col) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        block = parities[:, index * channels:(index + 1) * channels]
        if shifted:
            block = block[:, :, row:row + coarse_height, col:col + coarse_width]
        interleaved[:, :, :, row, :, col] += block


def weights_used_as_stored(module: nn.Module) -> Optional[nn.Conv2d]:
    """The convolution of an mmcv ``ConvModule`` if it is a plain ``nn.Conv2d`` that convolves
    with its ``weight`` as stored, or None (``ConvWS``, spectral norm, other hooks)."""
    conv = getattr(module, 'conv', None)
    if (type(conv) is not nn.Conv2d or getattr(module, 'with_spectral_norm', False)
            or conv._forward_pre_hooks or conv._forward_hooks
            or hasattr(conv, 'parametrizations')):
        return None
    return conv


def plain_geometry(conv: nn.Conv2d, kernel_size: int, padding: int) -> bool:
    """Whether ``conv`` is a square convolution of this size and zero padding, stride 1."""
    return (conv.kernel_size == (kernel_size, ) * 2 and conv.stride == (1, 1)
            and conv.padding == (padding, ) * 2 and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == 'zeros')


def _plain_conv(module: nn.Module, kernel_size: int, padding: int) -> Optional[nn.Conv2d]:
    """The ``nn.Conv2d`` of an mmcv ``ConvModule`` that is only that convolution (stride 1, no
    norm, activation or padding layer), or None."""
    conv = weights_used_as_stored(module)
    if (conv is None or getattr(module, 'with_norm', True)
            or getattr(module, 'with_activation', True)
            or getattr(module, 'with_explicit_padding', True)
            or not plain_geometry(conv, kernel_size, padding)):
        return None
    return conv


def double_bias(conv: nn.Conv2d) -> Tensor:
    return (conv.bias.double() if conv.bias is not None else
            conv.weight.new_zeros(conv.out_channels, dtype=torch.float64))


class FoldedFPN(nn.Module):
    """The inference form of an mmdet or mmseg ``FPN`` (one :meth:`why_not_foldable` accepts):
    the same outputs up to rounding and the same state dict; the folded kernels are computed
    again when the finest level's weights change. The finest level is computed the plain way
    where it is not twice the next one's size, or under autograd with weights that need grads."""

    _parity_taps = _THREE_TAPS_ON_TWO_COARSE

    def __init__(self, fpn: nn.Module):
        super().__init__()
        reason = self.why_not_foldable(fpn)
        if reason:
            raise ValueError(f'FoldedFPN cannot fold this {type(fpn).__name__}: {reason}')
        self._take_over(fpn)

    def _take_over(self, fpn: nn.Module) -> None:
        for name in FPN_SETTINGS:
            setattr(self, name, getattr(fpn, name))
        self.upsample_cfg = dict(fpn.upsample_cfg)
        # the FPN's own modules under their own names: the state dict keys stay the FPN's
        self.lateral_convs = fpn.lateral_convs
        self.fpn_convs = fpn.fpn_convs
        self._fold_finest_level()

    @classmethod
    def why_not_foldable(cls, fpn: nn.Module) -> Optional[str]:
        """Why ``fpn`` has no folded form (or gains nothing from it), or None if it has."""
        if type(fpn) not in (MMDetFPN, MMSegFPN):  # a subclass may compute something else
            return f'{type(fpn).__name__} is not mmdet\'s or mmseg\'s FPN'
        if len(fpn.lateral_convs) < 2:
            return 'it uses a single backbone level (no top-down path to fold)'
        cfg = dict(fpn.upsample_cfg)
        if cfg.pop('mode', 'nearest') != 'nearest' or cfg.pop('scale_factor', 2) != 2 or cfg:
            return f'its upsampling {fpn.upsample_cfg} is not nearest by 2'
        lateral = _plain_conv(fpn.lateral_convs[0], kernel_size=1, padding=0)
        output = _plain_conv(fpn.fpn_convs[0], kernel_size=3, padding=1)
        if lateral is None or output is None:
            return ('its finest level has a norm, an activation or an unusual convolution '
                    'between the lateral and the output convolution')
        # multiply-adds per output pixel: 9 taps of the folded kernel on the backbone's channels
        # and 4 coarse taps, against the 1x1 lateral and 9 taps on the FPN's channels
        in_channels, channels = lateral.in_channels, lateral.out_channels
        if 9 * in_channels + 4 * channels >= in_channels + 9 * channels:
            return (f'its finest backbone level has {in_channels} channels, too many for the '
                    f'folded form to be cheaper than {channels}-channel taps')
        return None

    @classmethod
    def fold(cls, fpn: nn.Module) -> Optional['FoldedFPN']:
        """``fpn`` folded, or None when :meth:`why_not_foldable` says it cannot be."""
        return None if cls.why_not_foldable(fpn) else cls(fpn)

    def _finest_convs(self) -> List[nn.Conv2d]:
        return [self.lateral_convs[0].conv, self.fpn_convs[0].conv]

    def _finest_level_parameters(self) -> List[Tensor]:
        return [p for conv in self._finest_convs() for p in (conv.weight, conv.bias)
                if p is not None]

    def _parameter_versions(self) -> tuple:
        # _version counts in-place writes (load_state_dict copies in place); the rest catches
        # a parameter replaced by another tensor
        return tuple((p._version, p.data_ptr(), p.dtype, p.device)
                     for p in self._finest_level_parameters())

    def _kernel(self, output_weight: Tensor, output_bias: Tensor) -> tuple:
        """The kernel and bias (float64) applied to ``lateral1x1(x) + up2x(coarser)``."""
        return output_weight, output_bias

    # outside inference mode: buffers made in it could not be used where autograd records
    @torch.inference_mode(False)
    @torch.no_grad()
    def _fold_finest_level(self) -> None:
        convs = self._finest_convs()
        lateral, output = convs[:2]
        # in float64, so that folding adds no rounding of its own
        lateral_weight = lateral.weight.double()[:, :, 0, 0]
        kernel, bias = self._kernel(output.weight.double(), double_bias(output))
        dtype = convs[-1].weight.dtype
        # refolding keeps the layout the buffers were given (channels-last by --deploy)
        previous = self._buffers.get('folded_weight')
        layout = (torch.channels_last if previous is not None and not previous.is_contiguous()
                  else torch.contiguous_format)
        # what the lateral bias contributes through each tap
        bias_taps = torch.einsum('omyx,m->oyx', kernel, double_bias(lateral))
        # contiguous unless made channels-last: einsum's strides would make the output
        # channels-last, which mmcv's CPU RoIAlign misreads
        self.register_buffer(
            'folded_weight',
            torch.einsum('omyx,mc->ocyx', kernel, lateral_weight).to(dtype, memory_format=layout),
            persistent=False)
        self.register_buffer('folded_bias', (bias + bias_taps.sum((1, 2))).to(dtype),
                             persistent=False)
        self.register_buffer('bias_taps', bias_taps.to(dtype), persistent=False)
        merge = [kernel.new_tensor(rows) for rows in self._parity_taps]
        self.register_buffer(
            'parity_weight',
            torch.cat([
                torch.einsum('ay,omyx,bx->omab', merge[row], kernel, merge[col])
                for row in (0, 1) for col in (0, 1)
            ]).to(dtype, memory_format=layout),
            persistent=False)
        self._folded_from = self._parameter_versions()

    def _upsample(self, x: Tensor, size: torch.Size) -> Tensor:
        if 'scale_factor' in self.upsample_cfg:
            return F.interpolate(x, **self.upsample_cfg)
        return F.interpolate(x, size=size, **self.upsample_cfg)

    def _computes_folded(self, x: Tensor, coarser: Tensor) -> bool:
        """Whether the finest level is computed from the folded kernels (refolded if need be)."""
        (height, width), (coarse_height, coarse_width) = x.shape[-2:], coarser.shape[-2:]
        if ((height, width) != (2 * coarse_height, 2 * coarse_width)
                or torch.is_grad_enabled()
                and any(p.requires_grad for p in self._finest_level_parameters())):
            return False
        if self._parameter_versions() != self._folded_from:
            self._fold_finest_level()
        return True

    def _plain_finest_output(self, x: Tensor, coarser: Tensor) -> Tensor:
        lateral = self.lateral_convs[0](x)
        return self.fpn_convs[0](lateral + self._upsample(coarser, lateral.shape[2:]))

    def _finest_output(self, x: Tensor, coarser: Tensor) -> Tensor:
        if not self._computes_folded(x, coarser):
            return self._plain_finest_output(x, coarser)
        out = F.conv2d(x, self.folded_weight, self.folded_bias, padding=1)
        # coarse output (i + row, j + col) of a parity's 2x2 kernel covers coarse rows
        # i + row - 1 and i + row, which is what fine pixel (2i + row, 2j + col) sees
        add_parities(out, F.conv2d(F.pad(coarser, (1, 1, 1, 1)), self.parity_weight),
                     shifted=True)
        # the lateral bias is counted under all nine taps; on the border some read padding
        drop_padded_taps(out, self.bias_taps)
        return out

    def forward(self, inputs: Sequence[Tensor]) -> tuple:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f'the FPN takes {len(self.in_channels)} feature maps '
                             f'(in_channels={self.in_channels}), not {len(inputs)}')
        start = self.start_level
        # the top-down path of every level but the finest, as the FPN computes it
        laterals = [None] + [
            conv(inputs[start + i]) for i, conv in enumerate(self.lateral_convs) if i > 0
        ]
        for i in range(len(laterals) - 1, 1, -1):
            laterals[i - 1] = laterals[i - 1] + self._upsample(laterals[i],
                                                               laterals[i - 1].shape[2:])
        outs = [self._finest_output(inputs[start], laterals[1])]
        outs += [self.fpn_convs[i](laterals[i]) for i in range(1, len(laterals))]
        used_levels = len(laterals)
        if self.num_outs > used_levels:
            if not self.add_extra_convs:
                for _ in range(self.num_outs - used_levels):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                extra = self.add_extra_convs
                source = (inputs[self.backbone_end_level - 1] if extra == 'on_input' else
                          laterals[-1] if extra == 'on_lateral' else outs[-1])
                outs.append(self.fpn_convs[used_levels](source))
                for i in range(used_levels + 1, self.num_outs):
                    last = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](last))
        return tuple(outs)
