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
from typing import Callable, List, Sequence, Tuple

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

MODEL_ZOO_SCHEMES = ('torchvision://', 'modelzoo://', 'open-mmlab://', 'openmmlab://', 'mmcls://')
_PRETRAINED_FIX = 'add pretrained=None to model = dict(...) (mmseg passes it to the backbone) and '


def _refuse_unknown(error: type, what: str, names, valid, cutoff: float, advice: str) -> None:
    hints = [repr(name) + ''.join(f" (did you mean '{close}'?)" for close in
                                  difflib.get_close_matches(name, valid, 1, cutoff))
             for name in names if name not in (*valid, 'type', '_scope_')]  # (a config's keys)
    if hints:
        raise error(f'{what} {", ".join(hints)}; valid: {", ".join(map(repr, valid))}; {advice}')


class DenseBackbone(BaseModule):
    num_stages = 4

    def __init__(self, init_cfg=None, pretrained=None, arch_name: str = 'custom'):
        name, fix = type(self).__name__, '' if pretrained is None else _PRETRAINED_FIX
        if not isinstance(pretrained, (str, type(None))):
            raise TypeError(f'{name}: pretrained must be a str or None, got {pretrained!r}')
        checkpoint = pretrained or isinstance(init_cfg, dict) and init_cfg.get('checkpoint')
        both = pretrained is not None and init_cfg is not None
        if both or str(checkpoint).startswith(MODEL_ZOO_SCHEMES):  # CNNs, e.g. the bases' ResNets
            raise InvalidInputError(
                f"{name}: {'pretrained' if fix else 'init_cfg'} '{checkpoint}' " + (f'comes with '
                f'init_cfg={init_cfg}' if both else f'is not a {name} checkpoint (a model-zoo CNN)')
                + f'; {fix}name the weights in init_cfg alone (URLs: docs/model_zoo.md)')
        if pretrained is not None:  # mmseg's segmentors pass model.pretrained; as in mmdet:
            warnings.warn(f"{name}: pretrained='{pretrained}' is deprecated, use init_cfg",
                          FutureWarning, stacklevel=2)
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        self.arch_name = arch_name
        self._pretrained_fix = fix  # for the message of a checkpoint that does not load
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
        """Refuse keys ``cls`` does not take (cutoff 0.8: 0.6 pairs drop_rate, drop_path_rate)."""
        _refuse_unknown(UnknownSettingError, f'{cls.__name__}: unknown argument(s)', backbone_cfg,
                        [p for p in inspect.signature(cls).parameters if p != 'unknown'], 0.8,
                        "from a base config's backbone? add _delete_=True to the backbone dict")

    @classmethod
    def _named_arch(cls, name: str, custom_keys: str) -> dict:
        _refuse_unknown(ValueError, f'unknown {cls.__name__} arch', [name.lower()],
                        sorted(cls.arch_settings), 0.6, f'or pass a dict with {custom_keys}')
        return copy.deepcopy(cls.arch_settings[name.lower()])

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
                if not self._pretrained_fix:  # (a missing file keeps its type, as a URL's)
                    raise
                raise (InvalidInputError if isinstance(err, ValueError) else type(err))(
                    f'{err}; given as pretrained: {self._pretrained_fix}use init_cfg') from err
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
