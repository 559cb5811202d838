"""What every MetaFormer-style dense backbone here shares: the mmdet backbone interface, the
stage-building loop and the forward pass.

A subclass builds ``self.stem``, ``self.stages`` (with :meth:`_build_stages`: four
:class:`~poolformer_mm.models.layers.MetaFormerStage`) and ``self.output_norms`` (a ModuleDict
keyed by the returned stage indices), and calls :meth:`_set_dense_interface` first and
:meth:`_finish_building` last. It hands ``init_cfg``, mmseg's deprecated ``pretrained`` and its
arch name to ``DenseBackbone.__init__``, which turns ``pretrained`` into ``init_cfg``. The
stages run in the modes the backbone sets through its public methods: :meth:`set_fast_path`,
:meth:`set_grad_checkpointing` (and PoolFormer's ``switch_to_deploy``).
"""
import copy
import difflib
import inspect
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ...utils.errors import InvalidInputError, UnknownSettingError
from ..checkpoint_layouts import upgrade_legacy_keys_on_load
from ..layers import (
    MetaFormerStage,
    group_norm_1_channels_last,
    group_norm_1_to_nchw,
    is_group_norm_1,
    token_grids,
)

# The schemes of mmengine's model zoo (mmengine/hub/*.json): ResNets, ResNeXts, VGGs, HRNets ...
# of torchvision, OpenMMLab and mmcls, none of them a PoolFormer or MetaFormer. The stock mmseg
# bases name one in ``model.pretrained`` (mmseg hands it to the backbone), the mmdet bases one in
# the backbone's ``init_cfg``.
MODEL_ZOO_SCHEMES = ('torchvision://', 'modelzoo://', 'open-mmlab://', 'openmmlab://', 'mmcls://')

# Arguments of the ResNet backbones in the stock mmdet / mmseg bases: when they reach us, the
# config merged our backbone into the base's instead of replacing it.
RESNET_ARGUMENTS = frozenset({
    'depth', 'num_stages', 'strides', 'dilations', 'style', 'contract_dilation', 'deep_stem',
    'avg_down', 'stem_channels', 'base_channels', 'dcn', 'stage_with_dcn', 'plugins',
    'zero_init_residual'
})

# How close a misspelt argument must be to a valid one for a "did you mean" hint. difflib's
# default (0.6) pairs names of other meanings: pretrained/pretrain_img_size, drop_rate
# (dropout in timm)/drop_path_rate, num_stages/frozen_stages. 0.8 keeps plurals, missing
# underscores and letters (out_indice, fastpath, init_config).
SUGGESTION_CUTOFF = 0.8


class PretrainedSettingError(InvalidInputError):
    """``pretrained`` / ``init_cfg`` of a backbone that cannot be what the user meant."""


class DenseBackbone(BaseModule):
    num_stages = 4

    def __init__(self, init_cfg=None, pretrained=None, arch_name: str = 'custom'):
        super().__init__(
            init_cfg=self._init_cfg_with_pretrained(init_cfg, pretrained, arch_name))
        self.arch_name = arch_name
        # Where the weights were named, for the messages of a checkpoint that does not load.
        self._weights_setting = 'pretrained' if pretrained is not None else 'init_cfg'
        # Checkpoints written before the parameter names were unified load through torch's and
        # mmengine's load_state_dict (both run this hook before filling the submodules). The
        # private registration exists in every supported torch; the public one is newer.
        self._register_load_state_dict_pre_hook(upgrade_legacy_keys_on_load)
        self._fast_path = False
        self._channels_last_outputs = False

    # ---------------------------------------------------------------- construction
    def _set_dense_interface(self, out_indices: Sequence[int], frozen_stages: int,
                             norm_eval: bool) -> None:
        self.out_indices = self._check_out_indices(out_indices)
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'frozen_stages must be in [-1, {self.num_stages}], got '
                             f'{frozen_stages}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

    @classmethod
    def _check_out_indices(cls, out_indices) -> Tuple[int, ...]:
        out_indices = (out_indices, ) if isinstance(out_indices, int) else tuple(out_indices)
        if not out_indices or any(not 0 <= i < cls.num_stages for i in out_indices):
            raise ValueError(f'out_indices must be stage indices in [0, {cls.num_stages - 1}], '
                             f'got {out_indices}')
        return tuple(sorted(set(out_indices)))

    @classmethod
    def check_config_arguments(cls, backbone_cfg: dict) -> None:
        """Refuse a config's backbone dict with arguments this class does not take, before
        anything is built (the same message as the constructor's)."""
        valid = inspect.signature(cls.__init__).parameters
        cls._reject_unknown_arguments([name for name in backbone_cfg if name not in valid
                                       and name not in ('type', '_scope_')])

    @classmethod
    def _reject_unknown_arguments(cls, unknown: dict) -> None:
        # A typo in a config (``out_indice=...``) would otherwise surface as a bare TypeError
        # from deep inside the registry.
        if not unknown:
            return
        valid = [p for p in inspect.signature(cls.__init__).parameters
                 if p not in ('self', 'unknown')]
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, valid, n=1, cutoff=SUGGESTION_CUTOFF)
            hints.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ''))
        message = (f'{cls.__name__} got unknown argument(s) {", ".join(hints)}; valid '
                   f'arguments: {", ".join(valid)}')
        resnet = [name for name in unknown if name in RESNET_ARGUMENTS]
        if resnet:
            message += (f'. {", ".join(resnet)}: settings of the base config\'s ResNet; add '
                        '_delete_=True to the backbone dict so that it replaces the base\'s')
        raise UnknownSettingError(message)

    @classmethod
    def _init_cfg_with_pretrained(cls, init_cfg: Optional[dict], pretrained: Optional[str],
                                  arch_name: str) -> Optional[dict]:
        """``init_cfg``, or mmseg's deprecated ``pretrained=PATH`` spelling of
        ``init_cfg=dict(type='Pretrained', checkpoint=PATH)`` (with one warning).

        mmseg's segmentors hand ``model.pretrained`` to the backbone, and the stock mmseg bases
        set it to ResNet weights; those, and every other model-zoo name, stop here with what to
        change instead of downloading a file that cannot load.
        """
        if pretrained is not None and not isinstance(pretrained, str):
            raise TypeError(f'{cls.__name__}: pretrained must be a str or None, got '
                            f'{type(pretrained).__name__}')
        if pretrained is not None and init_cfg is not None:
            origin = (' (model-zoo CNN weights, as the stock mmseg bases set)'
                      if pretrained.startswith(MODEL_ZOO_SCHEMES) else '')
            raise PretrainedSettingError(
                f"{cls.__name__} got both pretrained='{pretrained}'{origin} and init_cfg="
                f'{init_cfg}; name the weights once, in init_cfg. mmseg passes model.pretrained '
                'to the backbone and its stock bases set it, so add pretrained=None to '
                'model = dict(...) (or --cfg-options model.pretrained=None)')
        if pretrained is not None:
            cls._refuse_model_zoo_checkpoint(pretrained, 'pretrained', arch_name)
            warnings.warn(
                f"{cls.__name__}: pretrained='{pretrained}' is deprecated (as in mmseg's own "
                f"backbones); use backbone init_cfg=dict(type='Pretrained', "
                f"checkpoint='{pretrained}') and model.pretrained=None", FutureWarning,
                stacklevel=3)
            return dict(type='Pretrained', checkpoint=pretrained)
        if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
            checkpoint = init_cfg.get('checkpoint')
            if isinstance(checkpoint, str):
                cls._refuse_model_zoo_checkpoint(checkpoint, 'init_cfg', arch_name)
        return init_cfg

    @classmethod
    def _refuse_model_zoo_checkpoint(cls, checkpoint: str, setting: str, arch_name: str) -> None:
        if not checkpoint.startswith(MODEL_ZOO_SCHEMES):
            return
        if setting == 'pretrained':
            fix = ('mmseg passes model.pretrained to the backbone and its stock bases set it, so '
                   'add pretrained=None to model = dict(...) (or --cfg-options '
                   'model.pretrained=None) and give the backbone ')
        else:
            fix = 'give the backbone '
        raise PretrainedSettingError(
            f"{cls.__name__}: {setting} '{checkpoint}' is not a {cls.__name__} checkpoint "
            f"(mmengine's {checkpoint.split('://')[0]}:// model zoo has none); "
            f'{fix}{cls._pretrained_hint(arch_name)}, or init_cfg=None to start from scratch')

    @classmethod
    def _pretrained_hint(cls, arch_name: str) -> str:
        """How to name the ImageNet weights of ``arch_name`` in ``init_cfg``, for messages."""
        return "init_cfg=dict(type='Pretrained', checkpoint=...) naming its ImageNet weights"

    def _not_loadable_hint(self) -> str:
        """What to add to a load error of a checkpoint named by ``pretrained``."""
        if self._weights_setting != 'pretrained':
            return ''
        return (f'. It was given as pretrained (mmseg passes model.pretrained to the backbone): '
                f'set model.pretrained=None and give the backbone '
                f'{self._pretrained_hint(self.arch_name)}')

    @classmethod
    def _named_arch(cls, name: str, custom_keys: str) -> dict:
        """A copy of ``cls.arch_settings[name]``, or an error listing the names (and the
        closest one) and what a custom arch dict needs (``custom_keys``)."""
        key = name.lower()
        if key not in cls.arch_settings:
            close = difflib.get_close_matches(key, cls.arch_settings, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ''
            names = ', '.join(repr(n) for n in sorted(cls.arch_settings))
            raise ValueError(f"unknown {cls.__name__} arch '{name}'{hint}; choose one of "
                             f'{names}, or pass a dict with {custom_keys}')
        return copy.deepcopy(cls.arch_settings[key])

    @property
    def out_channels(self) -> List[int]:
        """Channels of the returned stage outputs, in order: a neck's ``in_channels``."""
        return [self.embed_dims[i] for i in self.out_indices]

    def describe(self) -> str:
        """Arch and returned stages in a user's words, e.g. ``PoolFormer arch 's12' with
        out_indices (0, 1, 2, 3)``."""
        return (f"{type(self).__name__} arch '{self.arch_name}' with out_indices "
                f'{self.out_indices}')

    @classmethod
    def _token_grids(cls, img_size) -> list:
        """Token grid ``(h, w)`` of each stage for an input of ``img_size`` (int or (h, w))."""
        return token_grids(img_size, cls.num_stages)

    @staticmethod
    def _build_stages(layers: Sequence[int], drop_path_rate: float,
                      build_stage: Callable[[int, list], MetaFormerStage]) -> nn.ModuleList:
        """Stage ``i`` is ``build_stage(i, drop path rates of its blocks)``; the rate grows
        linearly from 0 to ``drop_path_rate`` over all blocks."""
        # CPU even inside a ``torch.device('meta')`` context, where .tolist() would fail.
        rates = torch.linspace(0, drop_path_rate, sum(layers), device='cpu').tolist()
        stages = nn.ModuleList()
        for i, depth in enumerate(layers):
            first = sum(layers[:i])
            stages.append(build_stage(i, rates[first:first + depth]))
        return stages

    def _finish_building(self, with_cp: bool, fast_path: bool = False) -> None:
        self.set_fast_path(fast_path)
        self.set_grad_checkpointing(with_cp)
        self._freeze_stages()

    # ---------------------------------------------------------------- modes
    @property
    def fast_path(self) -> bool:
        """Whether stages that can (PoolFormer blocks) run in token layout."""
        return self._fast_path

    def set_fast_path(self, enable: bool = True) -> 'DenseBackbone':
        """Run every stage whose blocks allow it in (N, H, W, C) token layout (same outputs
        and gradients, faster on a CPU), or, with False, the literal NCHW formulation."""
        self._fast_path = bool(enable)
        for stage in self.stages:
            stage.set_token_layout(enable)
        return self

    @property
    def channels_last_outputs(self) -> bool:
        """Whether the returned maps are channels-last (else contiguous NCHW)."""
        return self._channels_last_outputs

    def set_channels_last_outputs(self, enable: bool = True) -> 'DenseBackbone':
        """Return channels-last maps, for a neck and head whose convolutions run channels-last
        (:func:`poolformer_mm.engine.prepare_for_inference`): the token-layout stages then hand
        over their maps without a layout conversion. Same values."""
        self._channels_last_outputs = bool(enable)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> 'DenseBackbone':
        """Gradient checkpointing per block in every stage: saves activation memory, costs a
        second forward pass; outputs and gradients are unchanged (``with_cp=True``)."""
        for stage in self.stages:
            stage.set_grad_checkpointing(enable)
        return self

    # ---------------------------------------------------------------- weights
    def init_weights(self) -> None:
        """Pretrained ``init_cfg``: load it (see :meth:`_load_pretrained`); otherwise the paper's
        initialisation (:meth:`_init_from_scratch`), then any other ``init_cfg``."""
        if self.init_cfg is not None and self.init_cfg.get('type') == 'Pretrained':
            try:
                self._load_pretrained(self.init_cfg['checkpoint'])
            except (ValueError, FileNotFoundError) as err:
                if self._weights_setting != 'pretrained':
                    raise
                # a missing file keeps its type (CheckpointUnavailableError for a URL)
                kind = PretrainedSettingError if isinstance(err, ValueError) else type(err)
                raise kind(f'{err}{self._not_loadable_hint()}') from err
            self._is_init = True
            return
        self._init_from_scratch()
        if self.init_cfg is None:
            # Nothing else to initialise; skip mmengine's per-parameter report of no changes.
            self._is_init = True
        else:
            super().init_weights()

    def _load_pretrained(self, path: str) -> None:
        raise NotImplementedError

    def _init_from_scratch(self) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- training state
    def _frozen_modules(self):
        if self.frozen_stages >= 0:
            yield self.stem
        for i in range(min(self.frozen_stages, self.num_stages)):
            yield self.stages[i]
            if str(i) in self.output_norms:
                yield self.output_norms[str(i)]

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        if self.stages[0].token_layout:
            # the stem's output then comes out channels-last, so the permute to tokens is free
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                norm = self.output_norms[str(i)]
                if stage.token_layout and is_group_norm_1(norm):
                    # one pass normalises the channels-last map and converts it to NCHW, or
                    # keeps it channels-last
                    outs.append(group_norm_1_channels_last(norm, x)
                                if self._channels_last_outputs
                                else group_norm_1_to_nchw(norm, x))
                else:
                    # a channel LayerNorm permutes: its output is channels-last in memory, and
                    # mmcv's CPU RoIAlign would misread it (it ignores strides)
                    layout = (torch.channels_last if self._channels_last_outputs
                              else torch.contiguous_format)
                    outs.append(norm(x.contiguous()).contiguous(memory_format=layout))
        return tuple(outs)
