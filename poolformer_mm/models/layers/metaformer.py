"""The generic MetaFormer block and the convolutional patch embedding PoolFormer uses."""
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmcv.cnn.bricks import DropPath
from mmengine.model.weight_init import trunc_normal_init
from torch import Tensor


class ConvPatchEmbed(nn.Module):
    """A strided convolution that changes resolution and width (stem and between stages).

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int): Kernel size.
        stride (int): Stride, i.e. the downsampling factor.
        padding (int): Zero padding.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class PositionEmbedding(nn.Module):
    """Learnable absolute position embedding added to an NCHW feature map.

    The paper's attention hybrids add one at the start of their first attention stage, since
    self-attention alone does not know where a token is. It is learned for the token grid of the
    pre-training input (``base_size``); at any other grid it is resized bicubically to the feature
    map, so the backbone takes any input size.

    Args:
        dim (int): Channels.
        base_size (int | tuple[int, int]): Token grid ``(h, w)`` the embedding is learned for.
    """

    def __init__(self, dim: int, base_size: Union[int, Sequence[int]]):
        super().__init__()
        h, w = (base_size, base_size) if isinstance(base_size, int) else base_size
        self.base_size = (int(h), int(w))
        # Zeros, as the official hybrids: training starts from a position-agnostic stage.
        self.weight = nn.Parameter(torch.zeros(1, dim, *self.base_size))

    def forward(self, x: Tensor) -> Tensor:
        embedding = self.weight
        if tuple(x.shape[-2:]) != self.base_size:
            embedding = F.interpolate(embedding, size=x.shape[-2:], mode='bicubic',
                                      align_corners=False)
        return x + embedding

    def extra_repr(self) -> str:
        return f'base_size={self.base_size}'


class ChannelScale(nn.Module):
    """Learnable per-channel scale of an NCHW tensor (layer scale)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.view(-1, 1, 1)


class ConvMlp(nn.Module):
    """Channel MLP on an NCHW tensor: 1x1 conv -> activation -> 1x1 conv.

    Args:
        dim (int): Input and output channels.
        hidden_dim (int): Hidden channels.
        act_cfg (dict): Activation config.
        bias (bool): Whether the convolutions have a bias.
    """

    def __init__(self, dim: int, hidden_dim: int, act_cfg: dict = dict(type='GELU'),
                 bias: bool = True):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1, bias=bias)
        self.act = build_activation_layer(act_cfg)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, bias=bias)

    def init_weights(self) -> None:
        # The reference implementation initialises the MLP with a truncated normal (std 0.02).
        for conv in (self.fc1, self.fc2):
            trunc_normal_init(conv, std=0.02, bias=0.)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MetaFormerBlock(nn.Module):
    """One MetaFormer block with a swappable token mixer.

    ``x = x + drop_path(layer_scale_1(token_mixer(norm1(x))))``
    ``x = x + drop_path(layer_scale_2(mlp(norm2(x))))``

    Args:
        dim (int): Channels.
        token_mixer (nn.Module): Any module mapping (N, C, H, W) to the same shape.
        mlp_ratio (float): Hidden width of the MLP relative to ``dim``. Default: 4.
        norm_cfg (dict): mmcv norm config applied to the NCHW tensor. Default: GroupNorm with
            one group. mmcv's 'LN' is refused: it is torch's LayerNorm over the last axis (the
            width); pass a channel LayerNorm class as ``type`` instead (PoolFormer maps 'LN' to
            one).
        act_cfg (dict): Activation of the MLP. Default: GELU.
        drop_path (float): Stochastic depth rate of both residual branches. Default: 0.
        layer_scale_init_value (float, optional): Initial layer scale; None disables layer scale.
            Default: 1e-5.
    """

    def __init__(self,
                 dim: int,
                 token_mixer: nn.Module,
                 mlp_ratio: float = 4.,
                 norm_cfg: dict = dict(type='GN', num_groups=1),
                 act_cfg: dict = dict(type='GELU'),
                 drop_path: float = 0.,
                 layer_scale_init_value: Optional[float] = 1e-5):
        super().__init__()
        self.norm1 = build_norm_layer(norm_cfg, dim)[1]
        if isinstance(self.norm1, nn.LayerNorm):
            raise ValueError(
                f"norm_cfg {dict(norm_cfg)} builds torch's LayerNorm, which on an NCHW tensor "
                'normalises over the width, not the channels; use '
                "dict(type=ChannelLayerNorm, bias=True) (PoolFormer turns type='LN' into it)")
        self.token_mixer = token_mixer
        self.norm2 = build_norm_layer(norm_cfg, dim)[1]
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_cfg)
        if layer_scale_init_value is None:
            self.layer_scale_1, self.layer_scale_2 = nn.Identity(), nn.Identity()
        else:
            self.layer_scale_1 = ChannelScale(dim, layer_scale_init_value)
            self.layer_scale_2 = ChannelScale(dim, layer_scale_init_value)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.layer_scale_1(self.token_mixer(self.norm1(x))))
        x = x + self.drop_path(self.layer_scale_2(self.mlp(self.norm2(x))))
        return x
