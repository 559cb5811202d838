"""PoolFormer written out as the paper states it, for speed and equivalence comparisons.

NCHW tensors, ``nn.GroupNorm(1, C)``, ``nn.AvgPool2d(3, 1, 1, count_include_pad=False)`` minus
the input, a 1x1-conv MLP and per-channel layer scales: the straightforward formulation that the
token-layout and folded forms of :class:`~poolformer_mm.models.layers.MetaFormerStage` are
measured against. It is written here on its own, sharing no code with what it measures.
Parameter names match :class:`~poolformer_mm.models.PoolFormer`, so ``load_state_dict`` takes its
weights.
"""
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor


class _Scale(nn.Module):

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale.unsqueeze(-1).unsqueeze(-1) * x


class _Embed(nn.Module):

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel, stride, padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Mlp(nn.Module):

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):

    def __init__(self, dim: int, pool_size: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.pool = nn.AvgPool2d(pool_size, 1, pool_size // 2, count_include_pad=False)
        self.layer_scale1 = _Scale(dim)
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.layer_scale2 = _Scale(dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self.layer_scale1(self.pool(y) - y)
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class _Stage(nn.Module):

    def __init__(self, downsample, blocks):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.blocks(x)


class ReferencePoolFormer(nn.Module):
    """Inference/training reference with the same parameter names as ``PoolFormer``.

    Args:
        layers (Sequence[int]): Blocks per stage.
        embed_dims (Sequence[int]): Channels per stage.
        out_indices (Sequence[int]): Returned stages (each through its output GroupNorm).
        pool_size (int): Pooling window. Default: 3.
        mlp_ratio (float): MLP hidden width ratio. Default: 4.
    """

    def __init__(self, layers: Sequence[int], embed_dims: Sequence[int],
                 out_indices: Sequence[int] = (0, 1, 2, 3), pool_size: int = 3,
                 mlp_ratio: float = 4.):
        super().__init__()
        self.stem = _Embed(3, embed_dims[0], 7, 4, 2)
        self.stages = nn.ModuleList(
            _Stage(None if i == 0 else _Embed(embed_dims[i - 1], embed_dims[i], 3, 2, 1),
                   [_Block(embed_dims[i], pool_size, mlp_ratio) for _ in range(layers[i])])
            for i in range(len(layers)))
        self.out_indices = tuple(out_indices)
        self.output_norms = nn.ModuleDict(
            {str(i): nn.GroupNorm(1, embed_dims[i]) for i in self.out_indices})

    @classmethod
    def like(cls, backbone: nn.Module) -> 'ReferencePoolFormer':
        """A reference with ``backbone``'s arch and weights (a pooling-only PoolFormer)."""
        arch = backbone.arch
        reference = cls(arch['layers'], arch['embed_dims'], backbone.out_indices,
                        backbone.stages[0].blocks[0].token_mixer.pool_size,
                        arch['mlp_ratios'][0])
        reference.load_state_dict(backbone.state_dict())
        return reference.train(backbone.training)

    def forward(self, x: Tensor):
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(self.output_norms[str(i)](x))
        return tuple(outs)
