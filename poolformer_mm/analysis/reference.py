"""PoolFormer written out as the paper states it, for speed and equivalence comparisons.

NCHW tensors, ``nn.GroupNorm(1, C)``, ``nn.AvgPool2d(3, 1, 1, count_include_pad=False)`` minus
the input, a 1x1-conv MLP and per-channel layer scales: the straightforward formulation that the
token-layout and folded forms of :class:`~poolformer_mm.models.layers.MetaFormerStage` are
measured against. It is written here on its own, sharing no code with what it measures.
Parameter names match :class:`~poolformer_mm.models.PoolFormer`, so ``load_state_dict`` takes its
weights.
"""
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..models import PoolFormer


class _Scale(nn.Module):

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale.unsqueeze(-1).unsqueeze(-1) * x


def _named(**modules: nn.Module) -> nn.Sequential:
    """``modules`` applied in order, under their names (those of ``PoolFormer``'s parameters)."""
    return nn.Sequential(OrderedDict(modules))


class _Block(nn.Module):

    def __init__(self, dim: int, pool_size: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.pool = nn.AvgPool2d(pool_size, 1, pool_size // 2, count_include_pad=False)
        self.layer_scale1 = _Scale(dim)
        self.norm2 = nn.GroupNorm(1, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = _named(fc1=nn.Conv2d(dim, hidden, 1), act=nn.GELU(),
                          fc2=nn.Conv2d(hidden, dim, 1))
        self.layer_scale2 = _Scale(dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self.layer_scale1(self.pool(y) - y)
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


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
        self.stem = _named(conv=nn.Conv2d(3, embed_dims[0], 7, 4, 2))
        self.stages = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(layers, embed_dims)):
            stage = OrderedDict()
            if i:
                stage['downsample'] = _named(conv=nn.Conv2d(embed_dims[i - 1], dim, 3, 2, 1))
            stage['blocks'] = nn.Sequential(*[_Block(dim, pool_size, mlp_ratio)
                                              for _ in range(depth)])
            self.stages.append(nn.Sequential(stage))
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


def why_no_reference(backbone):
    """Why the paper's PoolFormer (pooling, one-group GroupNorm, layer scales, exact GELU in every
    block) cannot compute what ``backbone`` does, or None."""
    if not isinstance(backbone, PoolFormer):
        return f'the backbone is a {type(backbone).__name__}, not a PoolFormer'
    blocks = [block for stage in backbone.stages for block in stage.blocks]
    if not all(getattr(block, 'supports_token_layout', False) for block in blocks):
        mixers = ', '.join(sorted({type(block.token_mixer).__name__ for block in blocks}))
        return (f'not every block is a PoolFormer block (token mixers {mixers}; norms and layer '
                'scales as the paper has them)')
    if any(type(b.mlp.act) is not nn.GELU or b.mlp.act.approximate != 'none' for b in blocks):
        return 'its MLPs do not use (exact) GELU'
    if len({b.mlp.fc1.out_channels / b.mlp.fc1.in_channels for b in blocks}) > 1:
        return 'its stages have different MLP ratios'
    if len({block.token_mixer.pool_size for block in blocks}) > 1:
        return 'its stages pool with different window sizes'
    if backbone.stem.conv.in_channels != 3 or any(s.pos_embed is not None
                                                  for s in backbone.stages):
        return 'it has other input channels or a position embedding'
