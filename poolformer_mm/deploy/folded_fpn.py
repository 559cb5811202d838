"""mmdet's and mmseg's ``FPN`` in an inference form with fewer multiply-adds.

The finest level an FPN outputs is ``conv3x3(lateral1x1(x) + up2x(coarser))``, with no norm or
activation in between: a linear map of two inputs, which can be computed more cheaply term by
term.

- ``conv3x3(lateral1x1(x))`` is one 3x3 convolution of ``x`` with the product of the two kernels.
  A PoolFormer's finest stage has fewer channels than the FPN (64 against 256 in S12), so this
  reads 64 channels per tap instead of 256. The lateral bias passes through the 3x3 kernel as a
  constant, except on the one-pixel border where the zero padding drops taps; that border is
  corrected separately.
- ``conv3x3(up2x(coarser))`` of a nearest-upsampled map: an output pixel of a given row and column
  parity sees only 2x2 distinct coarse pixels under its nine taps, so each of the four parities is
  a 2x2 convolution at the coarse resolution, 4 taps per output pixel instead of 9. The four
  parities run as one convolution with 4x the output channels and are added into the output
  interleaved.

Semantic FPN-S12 at 512x512: 6.9 instead of 9.9 GMACs for this level, and 10.3 instead of 13.4
for the whole neck.
"""
import functools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdet.models.necks import FPN as MMDetFPN
from mmseg.models.necks import FPN as MMSegFPN
from torch import Tensor

# A dimension of n pixels splits into runs of pixels by which of a kernel's taps (-radius ...
# +radius) fall inside it: (pixels, 1 for each tap inside and 0 for each outside).
_Region = Tuple[slice, Tuple[int, ...]]

# The attributes of an FPN that its folded forms keep (besides its modules)
FPN_SETTINGS = ('in_channels', 'out_channels', 'num_outs', 'start_level', 'backbone_end_level',
                'add_extra_convs', 'relu_before_extra_convs', 'upsample_cfg')


@functools.lru_cache(maxsize=256)
def _tap_regions(n: int, radius: int = 1) -> Tuple[_Region, ...]:
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
    """Add in place to each of the four row and column parities of ``out`` (N, C, 2h, 2w) its
    block of C channels of ``parities`` (N, 4C, h, w), in the order (0, 0), (0, 1), (1, 0),
    (1, 1); ``shifted``: ``parities`` is (h + 1, w + 1) and parity (row, col) starts at coarse
    pixel (row, col)."""
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
    with its ``weight`` as stored, or None: weight-standardised convolutions (``ConvWS``),
    spectral norm and other hooks or parametrizations recompute the weight in forward, so
    kernels derived from the stored weight would not match."""
    conv = getattr(module, 'conv', None)
    if (type(conv) is not nn.Conv2d or getattr(module, 'with_spectral_norm', False)
            or conv._forward_pre_hooks or conv._forward_hooks
            or hasattr(conv, 'parametrizations')):
        return None
    return conv


def _plain_conv(module: nn.Module, kernel_size: int, padding: int) -> Optional[nn.Conv2d]:
    """The ``nn.Conv2d`` of an mmcv ``ConvModule`` that is only that convolution (stride 1, no
    norm, activation or padding layer), or None."""
    conv = weights_used_as_stored(module)
    if (conv is None or getattr(module, 'with_norm', True)
            or getattr(module, 'with_activation', True)
            or getattr(module, 'with_explicit_padding', True)):
        return None
    if (conv.kernel_size != (kernel_size, ) * 2 or conv.stride != (1, 1)
            or conv.padding != (padding, ) * 2 or conv.dilation != (1, 1) or conv.groups != 1
            or conv.padding_mode != 'zeros'):
        return None
    return conv


class FoldedFPN(nn.Module):
    """The inference form of an mmdet or mmseg ``FPN``: the same outputs up to rounding, with
    its finest level computed as the module docstring explains. The folded kernels are not
    saved (the state dict is the FPN's own); they are computed again when the finest level's
    convolution weights change (a state dict loaded, an in-place edit). Coarser levels, the
    top-down path and the extra levels are computed as the FPN computes them. The finest level
    is computed the plain way where it is not exactly twice the next one's size, and under
    autograd when its convolutions' weights require gradients (so that they get them).

    Args:
        fpn (nn.Module): the ``FPN`` to fold; :meth:`why_not_foldable` must have said yes.

    Example:
        >>> from mmdet.models.necks import FPN
        >>> fpn = FPN([64, 128, 320, 512], 256, num_outs=4).eval()
        >>> folded = FoldedFPN.fold(fpn)
        >>> feats = [torch.rand(1, c, 64 // 2**i, 64 // 2**i) for i, c in
        ...          enumerate([64, 128, 320, 512])]
        >>> max((a - b).abs().max().item() for a, b in zip(fpn(feats), folded(feats))) < 1e-4
        True
    """

    def __init__(self, fpn: nn.Module):
        super().__init__()
        reason = self.why_not_foldable(fpn)
        if reason:
            raise ValueError(f'FoldedFPN cannot fold this {type(fpn).__name__}: {reason}')
        for name in FPN_SETTINGS:
            setattr(self, name, getattr(fpn, name))
        self.upsample_cfg = dict(fpn.upsample_cfg)
        # the FPN's own modules under their own names: the state dict keys stay the FPN's
        self.lateral_convs = fpn.lateral_convs
        self.fpn_convs = fpn.fpn_convs
        self._fold_finest_level()

    # ------------------------------------------------------------------------------ building
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

    def _finest_level_parameters(self) -> List[Tensor]:
        lateral, output = self.lateral_convs[0].conv, self.fpn_convs[0].conv
        return [p for p in (lateral.weight, lateral.bias, output.weight, output.bias)
                if p is not None]

    def _parameter_versions(self) -> tuple:
        # _version counts in-place writes (load_state_dict copies in place); the rest catches
        # a parameter replaced by another tensor
        return tuple((p._version, p.data_ptr(), p.dtype, p.device)
                     for p in self._finest_level_parameters())

    # outside inference mode: buffers made in it could not be used where autograd records
    @torch.inference_mode(False)
    @torch.no_grad()
    def _fold_finest_level(self) -> None:
        lateral = self.lateral_convs[0].conv
        output = self.fpn_convs[0].conv
        # in float64, so that folding adds no rounding of its own
        lateral_weight = lateral.weight.double()[:, :, 0, 0]
        output_weight = output.weight.double()
        lateral_bias = (lateral.bias.double() if lateral.bias is not None else
                        lateral_weight.new_zeros(lateral.out_channels))
        output_bias = (output.bias.double() if output.bias is not None else
                       lateral_weight.new_zeros(output.out_channels))
        dtype = output.weight.dtype
        # refolding keeps the layout the buffers were given (channels-last by --deploy)
        previous = self._buffers.get('folded_weight')
        layout = (torch.channels_last if previous is not None and not previous.is_contiguous()
                  else torch.contiguous_format)
        # what the lateral bias contributes through each of the nine taps
        bias_taps = torch.einsum('omyx,m->oyx', output_weight, lateral_bias)
        # contiguous unless made channels-last: einsum's strides would make the output
        # channels-last, which mmcv's CPU RoIAlign misreads
        self.register_buffer(
            'folded_weight',
            torch.einsum('omyx,mc->ocyx', output_weight,
                         lateral_weight).to(dtype, memory_format=layout),
            persistent=False)
        self.register_buffer('folded_bias', (output_bias + bias_taps.sum((1, 2))).to(dtype),
                             persistent=False)
        self.register_buffer('bias_taps', bias_taps.to(dtype), persistent=False)
        # Row parity 0 of the upsampled map sees coarse rows (i-1, i, i) under its taps (-1, 0,
        # +1), parity 1 sees (i, i, i+1): the taps that read the same coarse row add up.
        merge = (output_weight.new_tensor([[1, 0, 0], [0, 1, 1]]),
                 output_weight.new_tensor([[1, 1, 0], [0, 0, 1]]))
        self.register_buffer(
            'parity_weight',
            torch.cat([
                torch.einsum('ay,omyx,bx->omab', merge[row], output_weight, merge[col])
                for row in (0, 1) for col in (0, 1)
            ]).to(dtype, memory_format=layout),
            persistent=False)
        self._folded_from = self._parameter_versions()

    # ------------------------------------------------------------------------------- forward
    def _upsample(self, x: Tensor, size: torch.Size) -> Tensor:
        if 'scale_factor' in self.upsample_cfg:
            return F.interpolate(x, **self.upsample_cfg)
        return F.interpolate(x, size=size, **self.upsample_cfg)

    def _computes_folded(self, x: Tensor, coarser: Tensor) -> bool:
        """Whether the finest level is computed from the folded kernels (refolded first if the
        weights changed): when it is exactly twice the coarser level's size, and not under
        autograd with weights that need gradients."""
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
                source = {
                    'on_input': lambda: inputs[self.backbone_end_level - 1],
                    'on_lateral': lambda: laterals[-1],
                    'on_output': lambda: outs[-1],
                }[self.add_extra_convs]()
                outs.append(self.fpn_convs[used_levels](source))
                for i in range(used_levels + 1, self.num_outs):
                    last = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](last))
        return tuple(outs)
