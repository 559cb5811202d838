"""Catch a missing data set before the Runner looks for it, and inference images that are
damaged or too thin to run on."""
import os.path as osp
from typing import Iterator, List, Sequence, Tuple

import mmcv
import numpy as np
from mmdet.utils import get_test_pipeline_cfg
from mmengine import fileio
from mmengine.config import Config, ConfigDict

from ..utils.config import evaluators, task_of
from ..utils.errors import InputNotFoundError, InvalidInputError
from .loading import check_file_bytes

DATA_LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


def config_datasets(cfg: Config, loaders=DATA_LOADERS, leaves: bool = True
                    ) -> Iterator[ConfigDict]:
    """The dataset configs of the data loaders: the leaves inside wrappers (RepeatDataset,
    ConcatDataset...), or with ``leaves=False`` the wrappers too."""
    def walk(dataset):
        if isinstance(dataset, (list, tuple)):
            for d in dataset:
                yield from walk(d)
        elif isinstance(dataset, dict):
            if not leaves or not {'dataset', 'datasets'} & set(dataset):
                yield dataset
            yield from walk(dataset.get('dataset', dataset.get('datasets')))

    for name in loaders:
        loader = cfg.get(name)
        if loader:
            yield from walk(loader.get('dataset'))


def override_data_root(cfg: Config, data_root: str) -> None:
    """Point every dataset (and evaluator annotation file) of ``cfg`` at ``data_root``."""
    data_root = data_root.rstrip('/') + '/'
    old_roots = set()
    for dataset in config_datasets(cfg):
        if dataset.get('data_root'):
            old_roots.add(dataset['data_root'].rstrip('/') + '/')
        dataset['data_root'] = data_root
    for name in ('val_evaluator', 'test_evaluator'):
        for evaluator in evaluators(cfg.get(name)):
            ann_file = evaluator.get('ann_file')
            for old in old_roots:
                if ann_file and ann_file.startswith(old):
                    evaluator['ann_file'] = data_root + ann_file[len(old):]
    cfg['data_root'] = data_root


def dataset_paths(dataset: ConfigDict) -> List[str]:
    root = dataset.get('data_root') or ''
    paths = []
    if dataset.get('ann_file'):
        paths.append(osp.join(root, dataset['ann_file']))
    for prefix in (dataset.get('data_prefix') or {}).values():
        if isinstance(prefix, str) and prefix:
            paths.append(osp.join(root, prefix))
    return paths


def check_data_roots(cfg: Config, loaders=DATA_LOADERS) -> None:
    """Raise FileNotFoundError naming every missing file/folder the config's datasets need."""
    missing, roots, empty = [], [], []
    for dataset in config_datasets(cfg, loaders):
        root, paths = dataset.get('data_root') or '', dataset_paths(dataset)
        if root and not osp.isdir(root):
            roots.append(root)
            missing.extend(paths)
            continue
        missing.extend(p for p in paths if not osp.exists(p))
        if dataset.get('ann_file') and osp.isfile(paths[0]) and osp.getsize(paths[0]) == 0:
            empty.append(paths[0])
    if empty:
        raise InvalidInputError(f"annotation file '{empty[0]}' is empty (0 bytes); regenerate or "
                                're-download it')
    if not missing and not roots:
        return
    missing = list(dict.fromkeys(missing))
    where = f"data root '{roots[0]}' not found" if roots else 'data set incomplete'
    raise InputNotFoundError(
        f'{where}: expected {", ".join(missing)}. Put the data set there (see the README, '
        '"Preparing data"), or point the config elsewhere with --data-root DIR '
        '(tools/train.py and tools/test.py), or --cfg-options '
        'train_dataloader.dataset.data_root=DIR val_dataloader.dataset.data_root=DIR ...')


# The backbones reduce their input 32 times: a thinner input leaves the last stage nothing.
MIN_MODEL_INPUT_SIDE = 32


def read_image_for_inference(path: str) -> np.ndarray:
    """Decode an image file as the test pipeline does (OpenCV, 3 channels) and return it as RGB;
    an empty, truncated or undecodable file raises an error naming it."""
    data = fileio.get(path)
    check_file_bytes(data, path, 'image', 'Fetch or export it again, or leave it out of the '
                     'inputs.')
    image = mmcv.imfrombytes(data, flag='color', backend='cv2')
    if image is None:
        raise InvalidInputError(
            f"image '{path}' could not be decoded: it is damaged or not in a format "
            'OpenCV reads (JPEG, PNG, BMP, TIFF, WebP). Convert it to PNG or JPEG, '
            'or leave it out of the inputs.')
    return mmcv.bgr2rgb(image)


def _resized(transform: dict, size: Tuple[int, int]) -> Tuple[int, int]:
    """The (width, height) that mmcv's ``Resize`` (and mmdet's, mmseg's) makes of ``size``."""
    scale, factor = transform.get('scale'), transform.get('scale_factor')
    if scale is not None:
        scale = (scale, scale) if isinstance(scale, int) else tuple(scale)
        return mmcv.rescale_size(size, scale) if transform.get('keep_ratio') else scale
    if factor is not None:
        fx, fy = (factor, factor) if isinstance(factor, (int, float)) else factor
        return int(size[0] * fx + 0.5), int(size[1] * fy + 0.5)
    return size


def check_image_fits_model(path: str, image_shape: Sequence[int], cfg: Config) -> None:
    """Refuse an image that the config's test ``Resize`` steps squeeze thinner than the model
    can see (a keep-ratio resize of a 10000x10 image); small images are scaled up and work."""
    width, height = image_shape[1], image_shape[0]
    size, resize = (width, height), None
    # the pipeline that mmdet's inference_detector or mmseg's inference_model runs
    pipeline = (get_test_pipeline_cfg(cfg) if task_of(cfg) == 'mmdet'
                else cfg.get('test_pipeline') or [])
    for transform in pipeline:
        kind = transform.get('type') if isinstance(transform, dict) else None
        name = kind if isinstance(kind, str) else getattr(kind, '__name__', '')
        if name.split('.')[-1] == 'Resize':
            size, resize = _resized(transform, size), transform
    # Each side must reach the coarsest stride, unless the image is smaller and is not shrunk.
    if all(new >= min(MIN_MODEL_INPUT_SIDE, old) for new, old in zip(size, (width, height))):
        return
    ratio = max(width, height) / max(min(width, height), 1)
    scale = resize.get('scale')
    how = (f"Resize(scale={scale}, keep_ratio={resize.get('keep_ratio', False)})"
           if scale is not None else f"Resize(scale_factor={resize.get('scale_factor')})")
    advice = 'Crop or tile it into pieces closer to square and run on those.'
    if scale is not None and resize.get('keep_ratio'):
        longest = max(scale) if isinstance(scale, (list, tuple)) else scale
        advice = (f'Crop or tile it into pieces of aspect ratio up to about '
                  f'{max(longest // MIN_MODEL_INPUT_SIDE, 1)}:1 and run on those.')
    raise InvalidInputError(
        f"image '{path}' is {width}x{height} pixels (width x height), an aspect ratio of "
        f"{ratio:.0f}:1: the config's test resize, {how}, squeezes it to {size[0]}x{size[1]}, "
        f'too thin for the model, which needs {MIN_MODEL_INPUT_SIDE} pixels across (its '
        f'backbone reduces the input {MIN_MODEL_INPUT_SIDE} times). {advice}')
