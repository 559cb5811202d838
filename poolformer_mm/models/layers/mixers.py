"""Token mixers: the part of a MetaFormer block that exchanges information between positions.

Each mixer is a small module that maps an ``(N, C, H, W)`` tensor to one of the same shape, so a
:class:`~poolformer_mm.models.layers.MetaFormerBlock` can take any of them. One registry,
``TOKEN_MIXERS``, names them all; :func:`build_token_mixer` builds one from a name or a dict:

* the PoolFormer paper's ablations (Table 5): 'pool', 'identity', 'dwconv', 'attn',
  'spatial_fc' and 'random';
* the MetaFormer baselines (arXiv 2210.13452): 'identity' (IdentityFormer), 'random'
  (RandFormer), 'pool' (PoolFormerV2), 'sepconv' (ConvFormer), 'attention' (CAFormer).

'attn' is a preset of 'attention' (``TOKEN_MIXER_PRESETS``): the paper's hybrids used timm's ViT
attention, which has a bias on the output projection; CAFormer's has none.

Behaviour at input sizes other than the pre-training one (224x224), which is every size in
detection and segmentation:

* 'pool', 'identity', 'dwconv', 'sepconv', 'attention': nothing to adapt; they work on any token
  grid. (The position embedding of PoolFormer's attention hybrids is resized by its stage, see
  :class:`~poolformer_mm.models.layers.PositionEmbedding`.)
* 'spatial_fc': its learned ``[HW, HW]`` matrix belongs to one token grid; at another grid it is
  resized (default) or the mixer raises a ValueError naming the grid it expects.
* 'random': the frozen random matrix is resized and its rows renormalised.

The two matrix mixers hold ``(H*W)**2`` entries for an ``H x W`` token grid, so they suit the last
stages only at detection sizes: stage 4 of a 1333x800 image has a 25x42 grid (1.1 M entries), but
stage 1 has 200x333 (4.4 G entries). The paper's all-stage random ablation is a classifier model.
"""
import inspect
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .activations import StarReLU

# Token grids from which the depthwise-convolution form of pooling beats the pooling kernel in
# inference (measured on a CPU, 1 thread: 2.5x faster at 64x64 and 128x128, slower at 16x16,
# where its fixed cost for the borders dominates)
_CONV_POOLING_MIN_TOKENS = 64 * 64


class PoolingMixer(nn.Module):
    """PoolFormer's token mixer: ``avg_pool(x) - x``, with no parameters.

    The input is subtracted because the block already adds it back through the residual branch.
    Padding is excluded from the average (``count_include_pad=False``), so border positions average
    only over real neighbours; the pooling of a constant is then that constant, which lets the
    token-layout forms fold the norm's affine map past this mixer.

    Args:
        dim (int): Channels (unused; kept so every mixer has the same constructor).
        pool_size (int): Pooling window, odd. Default: 3.
    """

    def __init__(self, dim: int, pool_size: int = 3):
        super().__init__()
        if pool_size % 2 != 1:
            raise ValueError('pool_size must be odd so the output keeps the input size, got '
                             f'{pool_size}')
        self.pool_size = pool_size

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.avg_pool2d(x, self.pool_size, stride=1, padding=self.pool_size // 2,
                              count_include_pad=False)
        return pooled - x

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        """The same on (N, H, W, C) tokens: pooling on their channels-last view (about 6x faster
        than on NCHW on a CPU); permuting back is free."""
        x = tokens.permute(0, 3, 1, 2)
        radius = self.pool_size // 2
        height, width = x.shape[2:]
        if (tokens.device.type == 'cpu' and height * width >= _CONV_POOLING_MIN_TOKENS
                and radius > 0 and min(height, width) > 2 * radius
                and not (torch.is_grad_enabled() and tokens.requires_grad)):
            return self._pool_minus_identity_by_conv(x).permute(0, 2, 3, 1)
        pooled = F.avg_pool2d(x, self.pool_size, stride=1, padding=radius,
                              count_include_pad=False)
        return pooled.permute(0, 2, 3, 1) - tokens

    def _pool_minus_identity_by_conv(self, x: Tensor) -> Tensor:
        """``pool(x) - x`` in one depthwise convolution (kernel ``1/k^2``, centre minus 1), which
        is exact away from the borders, then the border rows and columns, where the window
        averages only its part inside the map, from the pooling of thin strips. On a
        channels-last map about 2.5x faster than pooling and subtracting (CPU, 1 thread, 64x64
        maps and larger); inference only: its backward is slower."""
        k, radius = self.pool_size, self.pool_size // 2
        channels, height, width = x.shape[1:]
        key = (channels, x.dtype, x.device)
        cache = self.__dict__.setdefault('_conv_kernels', {})  # outside the state dict
        if key not in cache:
            kernel = torch.full((channels, 1, k, k), 1.0 / k**2, dtype=x.dtype, device=x.device)
            kernel[:, :, radius, radius] -= 1
            cache[key] = kernel
        out = F.conv2d(x, cache[key], padding=radius, groups=channels)
        # a border row's window reaches 2 * radius rows into the map: pool that strip
        edge, everything = 2 * radius, slice(None)
        for strip_index, border_index in (
                ((everything, everything, slice(0, edge)), (everything, everything,
                                                            slice(0, radius))),
                ((everything, everything, slice(height - edge, None)),
                 (everything, everything, slice(radius, None))),
                ((everything, everything, everything, slice(0, edge)),
                 (everything, everything, everything, slice(0, radius))),
                ((everything, everything, everything, slice(width - edge, None)),
                 (everything, everything, everything, slice(radius, None)))):
            strip = x[strip_index]
            pooled = F.avg_pool2d(strip, k, stride=1, padding=radius, count_include_pad=False)
            out[strip_index][border_index] = pooled[border_index] - strip[border_index]
        return out

    def extra_repr(self) -> str:
        return f'pool_size={self.pool_size}'


class IdentityMixer(nn.Module):
    """No token mixing at all (the paper's "identity" ablation, IdentityFormer)."""

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


class SepConv(nn.Module):
    """ConvFormer's token mixer, the inverted separable convolution of MobileNetV2:
    pointwise expansion, StarReLU, depthwise ``kernel_size`` conv, pointwise projection.
    No biases: each is followed by a norm or a residual sum that makes them redundant.

    Args:
        dim (int): Channels.
        expansion_ratio (float): Width of the depthwise conv relative to ``dim``. Default: 2.
        kernel_size (int): Odd depthwise kernel size. Default: 7.
    """

    def __init__(self, dim: int, expansion_ratio: float = 2, kernel_size: int = 7):
        super().__init__()
        hidden = int(expansion_ratio * dim)
        self.pwconv1 = nn.Conv2d(dim, hidden, 1, bias=False)
        self.act1 = StarReLU()
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2,
                                groups=hidden, bias=False)
        self.pwconv2 = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.pwconv2(self.dwconv(self.act1(self.pwconv1(x))))


class Attention(nn.Module):
    """Multi-head self-attention over all positions (CAFormer's last two stages, and the
    PoolFormer paper's attention hybrids as the 'attn' preset).

    The number of heads follows from a fixed head width, so wider stages get more heads. The
    weights have the names of the public checkpoints, ``qkv`` and ``proj``.

    Args:
        dim (int): Channels.
        head_dim (int): Width of each head. Default: 32.
        qkv_bias (bool): Bias on the query/key/value projection. Default: False.
        proj_bias (bool): Bias on the output projection. Default: False.
    """

    def __init__(self, dim: int, head_dim: int = 32, qkv_bias: bool = False,
                 proj_bias: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = max(dim // head_dim, 1)
        inner_dim = self.num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner_dim, bias=qkv_bias)
        self.proj = nn.Linear(inner_dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).reshape(n, h * w, 3, self.num_heads,
                                           self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        out = self.proj(out.transpose(1, 2).reshape(n, h * w, -1))
        return out.transpose(1, 2).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, head_dim={self.head_dim}'


# ---------------------------------------------------------------------------------- matrix mixers
def resize_token_matrix(matrix: Tensor, base_size: Tuple[int, int],
                        size: Tuple[int, int]) -> Tensor:
    """Resize a ``[h0*w0, h0*w0]`` token-mixing matrix to a ``(h, w)`` token grid.

    Entry ``[p, q]`` says how much output position ``p`` takes from input position ``q``; both
    index a 2-D grid, so the matrix is resized bilinearly over each index pair in turn: first the
    positions it reads from (each row is an ``h0 x w0`` map), then the positions it writes to.
    The total weight of a row is not adjusted here: resizing the read-from pair multiplies it by
    about ``(h*w) / (h0*w0)``, and callers decide how to correct that.

    Args:
        matrix (Tensor): ``[h0*w0, h0*w0]`` matrix.
        base_size (tuple[int, int]): Grid ``(h0, w0)`` the matrix belongs to.
        size (tuple[int, int]): Target grid ``(h, w)``.

    Returns:
        Tensor: ``[h*w, h*w]`` matrix.
    """
    (h0, w0), (h, w) = base_size, size
    # Read-from pair: each row is an (h0, w0) map.
    matrix = F.interpolate(matrix.reshape(h0 * w0, 1, h0, w0), size=(h, w), mode='bilinear',
                           align_corners=False)
    # Write-to pair: each read-from position becomes a channel over the (h0, w0) output grid.
    matrix = matrix.reshape(h0, w0, h * w).permute(2, 0, 1).unsqueeze(0)
    matrix = F.interpolate(matrix, size=(h, w), mode='bilinear', align_corners=False)
    return matrix.reshape(h * w, h * w).t()


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class SpatialFC(nn.Module):
    """The paper's "spatial FC" ablation: a learned ``[HW, HW]`` matrix, shared by all channels,
    mixes the tokens of a fixed grid (no bias, as in the official hybrids).

    The matrix is tied to the token grid of the pre-training input (``base_size``: 14x14 in stage
    3 and 7x7 in stage 4 at 224x224). Dense prediction feeds other sizes, so:

    * ``interpolate=True`` (default): the matrix is resized to the input's grid with
      :func:`resize_token_matrix` and multiplied by ``(h0*w0) / (h*w)``. A resized row then gives
      the same total weight to the new grid as the original row gave to the old one, so the
      mixer's response to a constant map is unchanged (a matrix that averages still averages).
      The resized matrix has ``(h*w)**2`` entries and is recomputed each forward (gradients flow
      to the learned one), so memory grows with the fourth power of the input side; that is
      acceptable in the last stages (a 1333x800 image gives 50x84 and 25x42 grids there).
    * ``interpolate=False``: any other grid raises a ValueError naming the expected one, for
      models that must see exactly what they were trained on.

    Args:
        dim (int): Channels (unused; every mixer takes it).
        base_size (int | tuple[int, int]): Token grid ``(h, w)`` the matrix belongs to.
            Default: (14, 14).
        interpolate (bool): Resize the matrix for other grids instead of raising. Default: True.
    """

    def __init__(self, dim: int, base_size: Union[int, Sequence[int]] = (14, 14),
                 interpolate: bool = True):
        super().__init__()
        self.base_size = _pair(base_size)
        self.interpolate = interpolate
        num_tokens = self.base_size[0] * self.base_size[1]
        # A Linear over the token axis, so the official checkpoints' ``token_mixer.fc.weight`` fits.
        self.fc = nn.Linear(num_tokens, num_tokens, bias=False)

    def mixing_matrix(self, size: Tuple[int, int]) -> Tensor:
        """The ``[h*w, h*w]`` mixing matrix for a token grid of ``size = (h, w)``."""
        if tuple(size) == self.base_size:
            return self.fc.weight
        h0, w0 = self.base_size
        if not self.interpolate:
            raise ValueError(
                f'spatial_fc mixes a fixed {h0}x{w0} token grid (its [{h0 * w0}, {h0 * w0}] '
                f'matrix was built for it) but got a {size[0]}x{size[1]} grid; feed inputs of '
                'the pre-training size, or build the mixer with interpolate=True to resize the '
                'matrix')
        scale = (h0 * w0) / (size[0] * size[1])
        return resize_token_matrix(self.fc.weight, self.base_size, size) * scale

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        matrix = self.mixing_matrix((h, w))
        return F.linear(x.reshape(n, c, h * w), matrix).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f'base_size={self.base_size}, interpolate={self.interpolate}'


class RandomMixing(nn.Module):
    """A fixed random row-stochastic ``[HW, HW]`` matrix mixes positions (RandFormer's token
    mixer, and the PoolFormer paper's "global random matrix" ablation).

    The matrix is ``softmax(uniform noise)`` over each row, drawn once for the token grid of the
    pre-training input (``base_size``, 14x14 and 7x7 at 224) and never trained; it is a persistent
    buffer, so checkpoints carry it and no optimizer or ``requires_grad_`` call can change it.

    At another grid size (any other input size in detection / segmentation) the matrix is resized
    with :func:`resize_token_matrix`, as :class:`SpatialFC`'s, and each row is renormalised to
    sum to 1: resizing the read-from pair changes a row's total mass by the ratio of token counts,
    and renormalising keeps the mixer a weighted average of tokens, as it was at the base size.

    Args:
        dim (int): Channels (unused; every mixer takes it).
        base_size (int | tuple[int, int]): Token grid ``(h, w)`` the matrix belongs to.
            Default: (14, 14).
    """

    def __init__(self, dim: int, base_size: Union[int, Sequence[int]] = (14, 14)):
        super().__init__()
        self.base_size = _pair(base_size)
        num_tokens = self.base_size[0] * self.base_size[1]
        self.register_buffer('random_matrix',
                             torch.softmax(torch.rand(num_tokens, num_tokens), dim=-1))

    def mixing_matrix(self, size: Tuple[int, int]) -> Tensor:
        """The ``[h*w, h*w]`` mixing matrix for a token grid of ``size = (h, w)``."""
        if tuple(size) == self.base_size:
            return self.random_matrix
        matrix = resize_token_matrix(self.random_matrix, self.base_size, size)
        # Bilinear weights are non-negative and the softmax entries positive, so no row sums to 0.
        return matrix / matrix.sum(dim=-1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        matrix = self.mixing_matrix((h, w)).to(x.dtype)
        return (x.reshape(n, c, h * w) @ matrix.t()).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f'base_size={self.base_size}'


# ---------------------------------------------------------------------------------- registry
TOKEN_MIXERS: Dict[str, Callable[..., nn.Module]] = {
    'identity': IdentityMixer,
    'pool': PoolingMixer,
    'dwconv': DepthwiseConvMixer,
    'sepconv': SepConv,
    'attention': Attention,
    'spatial_fc': SpatialFC,
    'random': RandomMixing,
}
# A preset is a registered mixer with other defaults (the config's own arguments win).
TOKEN_MIXER_PRESETS: Dict[str, dict] = {
    # the PoolFormer paper's hybrids: timm's ViT attention, with a bias on the output projection
    'attn': dict(type='attention', proj_bias=True),
}


def token_mixer_cfg(cfg: Union[str, dict]) -> dict:
    """A mixer name or dict as a dict whose ``type`` is a key of ``TOKEN_MIXERS``: a preset
    becomes its mixer with the preset's arguments."""
    cfg = dict(type=cfg) if isinstance(cfg, str) else dict(cfg)
    preset = TOKEN_MIXER_PRESETS.get(cfg.get('type'))
    if preset is not None:
        cfg = {**preset, **{k: v for k, v in cfg.items() if k != 'type'}}
    if cfg.get('type') not in TOKEN_MIXERS:
        names = sorted([*TOKEN_MIXERS, *TOKEN_MIXER_PRESETS])
        raise KeyError(f"unknown token mixer {cfg.get('type')!r}; choose one of {names}")
    return cfg


def build_token_mixer(cfg: Union[str, dict], dim: int,
                      token_grid: Optional[Sequence[int]] = None) -> nn.Module:
    """Build a token mixer from a name (``'pool'``) or a dict (``dict(type='pool', pool_size=5)``).

    Args:
        cfg (str | dict): A name from ``TOKEN_MIXERS`` or ``TOKEN_MIXER_PRESETS``, or a dict with
            ``type`` and the mixer's arguments.
        dim (int): Channels.
        token_grid (Sequence[int], optional): Token grid ``(h, w)`` of this stage at the
            pre-training input size. Mixers tied to a grid ('spatial_fc', 'random': any whose
            constructor takes ``base_size``) get it as ``base_size`` unless ``cfg`` sets one.
            Default: None.
    """
    cfg = token_mixer_cfg(cfg)
    mixer = TOKEN_MIXERS[cfg.pop('type')]
    if token_grid is not None and 'base_size' in inspect.signature(mixer).parameters:
        cfg.setdefault('base_size', tuple(token_grid))
    return mixer(dim, **cfg)
