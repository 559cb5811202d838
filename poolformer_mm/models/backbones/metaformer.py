"""The MetaFormer baselines (arXiv 2210.13452) as dense-prediction backbones for mmdet / mmseg."""
import copy
from typing import Dict, Optional, Sequence, Union

import torch.nn as nn
from mmengine.model.weight_init import trunc_normal_init
from mmengine.registry import MODELS

from ..checkpoint_layouts import load_metaformer_weights
from ..layers import (
    ChannelLayerNorm,
    MetaFormerBlock,
    MetaFormerStage,
    ModifiedLayerNorm,
    StarReLU,
    build_token_mixer,
    downsampling,
    stem,
)
from .base import DenseBackbone

# ---------------------------------------------------------------------------------- model zoo
# Blocks per stage and channels per size; the families below pair them with token mixers.
_SIZES_4_STAGE_POOL = {
    's12': ([2, 2, 6, 2], [64, 128, 320, 512]),
    's24': ([4, 4, 12, 4], [64, 128, 320, 512]),
    's36': ([6, 6, 18, 6], [64, 128, 320, 512]),
    'm36': ([6, 6, 18, 6], [96, 192, 384, 768]),
    'm48': ([8, 8, 24, 8], [96, 192, 384, 768]),
}
_SIZES_CONV = {
    's18': ([3, 3, 9, 3], [64, 128, 320, 512]),
    's36': ([3, 12, 18, 3], [64, 128, 320, 512]),
    'm36': ([3, 12, 18, 3], [96, 192, 384, 576]),
    'b36': ([3, 12, 18, 3], [128, 256, 512, 768]),
}
# family: (token mixer per stage, block norm, sizes). Parameter-free mixers use the modified layer
# norm (statistics over C, H, W), the convolution / attention families a channel LayerNorm.
_FAMILIES = {
    'identityformer': (['identity'] * 4, 'mln', _SIZES_4_STAGE_POOL),
    'randformer': (['identity', 'identity', 'random', 'random'], 'mln', _SIZES_4_STAGE_POOL),
    'poolformerv2': (['pool'] * 4, 'mln', _SIZES_4_STAGE_POOL),
    'convformer': (['sepconv'] * 4, 'layer', _SIZES_CONV),
    'caformer': (['sepconv', 'sepconv', 'attention', 'attention'], 'layer', _SIZES_CONV),
}
_ARCH_DEFAULTS = dict(block_norm='layer', mlp_ratios=[4, 4, 4, 4],
                      layer_scale_init_values=[None] * 4,
                      res_scale_init_values=[None, None, 1.0, 1.0])
# block norms by name, without bias; the stem and downsampling use the channel LayerNorm
_BLOCK_NORMS = {'layer': dict(type=ChannelLayerNorm, eps=1e-6),
                'mln': dict(type=ModifiedLayerNorm, eps=1e-6)}


@MODELS.register_module()
class MetaFormer(DenseBackbone):
    """MetaFormer baselines (IdentityFormer, RandFormer, PoolFormerV2, ConvFormer, CAFormer) as a
    backbone for dense prediction (detection, segmentation).

    A 7x7/4 convolutional stem with a norm, four stages of MetaFormer v2 blocks separated by
    norm + 3x3/2 convolutions, and a channel LayerNorm (with bias) on every returned stage output
    ("output norm"; the classifier's final norm initialises the last one). Outputs have strides
    4, 8, 16 and 32. Blocks use StarReLU, norms without bias, bias-free MLPs and a res scale in
    the last two stages.

    RandFormer's frozen random mixing matrices belong to the token grid of a
    ``pretrain_img_size`` input (14x14 and 7x7 at 224). At any other input size they are resized
    bilinearly over both spatial index pairs and each row is renormalised to sum to 1 (see
    :class:`~poolformer_mm.models.layers.RandomMixing`); memory for them grows with
    ``(H*W)**2`` of the stage, so RandFormer is costly at detection resolutions.

    Args:
        arch (str | dict): A timm model name: ``poolformerv2_{s12,s24,s36,m36,m48}``,
            ``identityformer_{...}``, ``randformer_{...}`` (same sizes),
            ``convformer_{s18,s36,m36,b36}`` or ``caformer_{s18,s36,m36,b36}``; or a dict with
            ``layers`` (blocks per stage), ``embed_dims`` and ``token_mixers`` (one name or dict per
            stage: 'identity', 'pool', 'random', 'sepconv', 'attention', or any other name of
            ``TOKEN_MIXERS`` in ``layers/mixers.py``), optionally
            ``block_norm`` ('layer' or 'mln', default 'layer'), ``mlp_ratios`` (default 4s),
            ``layer_scale_init_values`` (default Nones) and ``res_scale_init_values`` (default
            ``[None, None, 1.0, 1.0]``). Default: 'caformer_s18'.
        in_channels (int): Input image channels. Default: 3.
        pretrain_img_size (int): Input side the random mixing matrices are drawn for; only
            RandFormer uses it. Default: 224.
        drop_path_rate (float): Stochastic depth rate of the last block; it grows linearly from 0
            over all blocks. Default: 0.
        out_indices (Sequence[int]): Stages (0-3) whose outputs are returned. Only these stages
            get an output norm, so no parameter is left unused. Default: (0, 1, 2, 3).
        frozen_stages (int): -1 freezes nothing, 0 freezes the stem, k >= 1 freezes the stem and
            the first k stages with their output norms (parameters stop training, modules stay in
            eval mode). Default: -1.
        norm_eval (bool): Keep BatchNorm layers in eval mode while training. The MetaFormer norms
            have no running statistics, so this only matters for BatchNorm added by a user.
            Default: False.
        with_cp (bool): Gradient checkpointing per block: saves activation memory, costs a
            second forward pass; outputs and gradients are unchanged
            (:meth:`set_grad_checkpointing`). Default: False.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=PATH)`` loads a
            sail-sg/metaformer or timm ImageNet checkpoint of the same arch, or an mmengine
            checkpoint of this backbone or of a whole detector / segmentor. Default: None
            (truncated normal, std 0.02, for every conv and linear layer).
        pretrained (str, optional): Deprecated spelling of
            ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)``, as in mmseg's own
            backbones (its segmentors pass ``model.pretrained`` here); warns once. Model-zoo
            names (``open-mmlab://``, ``torchvision://``, ``mmcls://``) are refused.
            Default: None.

    Example:
        >>> import torch
        >>> from poolformer_mm.models.backbones.metaformer import MetaFormer
        >>> model = MetaFormer('caformer_s18')
        >>> [tuple(o.shape) for o in model(torch.rand(1, 3, 224, 224))]
        [(1, 64, 56, 56), (1, 128, 28, 28), (1, 320, 14, 14), (1, 512, 7, 7)]
    """

    arch_settings: Dict[str, dict] = {
        f'{family}_{size}': dict(layers=layers, embed_dims=dims, token_mixers=mixers,
                                 block_norm=norm)
        for family, (mixers, norm, sizes) in _FAMILIES.items()
        for size, (layers, dims) in sizes.items()
    }

    def __init__(self,
                 arch: Union[str, dict] = 'caformer_s18',
                 in_channels: int = 3,
                 pretrain_img_size: int = 224,
                 drop_path_rate: float = 0.,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None,
                 pretrained: Optional[str] = None,
                 **unknown):
        self.check_config_arguments(unknown)
        super().__init__(init_cfg=init_cfg, pretrained=pretrained,
                         arch_name=arch if isinstance(arch, str) else 'custom')
        self.arch = self._resolve_arch(arch)
        layers, embed_dims = self.arch['layers'], self.arch['embed_dims']
        self.embed_dims = list(embed_dims)
        self._set_dense_interface(out_indices, frozen_stages, norm_eval)

        grids = self._token_grids(pretrain_img_size)
        stem_norm = dict(type=ChannelLayerNorm, eps=1e-6)
        block_norm = _BLOCK_NORMS[self.arch['block_norm']]

        def build_stage(i: int, drop_path_rates: list) -> MetaFormerStage:
            # in this order, so that a seed gives the weights it gave before
            downsample = None if i == 0 else downsampling(embed_dims[i - 1], embed_dims[i],
                                                          norm_cfg=stem_norm)
            blocks = [
                MetaFormerBlock(
                    embed_dims[i],
                    token_mixer=build_token_mixer(self.arch['token_mixers'][i], embed_dims[i],
                                                  grids[i]),
                    norm_cfg=block_norm,
                    mlp_ratio=self.arch['mlp_ratios'][i],
                    # a class as ``type`` lets mmcv build StarReLU without a registry entry
                    act_cfg=dict(type=StarReLU),
                    mlp_bias=False,
                    drop_path=rate,
                    layer_scale_init_value=self.arch['layer_scale_init_values'][i],
                    res_scale_init_value=self.arch['res_scale_init_values'][i])
                for rate in drop_path_rates
            ]
            return MetaFormerStage(downsample, blocks)

        self.stem = stem(in_channels, embed_dims[0], norm_cfg=stem_norm)
        self.stages = self._build_stages(layers, drop_path_rate, build_stage)
        self.output_norms = nn.ModuleDict({
            str(i): ChannelLayerNorm(embed_dims[i], bias=True)
            for i in self.out_indices
        })
        self._finish_building(with_cp)

    # ---------------------------------------------------------------- construction helpers
    @classmethod
    def _resolve_arch(cls, arch: Union[str, dict]) -> dict:
        if isinstance(arch, str):
            arch = cls._named_arch(arch, 'layers, embed_dims and token_mixers')
        elif not isinstance(arch, dict):
            raise TypeError(f'arch must be a str or a dict, got {type(arch).__name__}')
        required = {'layers', 'embed_dims', 'token_mixers'}
        allowed = required | set(_ARCH_DEFAULTS)
        if not required <= set(arch) <= allowed:
            raise ValueError(f'a custom MetaFormer arch needs the keys {sorted(required)} and may '
                             f'have {sorted(_ARCH_DEFAULTS)}, got {sorted(arch)}')
        resolved = copy.deepcopy({**_ARCH_DEFAULTS, **arch})
        for key in ('layers', 'embed_dims', 'token_mixers', 'mlp_ratios',
                    'layer_scale_init_values', 'res_scale_init_values'):
            if len(resolved[key]) != cls.num_stages:
                raise ValueError(f'arch[{key!r}] needs {cls.num_stages} entries, got '
                                 f'{resolved[key]}')
        if resolved['block_norm'] not in _BLOCK_NORMS:
            raise KeyError(f"unknown MetaFormer norm {resolved['block_norm']!r}; choose one of "
                           f'{sorted(_BLOCK_NORMS)}')
        return resolved

    # ---------------------------------------------------------------- weights
    def _load_pretrained(self, path: str) -> None:
        load_metaformer_weights(self, path)

    def _init_from_scratch(self) -> None:
        # The reference initialisation: truncated normal (std 0.02) for every conv and linear.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                trunc_normal_init(module, std=0.02, bias=0.)
