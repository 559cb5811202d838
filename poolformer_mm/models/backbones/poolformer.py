"""PoolFormer (arXiv 2111.11418) as a dense-prediction backbone for mmdet / mmseg."""
import copy
from typing import Dict, List, Optional, Sequence, Union

import torch.nn as nn
from mmengine.model.weight_init import trunc_normal_init
from mmengine.registry import MODELS

from ..checkpoint_layouts import convert_official_dense_keys_on_load, load_backbone_weights
from ..folded_weights import refuse_unfolded_weights
from ..layers import (
    ConvMlp,
    MetaFormerBlock,
    MetaFormerStage,
    PositionEmbedding,
    ScratchBuffers,
    build_norm,
    build_token_mixer,
    channel_norm_cfg,
    downsampling,
    stem,
    token_mixer_cfg,
)
from .base import DenseBackbone


@MODELS.register_module()
class PoolFormer(DenseBackbone):
    """PoolFormer backbone for dense prediction (detection, segmentation).

    A MetaFormer with pooling as token mixer: a 7x7/4 convolutional stem, four stages of
    MetaFormer blocks separated by 3x3/2 convolutions, and a norm on every returned stage output
    ("output norm"). Outputs have strides 4, 8, 16 and 32.

    The token mixer, norm, activation and pool size are the knobs of the paper's ablations
    (Table 5), per stage where it matters: e.g. ``token_mixers=('pool', 'pool', 'attn', 'attn')``
    is its [Pool, Pool, Attention, Attention] hybrid, which also adds a learnable position
    embedding at the start of its first attention stage (resized to the feature map at other
    input sizes) and, like the released hybrids, uses a channel LayerNorm in every stage.

    Args:
        arch (str | dict): 's12', 's24', 's36', 'm36', 'm48', or a dict with ``layers``
            (blocks per stage), ``embed_dims``, ``mlp_ratios`` and ``layer_scale_init_value``.
            Default: 's12'.
        in_channels (int): Input image channels. Default: 3.
        pool_size (int): Window of the pooling token mixer (where a 'pool' mixer sets none).
            Default: 3.
        token_mixers (str | dict | Sequence): Token mixer for all stages, or one per stage, as a
            name or a dict with ``type``: the paper's 'pool', 'identity', 'dwconv', 'attn'
            (multi-head self-attention, heads 32 wide), 'spatial_fc' (a learned [HW, HW] token
            matrix) or 'random' (a frozen random one), or any other name of ``TOKEN_MIXERS``
            (``layers/mixers.py``, which also says how each behaves at input sizes other than
            ``pretrain_img_size``). Default: 'pool'.
        pretrain_img_size (int | tuple[int, int]): Input size of the ImageNet pre-training.
            It fixes the token grid of what is tied to one: the position embedding of an
            attention stage and the matrices of 'spatial_fc' and 'random' (56, 28, 14, 7 per
            stage at 224). Default: 224.
        norm_cfg (dict | Sequence[dict], optional): Norm of the blocks and output norms, for all
            stages or one per stage: ``dict(type='GN', num_groups=1)`` (the paper's "modified
            layer norm": statistics over C, H, W; one group is the default), ``dict(type='LN')``
            (LayerNorm over the channels of each position) or ``dict(type='BN')``; any other
            mmcv norm config also works. Default: None, the paper's choice: a channel LayerNorm
            in every stage when any stage uses attention (as the released hybrids
            metaformer_pppa/ppaa_s12_224, so their weights fit), GroupNorm with one group
            otherwise.
        act_cfg (dict): Activation of the MLPs, e.g. ``dict(type='ReLU')`` or
            ``dict(type='SiLU')``. Default: ``dict(type='GELU')``.
        drop_path_rate (float): Stochastic depth rate of the last block; it grows linearly from 0
            over all blocks. Default: 0.
        layer_scale_init_value (float, optional): Overrides the arch's initial layer scale.
            Default: None (use the arch's value).
        out_indices (Sequence[int]): Stages (0-3) whose outputs are returned. Only these stages
            get an output norm, so no parameter is left unused. Default: (0, 1, 2, 3).
        frozen_stages (int): -1 freezes nothing, 0 freezes the stem, k >= 1 freezes the stem and
            the first k stages (their parameters stop training, their norms stay in eval mode).
            Default: -1.
        norm_eval (bool): Keep batch-statistics norms (BatchNorm) in eval mode while training.
            GroupNorm has no running statistics, so this only matters with a BN ``norm_cfg``.
            Default: False.
        with_cp (bool): Gradient checkpointing per block: saves activation memory, costs a
            second forward pass (:meth:`set_grad_checkpointing`). Default: False.
        fast_path (bool): Run stages of pooling blocks in (N, H, W, C) token layout, where the
            MLP is a plain matrix product and pooling is channels-last
            (:class:`~poolformer_mm.models.layers.MetaFormerStage`): same outputs and gradients,
            about 1.4-1.6x faster on a CPU. False runs the literal NCHW formulation
            (:meth:`set_fast_path`). Default: True.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=PATH)`` loads the official
            ImageNet file, an mmpretrain or timm checkpoint, or an mmengine checkpoint of this
            backbone or a whole detector/segmentor (the paper's released ones included).
            Default: None (the paper's initialisation). Two options go with ``checkpoint``:

            * ``final_norm``: what the ImageNet classifier's final norm does. 'initial': the
              last output norm keeps its initial weights (weight 1, bias 0), as in the paper's
              code, which loaded the file with ``strict=False`` into ``poolformer_*_feat``.
              'classifier': the classifier's final norm initialises it, so the last stage's
              output starts normalised as the classifier saw it; choose it for a frozen last
              stage (``frozen_stages=4``, which freezes that norm too), for features used
              without fine-tuning, or to repeat runs of 0.2.0 and earlier, which did so.
              Default: None, each layout's own start: 'initial' for the official file,
              'classifier' for mmpretrain (whose ``norm6`` is that norm) and timm.
            * ``use_ema``: of a timm ``train.py`` checkpoint with averaged weights, load those
              (``state_dict_ema``, True, timm's own default) or ``state_dict`` (False).
              Default: True.
        pretrained (str, optional): Deprecated spelling of
            ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)``, as in mmseg's own
            backbones (its segmentors pass ``model.pretrained`` here); warns once. Model-zoo
            names (``open-mmlab://``, ``torchvision://``, ``mmcls://``, e.g. the stock mmseg
            bases' ResNet) are refused. Default: None.

    Example:
        >>> import torch
        >>> from poolformer_mm.models import PoolFormer
        >>> model = PoolFormer('s12')
        >>> [tuple(o.shape) for o in model(torch.rand(1, 3, 224, 224))]
        [(1, 64, 56, 56), (1, 128, 28, 28), (1, 320, 14, 14), (1, 512, 7, 7)]
        >>> hybrid = PoolFormer('s12', token_mixers=('pool', 'pool', 'attn', 'attn'))
        >>> [tuple(o.shape) for o in hybrid(torch.rand(1, 3, 256, 320))]
        [(1, 64, 64, 80), (1, 128, 32, 40), (1, 320, 16, 20), (1, 512, 8, 10)]
    """

    arch_settings: Dict[str, dict] = {
        's12': dict(layers=[2, 2, 6, 2], embed_dims=[64, 128, 320, 512],
                    mlp_ratios=[4, 4, 4, 4], layer_scale_init_value=1e-5),
        's24': dict(layers=[4, 4, 12, 4], embed_dims=[64, 128, 320, 512],
                    mlp_ratios=[4, 4, 4, 4], layer_scale_init_value=1e-5),
        's36': dict(layers=[6, 6, 18, 6], embed_dims=[64, 128, 320, 512],
                    mlp_ratios=[4, 4, 4, 4], layer_scale_init_value=1e-6),
        'm36': dict(layers=[6, 6, 18, 6], embed_dims=[96, 192, 384, 768],
                    mlp_ratios=[4, 4, 4, 4], layer_scale_init_value=1e-6),
        'm48': dict(layers=[8, 8, 24, 8], embed_dims=[96, 192, 384, 768],
                    mlp_ratios=[4, 4, 4, 4], layer_scale_init_value=1e-6),
    }

    def __init__(self,
                 arch: Union[str, dict] = 's12',
                 in_channels: int = 3,
                 pool_size: int = 3,
                 token_mixers: Union[str, dict, Sequence] = 'pool',
                 pretrain_img_size: Union[int, Sequence[int]] = 224,
                 norm_cfg: Union[dict, Sequence[dict], None] = None,
                 act_cfg: dict = dict(type='GELU'),
                 drop_path_rate: float = 0.,
                 layer_scale_init_value: Optional[float] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 fast_path: bool = True,
                 init_cfg: Optional[dict] = None,
                 pretrained: Optional[str] = None,
                 **unknown):
        self.check_config_arguments(unknown)
        super().__init__(init_cfg=init_cfg, pretrained=pretrained,
                         arch_name=arch.lower() if isinstance(arch, str) else 'custom')
        self.arch = self._resolve_arch(arch)
        if layer_scale_init_value is not None:
            self.arch['layer_scale_init_value'] = layer_scale_init_value
        layers, embed_dims = self.arch['layers'], self.arch['embed_dims']
        self.embed_dims = list(embed_dims)
        self._set_dense_interface(out_indices, frozen_stages, norm_eval)

        mixers = self._resolve_mixers(token_mixers, pool_size)
        norm_cfgs = self._resolve_norms(norm_cfg, mixers)
        grids = self._token_grids(pretrain_img_size)
        # Attention is blind to position, so the first attention stage adds a position embedding.
        first_attention = next((i for i, m in enumerate(mixers) if m['type'] == 'attention'),
                               None)

        def build_stage(i: int, drop_path_rates: list) -> MetaFormerStage:
            # in this order, so that a seed gives the weights it gave before
            downsample = None if i == 0 else downsampling(embed_dims[i - 1], embed_dims[i])
            pos_embed = PositionEmbedding(embed_dims[i], grids[i]) if i == first_attention else None
            blocks = [
                MetaFormerBlock(
                    embed_dims[i],
                    token_mixer=build_token_mixer(mixers[i], embed_dims[i], grids[i]),
                    norm_cfg=norm_cfgs[i],
                    mlp_ratio=self.arch['mlp_ratios'][i],
                    act_cfg=act_cfg,
                    drop_path=rate,
                    layer_scale_init_value=self.arch['layer_scale_init_value'])
                for rate in drop_path_rates
            ]
            return MetaFormerStage(downsample, blocks, pos_embed=pos_embed)

        self.stem = stem(in_channels, embed_dims[0])
        self.stages = self._build_stages(layers, drop_path_rate, build_stage)
        self.output_norms = nn.ModuleDict({
            str(i): build_norm(norm_cfgs[i], embed_dims[i])
            for i in self.out_indices
        })
        self._finish_building(with_cp, fast_path)
        # Whole models in the official mmdet/mmseg layout (the paper's released detection and
        # segmentation checkpoints) load through any load_state_dict, upstream tools' included.
        self._register_load_state_dict_pre_hook(convert_official_dense_keys_on_load,
                                                with_module=True)

    # ---------------------------------------------------------------- construction helpers
    @classmethod
    def _resolve_arch(cls, arch: Union[str, dict]) -> dict:
        if isinstance(arch, str):
            return cls._named_arch(
                arch, 'layers, embed_dims, mlp_ratios and layer_scale_init_value')
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a str or a dict, got {type(arch).__name__}')
        required = {'layers', 'embed_dims', 'mlp_ratios', 'layer_scale_init_value'}
        if set(arch) != required:
            raise ValueError(f'a custom arch needs exactly the keys {sorted(required)}, '
                             f'got {sorted(arch)}')
        for key in ('layers', 'embed_dims', 'mlp_ratios'):
            if len(arch[key]) != cls.num_stages:
                raise ValueError(f'arch[{key!r}] needs {cls.num_stages} entries, got {arch[key]}')
        return copy.deepcopy(dict(arch))

    @classmethod
    def _per_stage(cls, value, name: str) -> list:
        if isinstance(value, (str, dict)):
            return [value] * cls.num_stages
        value = list(value)
        if len(value) != cls.num_stages:
            raise ValueError(f'{name} needs one entry per stage ({cls.num_stages}), got {value}')
        return value

    @classmethod
    def _resolve_mixers(cls, token_mixers, pool_size: int) -> List[dict]:
        mixers = [token_mixer_cfg(m) for m in cls._per_stage(token_mixers, 'token_mixers')]
        for mixer in mixers:
            if mixer['type'] == 'pool':
                mixer.setdefault('pool_size', pool_size)
        return mixers

    @classmethod
    def _resolve_norms(cls, norm_cfg, mixers: List[dict]) -> List[dict]:
        if norm_cfg is None:
            # The released hybrids (metaformer_pppa/ppaa_s12_224) use a channel LayerNorm in
            # every stage, pooling ones included; the pooling-only models use GroupNorm(1).
            with_attention = any(m['type'] == 'attention' for m in mixers)
            norm_cfg = dict(type='LN') if with_attention else dict(type='GN', num_groups=1)
        return [channel_norm_cfg(cfg) for cfg in cls._per_stage(norm_cfg, 'norm_cfg')]

    # ---------------------------------------------------------------- weights
    def _load_pretrained(self, path: str) -> None:
        load_backbone_weights(self, path)

    def _init_from_scratch(self) -> None:
        for module in self.modules():
            if isinstance(module, ConvMlp):
                module.init_weights()
            elif isinstance(module, nn.Linear):
                # Attention and spatial FC layers, initialised as in the official hybrids.
                trunc_normal_init(module, std=0.02, bias=0.)

    # ---------------------------------------------------------------- modes
    def switch_to_deploy(self) -> 'PoolFormer':
        """Fold norms and layer scales into the MLP weights of every PoolFormer block and run
        them in token layout (inference only; same outputs). Also stores the stem's and the
        downsampling convolutions' weights channels-last, the layout of their inputs there.
        The folded blocks of all stages share one set of scratch tensors (:attr:`scratch`)."""
        keys_before = list(self.state_dict())
        # one set: the stages run one after another, so the largest stage's buffers serve all
        self.scratch = getattr(self, 'scratch', None) or ScratchBuffers()
        for stage in self.stages:
            stage.switch_to_deploy(self.scratch)
        self.stem.store_weights_channels_last()
        refuse_unfolded_weights(self, keys_before, f'This {type(self).__name__} backbone')
        return self.set_fast_path(True)
