"""What every MetaFormer-style dense backbone here shares: the mmdet backbone interface.

Subclasses build ``self.stem``, ``self.stages`` (four modules, each run in turn) and
``self.output_norms`` (a ModuleDict keyed by the returned stage indices), and set
``out_indices``, ``frozen_stages`` and ``norm_eval`` through :meth:`_set_dense_interface`.
"""
import copy
import difflib
import inspect
from typing import Sequence, Tuple

from mmengine.model import BaseModule
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm


class DenseBackbone(BaseModule):
    num_stages = 4

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
    def _reject_unknown_arguments(cls, unknown: dict) -> None:
        # A typo in a config (``out_indice=...``) would otherwise surface as a bare TypeError
        # from deep inside the registry.
        if not unknown:
            return
        valid = [p for p in inspect.signature(cls.__init__).parameters
                 if p not in ('self', 'unknown')]
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, valid, n=1)
            hints.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ''))
        raise TypeError(f'{cls.__name__} got unknown argument(s) {", ".join(hints)}; valid '
                        f'arguments: {", ".join(valid)}')

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

    def init_weights(self) -> None:
        """Pretrained ``init_cfg``: load it (see :meth:`_load_pretrained`); otherwise the paper's
        initialisation (:meth:`_init_from_scratch`), then any other ``init_cfg``."""
        if self.init_cfg is not None and self.init_cfg.get('type') == 'Pretrained':
            self._load_pretrained(self.init_cfg['checkpoint'])
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

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(self.output_norms[str(i)](x))
        return tuple(outs)
