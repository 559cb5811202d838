"""Hooks that report data a run would otherwise train on, or skip, without a word.

* :class:`IgnoredLabelBatchHook` (segmentation): a training batch whose labels are
  ``ignore_index`` everywhere has loss 0 and accuracy 100 and teaches the model nothing.
* :class:`CocoAnnotationCheckHook` (detection): mmdet's ``CocoDataset`` drops annotations with
  unknown category ids, zero-area boxes and polygons of fewer than three points silently.

Neither writes a line per iteration: the first hook warns about the first such batch and then
logs a count per epoch, the second writes one line per annotation file.
:func:`add_data_checks` adds them, and the data loaders' checks, to a config.
"""
import json
from collections import Counter
from typing import Dict, Iterator, List, Optional

from mmdet.datasets import CocoDataset
from mmengine.config import Config
from mmengine.dist import is_main_process
from mmengine.fileio import get_local_path
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop
from mmseg.datasets.transforms import LoadAnnotations
from torch import nn

from ...datasets.checks import DATA_LOADERS
from ...datasets.transforms import LoadCheckedAnnotations
from ...utils.config import task_of


@HOOKS.register_module()
class IgnoredLabelBatchHook(Hook):
    """Warn about training batches whose labels are ``ignore_index`` at every pixel.

    The first such batch is reported with its label files; later ones are only counted, and the
    count is logged at the end of each epoch (of training, for iteration-based loops). The check is
    one comparison per label pixel on the batch already in memory.

    Args:
        ignore_index (int, optional): The ignored label value. Defaults to the decode head's
            ``ignore_index`` (255 if the model has none).
    """
    priority = 'NORMAL'

    def __init__(self, ignore_index: Optional[int] = None) -> None:
        self.ignore_index = ignore_index
        self._reported = False
        self._reset()

    def _reset(self) -> None:
        self._batches = self._ignored_batches = 0
        self._samples = self._ignored_samples = 0

    def before_train(self, runner) -> None:
        if self.ignore_index is None:
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            head = getattr(model, 'decode_head', None)
            if isinstance(head, nn.ModuleList):
                head = head[0]  # a cascade of heads (nn.ModuleList) shares the ignored value
            self.ignore_index = int(getattr(head, 'ignore_index', 255))

    def before_train_epoch(self, runner) -> None:
        self._reset()

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        samples = data_batch.get('data_samples') if isinstance(data_batch, dict) else None
        if not samples or not all('gt_sem_seg' in sample for sample in samples):
            return
        ignored = [bool((sample.gt_sem_seg.data == self.ignore_index).all())
                   for sample in samples]
        self._batches += 1
        self._samples += len(samples)
        self._ignored_samples += sum(ignored)
        if not all(ignored):
            return
        self._ignored_batches += 1
        if self._reported:
            return
        self._reported = True
        files = [sample.metainfo.get('seg_map_path') or sample.metainfo.get('img_path', '?')
                 for sample in samples]
        runner.logger.warning(
            f'iteration {runner.iter + 1}: the labels of this training batch are ignore_index '
            f'({self.ignore_index}) at every pixel ({", ".join(map(str, files))}), so its loss '
            'is 0 and its accuracy 100 and the model learns nothing from it. Check these labels: '
            'with reduce_zero_label=True a label of only zeros (unlabelled) is ignored everywhere, '
            'and a crop of a mostly unlabelled image can be too. Further such batches are counted '
            'and summarised at the end of the epoch.')

    def after_train_epoch(self, runner) -> None:
        if self._ignored_batches:
            by_epoch = isinstance(runner.train_loop, EpochBasedTrainLoop)
            where = f'of epoch {runner.epoch + 1}' if by_epoch else 'of this run'
            runner.logger.warning(
                f'{self._ignored_batches} of {self._batches} training batches {where} had labels '
                f'that were ignore_index ({self.ignore_index}) at every pixel '
                f'({self._ignored_samples} of {self._samples} samples were): they trained nothing. '
                'Check the labels and reduce_zero_label.')
        self._reset()


def coco_annotation_problems(ann_file: str) -> Dict[str, object]:
    """Count the annotations of a COCO file that mmdet's ``CocoDataset`` drops silently.

    Returns a dict with ``annotations`` (the total), ``unknown_category`` (a Counter of category
    ids not defined in the file's ``categories``), ``unknown_image`` (annotations of image ids not
    in ``images``), ``zero_area`` (boxes under 1 pixel wide or high, or of area 0) and
    ``short_polygons`` (polygons of fewer than three points).
    """
    with get_local_path(ann_file) as local_path, open(local_path) as f:
        content = json.load(f)
    categories = {category['id'] for category in content.get('categories', [])}
    images = {image['id'] for image in content.get('images', [])}
    annotations = content.get('annotations', [])
    unknown_category, unknown_image, zero_area, short_polygons = Counter(), 0, 0, 0
    for ann in annotations:
        if ann.get('category_id') not in categories:
            unknown_category[ann.get('category_id')] += 1
        if ann.get('image_id') not in images:
            unknown_image += 1
        bbox = ann.get('bbox')
        if bbox is not None and len(bbox) == 4:
            _, _, width, height = bbox
            # mmdet's rule for dropping a box (CocoDataset.parse_data_info)
            if width < 1 or height < 1 or ann.get('area', width * height) <= 0:
                zero_area += 1
        segmentation = ann.get('segmentation')
        if isinstance(segmentation, list):
            # mmdet's rule for dropping a polygon (LoadAnnotations._process_masks)
            short_polygons += sum(1 for polygon in segmentation
                                  if len(polygon) < 6 or len(polygon) % 2)
    return dict(annotations=len(annotations), unknown_category=unknown_category,
                unknown_image=unknown_image, zero_area=zero_area, short_polygons=short_polygons)


def _plural(count: int, word: str) -> str:
    return f'{count} {word}' + ('' if count == 1 else 's')


def coco_annotation_summary(ann_file: str) -> Optional[str]:
    """One line describing what :func:`coco_annotation_problems` found, or None if nothing."""
    found = coco_annotation_problems(ann_file)
    parts: List[str] = []
    unknown = found['unknown_category']
    if unknown:
        ids = sorted(unknown, key=str)
        shown = ', '.join(map(str, ids[:10])) + (', ...' if len(ids) > 10 else '')
        parts.append(f'{_plural(sum(unknown.values()), "annotation")} with category ids not in '
                     f'its categories (ids {shown})')
    if found['unknown_image']:
        parts.append(f'{_plural(found["unknown_image"], "annotation")} of image ids not in its '
                     'images')
    if found['zero_area']:
        parts.append(f'{_plural(found["zero_area"], "box")} of zero area (under 1 pixel wide or '
                     'high, or area 0)')
    if found['short_polygons']:
        parts.append(f'{_plural(found["short_polygons"], "polygon")} of fewer than 3 points')
    if not parts:
        return None
    return (f"annotation file '{ann_file}' ({_plural(found['annotations'], 'annotation')}): "
            f'{", ".join(parts)}. mmdet skips these without a word (they are neither trained on '
            'nor evaluated); fix or remove them in the file if they should count.')


def _leaf_datasets(dataset):
    """The data sets inside dataset wrappers (RepeatDataset, ConcatDataset, ...)."""
    if hasattr(dataset, 'datasets'):
        for inner in dataset.datasets:
            yield from _leaf_datasets(inner)
    elif hasattr(dataset, 'dataset'):
        yield from _leaf_datasets(dataset.dataset)
    else:
        yield dataset


@HOOKS.register_module()
class CocoAnnotationCheckHook(Hook):
    """Log one warning line per COCO annotation file with the annotations mmdet drops silently.

    Runs when the data sets of a run are built (before training, validation or testing), once per
    file, on the main process. It reads the annotation file once more with ``json``: seconds for
    COCO's 860k training annotations, once per run.
    """
    priority = 'NORMAL'

    def __init__(self) -> None:
        self._checked = set()

    def _check(self, runner, dataloader) -> None:
        if dataloader is None or not is_main_process():
            return
        for dataset in _leaf_datasets(dataloader.dataset):
            ann_file = getattr(dataset, 'ann_file', None)
            if not isinstance(dataset, CocoDataset) or not ann_file or ann_file in self._checked:
                continue
            self._checked.add(ann_file)
            summary = coco_annotation_summary(ann_file)
            if summary:
                runner.logger.warning(summary)

    def before_train(self, runner) -> None:
        self._check(runner, runner.train_dataloader)
        if runner.val_loop is not None:  # built by now: check it before hours of training
            self._check(runner, runner.val_loop.dataloader)

    def before_val(self, runner) -> None:
        self._check(runner, runner.val_dataloader)

    def before_test(self, runner) -> None:
        self._check(runner, runner.test_dataloader)


_LABEL_LOADERS = ('LoadAnnotations', 'mmseg.LoadAnnotations')


def _pipelines(cfg: Config) -> Iterator[list]:
    """Every pipeline of the config's data loaders, data set wrappers included."""
    def walk(dataset):
        if isinstance(dataset, (list, tuple)):
            for d in dataset:
                yield from walk(d)
        elif isinstance(dataset, dict):
            if isinstance(dataset.get('pipeline'), (list, tuple)):
                yield dataset['pipeline']
            for key in ('dataset', 'datasets'):
                yield from walk(dataset.get(key))

    for name in DATA_LOADERS:
        loader = cfg.get(name)
        if loader:
            yield from walk(loader.get('dataset'))


def _check_label_loaders(transforms) -> None:
    """Swap mmseg's ``LoadAnnotations`` for the checking one, also inside TestTimeAug & co."""
    for transform in transforms:
        if isinstance(transform, (list, tuple)):
            _check_label_loaders(transform)
        elif isinstance(transform, dict):
            kind = transform.get('type')
            if kind in _LABEL_LOADERS:
                transform['type'] = kind.replace('LoadAnnotations', 'LoadCheckedAnnotations')
            elif kind is LoadAnnotations:  # a pure-Python config names the class itself
                transform['type'] = LoadCheckedAnnotations
            if isinstance(transform.get('transforms'), (list, tuple)):
                _check_label_loaders(transform['transforms'])


def add_data_checks(cfg: Config) -> None:
    """Make a config's runs refuse or report bad data, naming the files.

    Segmentation: every ``LoadAnnotations`` of the data loaders' pipelines becomes
    ``LoadCheckedAnnotations`` (an RGB label, a label of another size than its image, or a 16-bit
    label with class ids >= 256 raise a ValueError naming the file), and
    ``IgnoredLabelBatchHook`` warns about training batches whose labels are all ignore_index.
    Detection: ``CocoAnnotationCheckHook`` logs one line per COCO annotation file with the
    annotations mmdet drops silently. Both: ``LoadImageFromFile`` becomes mmcv's loader with
    checks (a missing, empty, truncated or undecodable image raises an error naming the file;
    registered under the upstream name, so the config is unchanged). The modules are added to
    ``custom_imports``, so the config dumped to the work dir runs with the same checks.
    """
    modules = ['poolformer_mm.engine.hooks.data_checks', 'poolformer_mm.datasets.loading']
    if task_of(cfg) == 'mmseg':
        modules.append('poolformer_mm.datasets.transforms')
        for pipeline in _pipelines(cfg):
            _check_label_loaders(pipeline)
        hooks = ['IgnoredLabelBatchHook']
    else:
        hooks = ['CocoAnnotationCheckHook']
    present = {hook.get('type') for hook in cfg.get('custom_hooks', [])}
    cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [
        dict(type=hook) for hook in hooks if hook not in present]
    imports = dict(cfg.get('custom_imports') or dict(imports=[], allow_failed_imports=False))
    known = imports.get('imports', [])
    known = [known] if isinstance(known, str) else list(known)
    imports['imports'] = known + [m for m in modules if m not in known]
    cfg.custom_imports = imports
