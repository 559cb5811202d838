"""A config file read, its task, and the old ``--eval bbox segm`` / ``--eval mIoU`` flags of
mmdet 2.x / mmseg 0.x test scripts."""
import os.path as osp
from typing import Sequence

from mmengine.config import Config

from .errors import InputNotFoundError, InvalidInputError

DETECTION_METRICS = ('bbox', 'segm', 'proposal')
SEGMENTATION_METRICS = ('mIoU', 'mDice', 'mFscore')


def read_config(path: str) -> Config:
    """``Config.fromfile(path)``, with one line for a path that is not a file."""
    if not osp.isfile(path):
        raise InputNotFoundError(f"config file '{path}' not found: check the path")
    return Config.fromfile(path)


def task_of(cfg: Config) -> str:
    """'mmdet' or 'mmseg', from the config's ``default_scope``."""
    scope = cfg.get('default_scope')
    if scope not in ('mmdet', 'mmseg'):
        raise InvalidInputError(f"config has default_scope={scope!r}; expected 'mmdet' or 'mmseg' "
                                '(inherit an mmdet:: or mmseg:: base config)')
    return scope


def _evaluators(evaluator):
    return evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]


def set_eval_metrics(cfg: Config, metrics: Sequence[str]) -> None:
    """Point the test evaluator at ``metrics``; unknown names raise with the valid ones."""
    task = task_of(cfg)
    valid = DETECTION_METRICS if task == 'mmdet' else SEGMENTATION_METRICS
    unknown = [m for m in metrics if m not in valid]
    if unknown:
        raise InvalidInputError(f'unknown --eval metric(s) {unknown} for a {task} config; valid: '
                                f'{", ".join(valid)}')
    metrics = list(dict.fromkeys(metrics))
    if task == 'mmdet':
        targets = [e for e in _evaluators(cfg.test_evaluator) if e.get('type') == 'CocoMetric']
        if not targets:
            raise InvalidInputError(
                '--eval bbox/segm needs a CocoMetric test_evaluator in the config')
        for evaluator in targets:
            evaluator['metric'] = metrics
    else:
        targets = [e for e in _evaluators(cfg.test_evaluator) if e.get('type') == 'IoUMetric']
        if not targets:
            raise InvalidInputError('--eval mIoU/mDice/mFscore needs an IoUMetric test_evaluator')
        for evaluator in targets:
            evaluator['iou_metrics'] = metrics
