"""Norms of the MetaFormer blocks, and GroupNorm(1) in the token layout of the fast path.

PoolFormer normalises with the paper's "modified layer norm": statistics over (C, H, W) of each
sample, i.e. GroupNorm with one group (``nn.GroupNorm(1, C)``, eps 1e-5, with bias). The MetaFormer
baselines use it without bias (:class:`ModifiedLayerNorm`, eps 1e-6) for parameter-free mixers
and a LayerNorm over the channels of each position (:class:`ChannelLayerNorm`) otherwise.

Because GroupNorm(1)'s statistics cover the whole sample, they do not depend on the memory layout:
the functions at the bottom compute them on (N, H, W, C) tokens or channels-last maps.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from torch import Tensor


class _ChannelAffineNorm(nn.Module):
    """Shared parameters of the two norms below: a per-channel weight and an optional bias."""

    def __init__(self, dim: int, eps: float = 1e-6, bias: bool = False):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def extra_repr(self) -> str:
        return f'{self.dim}, eps={self.eps}, bias={self.bias is not None}'


class ChannelLayerNorm(_ChannelAffineNorm):
    """LayerNorm over the channels of an NCHW tensor (each position normalised on its own).

    Args:
        dim (int): Channels.
        eps (float): Added to the variance. Default: 1e-6.
        bias (bool): Learn a per-channel bias. The MetaFormer baselines' blocks, stem and
            downsampling use none; their classifier's final norm (our last output norm) and
            PoolFormer's attention hybrids have one. Default: False.
    """

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (self.dim, ), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ModifiedLayerNorm(_ChannelAffineNorm):
    """PoolFormer's "modified layer norm": statistics over (C, H, W), i.e. GroupNorm with one
    group, and a per-channel affine. The MetaFormer baselines with parameter-free mixers
    (identity, random, pooling) use it without bias ("MLN without bias").

    Args:
        dim (int): Channels.
        eps (float): Added to the variance. Default: 1e-6.
        bias (bool): Learn a per-channel bias. Default: False.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, 1, self.weight, self.bias, self.eps)


# ---------------------------------------------------------------------------------- configs
def channel_norm_cfg(cfg: dict) -> dict:
    """The paper's meaning of mmcv's norm names on NCHW maps: 'LN' normalises each position over
    its channels (:class:`ChannelLayerNorm`, eps 1e-5, with bias) and 'GN' has one group unless
    told otherwise. Other configs pass through."""
    cfg = dict(cfg)
    if cfg.get('type') == 'LN':
        # mmcv's 'LN' is torch's LayerNorm over the last axis, i.e. the width of an NCHW map.
        cfg.update(type=ChannelLayerNorm, bias=True)
    elif cfg.get('type') == 'GN':
        cfg.setdefault('num_groups', 1)
    return cfg


def build_norm(cfg: dict, dim: int) -> nn.Module:
    """Build a norm for NCHW maps from an mmcv norm config (a class works as ``type``; mmcv
    then passes eps 1e-5 unless the config sets it).

    torch's LayerNorm is refused: on an NCHW tensor it normalises over the width.
    """
    norm = build_norm_layer(cfg, dim)[1]
    if isinstance(norm, nn.LayerNorm):
        raise ValueError(
            f"norm_cfg {dict(cfg)} builds torch's LayerNorm, which on an NCHW tensor normalises "
            'over the width, not the channels; use dict(type=ChannelLayerNorm, bias=True) '
            "(PoolFormer turns type='LN' into it)")
    return norm


def is_group_norm_1(module: nn.Module) -> bool:
    """True for ``nn.GroupNorm(1, C)`` with an affine map: the norm the token forms know."""
    return isinstance(module, nn.GroupNorm) and module.num_groups == 1 and module.affine


# ---------------------------------------------------------------------------------- token layout
def normalize_tokens(tokens: Tensor, eps: float) -> Tensor:
    """GroupNorm(1) without affine of (N, ...) tokens in any layout (statistics per sample)."""
    # Normalise the flat memory as one group: faster than layer_norm over three dims at batch 1.
    flat = tokens.reshape(tokens.shape[0], 1, -1)  # a view for the usual contiguous tokens
    return F.group_norm(flat, 1, eps=eps).view(tokens.shape)


# Elements per sample from which several multi-threaded reductions beat GroupNorm's single
# call (measured on a 2-core CPU with 2 threads: 2.8x faster at 2**20 and at 32x32x320,
# 1.3x at 16x16x512 = 2**17; with 1 thread as fast or faster from 2**17)
_THREADED_STATISTICS_MIN_SIZE = 1 << 17


def group_norm_1_moments(tokens: Tensor, eps: float) -> tuple:
    """Per-sample mean and ``1 / sqrt(var + eps)`` over all of (H, W, C), as GroupNorm(1) has."""
    n = tokens.shape[0]
    if tokens.device.type == 'cpu' and tokens[0].numel() >= _THREADED_STATISTICS_MIN_SIZE:
        # GroupNorm's CPU kernel runs on one thread per sample; these reductions use every
        # thread. They sum along each token's channels, then in fp64 across tokens: one sum
        # over a whole sample would lose digits.
        rows = tokens.reshape(n, -1, tokens.shape[-1])
        count = rows.shape[1] * rows.shape[2]
        mean = rows.sum(2).double().sum(1) / count
        mean_square = torch.linalg.vector_norm(rows, dim=2).double().square().sum(1) / count
        var = mean_square - mean.square()
        # E[x^2] - mean^2 cancels when |mean| >> std: such samples take GroupNorm's statistics
        # (reading this CPU flag costs no device synchronisation)
        if not bool((mean.square() > 100 * var).any()):
            inv_std = torch.rsqrt(var.clamp_min(0) + eps)
            return mean.to(tokens.dtype), inv_std.to(tokens.dtype)
    flat = tokens.reshape(n, 1, -1)
    if torch.is_grad_enabled() and tokens.requires_grad:
        # native_group_norm's mean and rstd outputs carry no gradient; these do
        precision = torch.promote_types(tokens.dtype, torch.float32)
        var, mean = torch.var_mean(flat.reshape(n, -1).to(precision), dim=1, correction=0)
        return mean.to(tokens.dtype), torch.rsqrt(var + eps).to(tokens.dtype)
    _, mean, inv_std = torch.native_group_norm(flat, None, None, n, 1, flat.shape[-1], 1, eps)
    return mean.view(n).to(tokens.dtype), inv_std.view(n).to(tokens.dtype)


def group_norm_1_channels_last(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """``norm(x)`` for a GroupNorm(1) with affine and a channels-last NCHW map; stays
    channels-last (one pass, over the tokens' innermost channels)."""
    n, channels = x.shape[:2]
    tokens = x.permute(0, 2, 3, 1)
    mean, inv_std = group_norm_1_moments(tokens, norm.eps)
    scale = norm.weight * inv_std[:, None]  # (N, C)
    shift = norm.bias - scale * mean[:, None]
    out = torch.addcmul(shift.view(n, 1, 1, channels), tokens, scale.view(n, 1, 1, channels))
    return out.permute(0, 3, 1, 2)


def group_norm_1_to_nchw(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """``norm(x)`` for a GroupNorm(1) with affine and an NCHW map in any memory layout (a
    token-layout stage hands over a channels-last one); returns contiguous NCHW."""
    n, channels, height, width = x.shape
    if (x.device.type == 'cpu' and channels <= 128
            and x.is_contiguous(memory_format=torch.channels_last)
            and not (torch.is_grad_enabled() and x.requires_grad)):
        # Necks and heads expect contiguous NCHW, and a CPU converts channels-last slowly
        # (about 2.5 GB/s). For few channels a batched product with diag(weight / std) does the
        # conversion and the normalisation in one pass: 4x faster for 64 channels at 128x128.
        mean, inv_std = group_norm_1_moments(x.permute(0, 2, 3, 1), norm.eps)
        scale = norm.weight * inv_std[:, None]  # (N, C)
        shift = norm.bias - scale * mean[:, None]
        tokens = x.permute(0, 2, 3, 1).reshape(n, height * width, channels)
        out = torch.baddbmm(shift[:, :, None], torch.diag_embed(scale), tokens.transpose(1, 2))
        return out.view(n, channels, height, width)
    # otherwise convert first, so that one group_norm kernel normalises and applies the affine
    return F.group_norm(x.contiguous(), 1, norm.weight, norm.bias, norm.eps)
