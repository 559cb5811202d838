"""A config file read, its task, hooks added to it, and the old ``--eval bbox segm`` /
``--eval mIoU`` flags of mmdet 2.x / mmseg 0.x test scripts."""
import os.path as osp
from typing import Sequence

from mmengine.config import Config

from .errors import InputNotFoundError, InvalidInputError

DETECTION_METRICS = ('bbox', 'segm', 'proposal')
SEGMENTATION_METRICS = ('mIoU', 'mDice', 'mFscore')


def read_config(path: str) -> Config:
    """``Config.fromfile(path)`` with :func:`inherit_default_scope`, and one line for a path
    that is not a file."""
    if not osp.isfile(path):
        raise InputNotFoundError(f"config file '{path}' not found: check the path")
    return inherit_default_scope(Config.fromfile(path))


def inherit_default_scope(cfg: Config) -> Config:
    """Give ``cfg`` the scope of the ``mmdet::`` / ``mmseg::`` base its model comes from, where
    it sets no ``default_scope`` itself (mmseg's ``_base_/models/*.py``); returns ``cfg``."""
    if cfg.get('default_scope') is None and isinstance(cfg.get('model'), dict):
        # mmengine marks a dict read from a package's base with that package's _scope_
        inherited = cfg.model.get('_scope_')
        if inherited in ('mmdet', 'mmseg'):
            cfg.default_scope = inherited
    return cfg


def task_of(cfg: Config) -> str:
    """'mmdet' or 'mmseg', from the config's ``default_scope``."""
    scope = cfg.get('default_scope')
    if scope not in ('mmdet', 'mmseg'):
        raise InvalidInputError(f"config has default_scope={scope!r}; expected 'mmdet' or 'mmseg' "
                                "(inherit an mmdet:: or mmseg:: base config, or set "
                                "default_scope='mmdet' / 'mmseg')")
    return scope


def add_hooks(cfg: Config, *hooks) -> None:
    """Append ``hooks`` (dicts, or types) to ``cfg.custom_hooks``; a type given alone is not
    added when the config already has a hook of that type."""
    present = {hook.get('type') for hook in cfg.get('custom_hooks', [])}
    cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [
        hook if isinstance(hook, dict) else dict(type=hook)
        for hook in hooks if isinstance(hook, dict) or hook not in present]


def add_custom_imports(cfg: Config, *modules: str) -> None:
    """Add ``modules`` to ``cfg.custom_imports``, for the config the runner dumps."""
    imports = dict(cfg.get('custom_imports') or dict(imports=[], allow_failed_imports=False))
    known = imports.get('imports', [])
    known = [known] if isinstance(known, str) else list(known)
    imports['imports'] = known + [m for m in modules if m not in known]
    cfg.custom_imports = imports


def evaluators(evaluator) -> list:
    """The metrics of an evaluator config (one, a list, or None)."""
    if evaluator is None:
        return []
    return list(evaluator) if isinstance(evaluator, (list, tuple)) else [evaluator]


def set_eval_metrics(cfg: Config, metrics: Sequence[str]) -> None:
    """Point the test evaluator at ``metrics``; unknown names raise with the valid ones."""
    task = task_of(cfg)
    valid = DETECTION_METRICS if task == 'mmdet' else SEGMENTATION_METRICS
    unknown = [m for m in metrics if m not in valid]
    if unknown:
        raise InvalidInputError(f'unknown --eval metric(s) {unknown} for a {task} config; valid: '
                                f'{", ".join(valid)}')
    kind, key = ('CocoMetric', 'metric') if task == 'mmdet' else ('IoUMetric', 'iou_metrics')
    targets = [e for e in evaluators(cfg.test_evaluator) if e.get('type') == kind]
    if not targets:
        raise InvalidInputError(f'--eval {"/".join(valid)} needs a {kind} test_evaluator in the '
                                'config')
    for evaluator in targets:
        evaluator[key] = list(dict.fromkeys(metrics))
