"""Catch a missing data set before the Runner does, with one message that says what to do."""
import os.path as osp
from typing import Iterator, List

from mmengine.config import Config, ConfigDict

_LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


def _datasets(cfg: Config, loaders=_LOADERS) -> Iterator[ConfigDict]:
    """Leaf dataset configs, looking through wrappers (RepeatDataset, ConcatDataset...)."""
    def walk(dataset):
        if dataset is None:
            return
        if isinstance(dataset, (list, tuple)):
            for d in dataset:
                yield from walk(d)
        elif 'dataset' in dataset:
            yield from walk(dataset['dataset'])
        elif 'datasets' in dataset:
            yield from walk(dataset['datasets'])
        else:
            yield dataset

    for name in loaders:
        loader = cfg.get(name)
        if loader:
            yield from walk(loader.get('dataset'))


def _evaluators(cfg: Config):
    for name in ('val_evaluator', 'test_evaluator'):
        evaluator = cfg.get(name)
        if isinstance(evaluator, (list, tuple)):
            yield from evaluator
        elif evaluator:
            yield evaluator


def override_data_root(cfg: Config, data_root: str) -> None:
    """Point every dataset (and evaluator annotation file) of ``cfg`` at ``data_root``."""
    data_root = data_root.rstrip('/') + '/'
    old_roots = set()
    for dataset in _datasets(cfg):
        if dataset.get('data_root'):
            old_roots.add(dataset['data_root'].rstrip('/') + '/')
        dataset['data_root'] = data_root
    for evaluator in _evaluators(cfg):
        ann_file = evaluator.get('ann_file')
        for old in old_roots:
            if ann_file and ann_file.startswith(old):
                evaluator['ann_file'] = data_root + ann_file[len(old):]
    cfg['data_root'] = data_root


def _expected_paths(dataset: ConfigDict) -> List[str]:
    root = dataset.get('data_root') or ''
    paths = []
    if dataset.get('ann_file'):
        paths.append(osp.join(root, dataset['ann_file']))
    for prefix in (dataset.get('data_prefix') or {}).values():
        if isinstance(prefix, str) and prefix:
            paths.append(osp.join(root, prefix))
    return paths


def check_data_roots(cfg: Config, loaders=_LOADERS) -> None:
    """Raise FileNotFoundError naming every missing file/folder the config's datasets need."""
    missing, roots = [], []
    for dataset in _datasets(cfg, loaders):
        root = dataset.get('data_root') or ''
        if root and not osp.isdir(root):
            roots.append(root)
            missing.extend(_expected_paths(dataset))
            continue
        missing.extend(p for p in _expected_paths(dataset) if not osp.exists(p))
    empty = [p for dataset in _datasets(cfg, loaders) for p in _expected_paths(dataset)[:1]
             if dataset.get('ann_file') and osp.isfile(p) and osp.getsize(p) == 0]
    if empty:
        raise ValueError(f"annotation file '{empty[0]}' is empty (0 bytes); regenerate or "
                         're-download it')
    if not missing and not roots:
        return
    missing = list(dict.fromkeys(missing))
    where = f"data root '{roots[0]}' not found" if roots else 'data set incomplete'
    raise FileNotFoundError(
        f'{where}: expected {", ".join(missing)}. Put the data set there (see the README, '
        '"Preparing data"), or point the config elsewhere with --data-root DIR '
        '(tools/train.py and tools/test.py), or --cfg-options '
        'train_dataloader.dataset.data_root=DIR val_dataloader.dataset.data_root=DIR ...')
