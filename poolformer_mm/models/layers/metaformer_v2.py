"""Building blocks of the MetaFormer baselines (arXiv 2210.13452): IdentityFormer, RandFormer,
PoolFormerV2, ConvFormer and CAFormer.

Everything here works on ``(N, C, H, W)`` tensors, so one block class serves every token mixer;
the attention mixer flattens to tokens internally. Compared with the v1 blocks in
:mod:`.metaformer`, the v2 recipe changes four things: StarReLU instead of GELU, norms without a
bias (eps 1e-6), bias-free MLPs, and a residual scale ("res scale") in the last two stages instead
of a layer scale on the branch.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from torch import Tensor

from .metaformer import ChannelScale, ConvMlp
from .token_mixers import IdentityMixer, PoolingMixer


# ------------------------------------------------------------------------------ activation
class StarReLU(nn.Module):
    """``s * relu(x) ** 2 + b`` with a learnable scalar scale ``s`` and bias ``b``.

    The paper derives it from squared ReLU: the scale and bias re-centre and re-scale the output
    so its distribution matches that of the input, which squared ReLU alone does not.

    Args:
        scale_value (float): Initial ``s``. Default: 1.0.
        bias_value (float): Initial ``b``. Default: 0.0.
    """

    def __init__(self, scale_value: float = 1.0, bias_value: float = 0.0):
        super().__init__()
        # Shape [1] rather than a 0-d tensor: it is the shape in the public checkpoints.
        self.scale = nn.Parameter(torch.full((1, ), float(scale_value)))
        self.bias = nn.Parameter(torch.full((1, ), float(bias_value)))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.relu(x).square() + self.bias


# ------------------------------------------------------------------------------ norms
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
        bias (bool): Learn a per-channel bias. The v2 blocks, stem and downsampling use none;
            the classifier's final norm (our last output norm) has one. Default: False.
    """

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (self.dim, ), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ModifiedLayerNorm(_ChannelAffineNorm):
    """PoolFormer's "modified layer norm": statistics over (C, H, W), i.e. GroupNorm with one
    group, and a per-channel affine. The v2 archs with parameter-free mixers (identity, random,
    pooling) use it without bias ("MLN without bias").

    Args:
        dim (int): Channels.
        eps (float): Added to the variance. Default: 1e-6.
        bias (bool): Learn a per-channel bias. Default: False.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, 1, self.weight, self.bias, self.eps)


NORM_LAYERS: Dict[str, Callable[..., nn.Module]] = {
    'layer': ChannelLayerNorm,
    'mln': ModifiedLayerNorm,
}


# ------------------------------------------------------------------------------ stem / downsampling
class Stem(nn.Module):
    """Conv 7x7 / stride 4 / padding 2 (with bias), then a channel LayerNorm without bias."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 7, stride=4, padding=2)
        self.norm = ChannelLayerNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class Downsampling(nn.Module):
    """Channel LayerNorm without bias, then conv 3x3 / stride 2 / padding 1 (with bias).

    The norm comes first because the stage before ends on an un-normalised residual stream.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = ChannelLayerNorm(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.norm(x))


# ------------------------------------------------------------------------------ token mixers
class RandomMixing(nn.Module):
    """RandFormer's token mixer: a fixed random row-stochastic ``[HW, HW]`` matrix mixes positions.

    The matrix is ``softmax(uniform noise)`` over each row, drawn once for the token grid of the
    pre-training input (``base_size``, 14x14 and 7x7 at 224) and never trained; it is a persistent
    buffer, so checkpoints carry it and no optimizer or ``requires_grad_`` call can change it.

    At another grid size (any other input size in detection / segmentation) the matrix is resized
    bilinearly over both of its spatial index pairs: first over the positions it reads from, then
    over the positions it writes to. Each row is then renormalised to sum to 1, because resizing
    the read-from pair changes a row's total mass by the ratio of token counts; renormalising keeps
    the mixer a weighted average of tokens, as it was at the base size. The resized matrix has
    ``(H*W)**2`` entries, so memory grows with the fourth power of the input side.

    Args:
        dim (int): Channels (unused; every mixer takes it).
        base_size (tuple[int, int]): Token grid ``(h, w)`` the matrix belongs to. Default: (14, 14).
    """

    def __init__(self, dim: int, base_size: Union[int, Sequence[int]] = (14, 14)):
        super().__init__()
        if isinstance(base_size, int):
            base_size = (base_size, base_size)
        self.base_size = tuple(int(s) for s in base_size)
        num_tokens = self.base_size[0] * self.base_size[1]
        self.register_buffer('random_matrix',
                             torch.softmax(torch.rand(num_tokens, num_tokens), dim=-1))

    def mixing_matrix(self, size: Tuple[int, int]) -> Tensor:
        """The ``[h*w, h*w]`` mixing matrix for a token grid of ``size = (h, w)``."""
        h, w = size
        if (h, w) == self.base_size:
            return self.random_matrix
        h0, w0 = self.base_size
        matrix = self.random_matrix
        # Read-from index pair: rows are a batch of (h0, w0) maps.
        matrix = matrix.reshape(h0 * w0, 1, h0, w0)
        matrix = F.interpolate(matrix, size=(h, w), mode='bilinear', align_corners=False)
        # Write-to index pair: each read-from position becomes a channel over the (h0, w0) grid.
        matrix = matrix.reshape(h0, w0, h * w).permute(2, 0, 1).unsqueeze(0)
        matrix = F.interpolate(matrix, size=(h, w), mode='bilinear', align_corners=False)
        matrix = matrix.reshape(h * w, h * w).t()
        # Bilinear weights are non-negative and the softmax entries positive, so no row sums to 0.
        return matrix / matrix.sum(dim=-1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        matrix = self.mixing_matrix((h, w)).to(x.dtype)
        return (x.reshape(n, c, h * w) @ matrix.t()).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f'base_size={self.base_size}'


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
    """Multi-head self-attention over all positions (CAFormer's last two stages).

    The number of heads follows from a fixed head width, so wider stages get more heads.

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


V2_TOKEN_MIXERS: Dict[str, Callable[..., nn.Module]] = {
    'identity': IdentityMixer,
    'pool': PoolingMixer,
    'random': RandomMixing,
    'sepconv': SepConv,
    'attention': Attention,
}


def build_v2_token_mixer(cfg: Union[str, dict], dim: int) -> nn.Module:
    """Build a v2 token mixer from a name (``'sepconv'``) or a dict (``dict(type='pool',
    pool_size=5)``)."""
    cfg = dict(type=cfg) if isinstance(cfg, str) else dict(cfg)
    name = cfg.pop('type')
    if name not in V2_TOKEN_MIXERS:
        raise KeyError(f"unknown MetaFormer token mixer '{name}'; choose one of "
                       f'{sorted(V2_TOKEN_MIXERS)}')
    return V2_TOKEN_MIXERS[name](dim, **cfg)


# ------------------------------------------------------------------------------ block
class MetaFormerV2Block(nn.Module):
    """One MetaFormer v2 block with a swappable token mixer.

    ``x = res_scale1(x) + drop_path(layer_scale1(token_mixer(norm1(x))))``
    ``x = res_scale2(x) + drop_path(layer_scale2(mlp(norm2(x))))``

    A res scale multiplies the shortcut rather than the branch; the paper found it trains deep
    stages more stably than a layer scale. Either scale is an identity when its init is None.

    Args:
        dim (int): Channels.
        token_mixer (nn.Module): Any module mapping (N, C, H, W) to the same shape.
        norm (str): 'layer' (channel LayerNorm) or 'mln' (modified layer norm), both without bias.
            Default: 'layer'.
        mlp_ratio (float): Hidden width of the MLP relative to ``dim``. Default: 4.
        drop_path (float): Stochastic depth rate of both residual branches. Default: 0.
        layer_scale_init_value (float, optional): Initial layer scale; None disables it.
            Default: None.
        res_scale_init_value (float, optional): Initial res scale; None disables it.
            Default: None.
    """

    def __init__(self,
                 dim: int,
                 token_mixer: nn.Module,
                 norm: str = 'layer',
                 mlp_ratio: float = 4.,
                 drop_path: float = 0.,
                 layer_scale_init_value: Optional[float] = None,
                 res_scale_init_value: Optional[float] = None):
        super().__init__()
        if norm not in NORM_LAYERS:
            raise KeyError(f"unknown MetaFormer norm '{norm}'; choose one of {sorted(NORM_LAYERS)}")
        norm_layer = NORM_LAYERS[norm]
        self.norm1 = norm_layer(dim)
        self.token_mixer = token_mixer
        self.layer_scale1 = self._scale(dim, layer_scale_init_value)
        self.res_scale1 = self._scale(dim, res_scale_init_value)
        self.norm2 = norm_layer(dim)
        # A class as ``type`` lets mmcv build StarReLU without a global registry entry.
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_cfg=dict(type=StarReLU), bias=False)
        self.layer_scale2 = self._scale(dim, layer_scale_init_value)
        self.res_scale2 = self._scale(dim, res_scale_init_value)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @staticmethod
    def _scale(dim: int, init_value: Optional[float]) -> nn.Module:
        return nn.Identity() if init_value is None else ChannelScale(dim, init_value)

    def forward(self, x: Tensor) -> Tensor:
        x = self.res_scale1(x) + self.drop_path(self.layer_scale1(self.token_mixer(self.norm1(x))))
        x = self.res_scale2(x) + self.drop_path(self.layer_scale2(self.mlp(self.norm2(x))))
        return x
