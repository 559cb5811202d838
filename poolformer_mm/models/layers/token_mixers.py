"""Token mixers: the part of a MetaFormer block that exchanges information between positions.

Each mixer is a small module that maps an ``(N, C, H, W)`` tensor to one of the same shape, so a
:class:`~poolformer_mm.models.layers.MetaFormerBlock` can take any of them.
"""
from typing import Callable, Dict, Union

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class PoolingMixer(nn.Module):
    """PoolFormer's token mixer: ``avg_pool(x) - x``, with no parameters.

    The input is subtracted because the block already adds it back through the residual branch.
    Padding is excluded from the average (``count_include_pad=False``), so border positions average
    only over real neighbours.

    Args:
        dim (int): Channels (unused; kept so every mixer has the same constructor).
        pool_size (int): Pooling window, odd. Default: 3.
    """

    def __init__(self, dim: int, pool_size: int = 3):
        super().__init__()
        if pool_size % 2 != 1:
            raise ValueError(f'pool_size must be odd so the output keeps the input size, got {pool_size}')
        self.pool_size = pool_size

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.avg_pool2d(x, self.pool_size, stride=1, padding=self.pool_size // 2,
                              count_include_pad=False)
        return pooled - x

    def extra_repr(self) -> str:
        return f'pool_size={self.pool_size}'


class IdentityMixer(nn.Module):
    """No token mixing at all (the paper's "identity" ablation)."""

    def __init__(self, dim: int, **kwargs):
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return x


class DepthwiseConvMixer(nn.Module):
    """Depthwise convolution as token mixer (the paper's ablation that reached 78.1 top-1 on S12).

    Args:
        dim (int): Channels.
        kernel_size (int): Odd kernel size. Default: 3.
    """

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


TOKEN_MIXERS: Dict[str, Callable[..., nn.Module]] = {
    'pool': PoolingMixer,
    'identity': IdentityMixer,
    'dwconv': DepthwiseConvMixer,
}


def build_token_mixer(cfg: Union[str, dict], dim: int) -> nn.Module:
    """Build a token mixer from a name (``'pool'``) or a dict (``dict(type='pool', pool_size=5)``)."""
    cfg = dict(type=cfg) if isinstance(cfg, str) else dict(cfg)
    name = cfg.pop('type')
    if name not in TOKEN_MIXERS:
        raise KeyError(f"unknown token mixer '{name}'; choose one of {sorted(TOKEN_MIXERS)}")
    return TOKEN_MIXERS[name](dim, **cfg)
