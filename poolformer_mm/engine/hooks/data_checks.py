"""Hooks that report data a run would otherwise train on, or skip, without a word, and
:func:`add_data_checks`, which adds them and the data loaders' checks to a config."""
import json
from collections import Counter
from typing import Optional, Sequence

from mmdet.datasets import CocoDataset
from mmengine.config import Config
from mmengine.dist import broadcast_object_list, is_main_process
from mmengine.fileio import get_local_path
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop
from mmseg.datasets.transforms import LoadAnnotations
from torch import nn

from ...datasets.checks import config_datasets
from ...datasets.transforms import LoadCheckedAnnotations
from ...utils.config import add_custom_imports, add_hooks, task_of
from ...utils.errors import InvalidInputError


@HOOKS.register_module()
class IgnoredLabelBatchHook(Hook):
    """Warn about training batches whose labels are ``ignore_index`` (default: the decode
    head's, else 255) at every pixel: the first with its label files, then a count per epoch (of
    training, for iteration-based loops)."""
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
                head = head[0]  # a cascade of heads shares the ignored value
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


def coco_annotation_summary(ann_file: str, classes: Optional[Sequence[str]] = None
                            ) -> Optional[str]:
    """One line naming the annotations of a COCO file that mmdet's ``CocoDataset`` drops
    silently (unknown category or image ids, categories not among ``classes``, zero-area boxes,
    polygons of < 3 points), or None. A file none of whose categories is among ``classes``
    raises: every annotation would be dropped."""
    with get_local_path(ann_file) as local_path, open(local_path) as f:
        content = json.load(f)
    names = [category.get('name') for category in content.get('categories', [])]
    unnamed = [name for name in names if classes is not None and name not in classes]
    if names and len(unnamed) == len(names):
        listed = ', '.join(map(repr, classes[:5])) + (
            f', ... {len(classes)} in all' if len(classes) > 5 else '')
        raise InvalidInputError(
            f"annotation file '{ann_file}' has the categories {tuple(names)}, none of which is "
            f'among the classes of the config\'s data set ({listed}): mmdet would '
            'use none of its annotations. Name them in each data set of the config: '
            f'metainfo=dict(classes={tuple(names)}), and num_classes={len(names)} in the heads '
            '(docs/user_guides/configs.md)')
    categories = {category['id'] for category in content.get('categories', [])}
    images = {image['id'] for image in content.get('images', [])}
    annotations = content.get('annotations', [])
    unknown, unknown_image, zero_area, short_polygons = Counter(), 0, 0, 0
    for ann in annotations:
        if ann.get('category_id') not in categories:
            unknown[ann.get('category_id')] += 1
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
    ids = sorted(unknown, key=str)
    unnamed_ids = {c['id'] for c in content.get('categories', []) if c.get('name') in unnamed}
    skipped = sum(1 for ann in annotations if ann.get('category_id') in unnamed_ids)
    parts = [text for present, text in (
        (unknown, f'{_plural(sum(unknown.values()), "annotation")} with category ids not in its '
                  f'categories (ids {", ".join(map(str, ids[:10]))}'
                  f'{", ..." if len(ids) > 10 else ""})'),
        (unnamed, f'{_plural(skipped, "annotation")} of categories the config\'s classes do not '
                  f'name ({", ".join(map(str, unnamed[:10]))})'),
        (unknown_image, f'{_plural(unknown_image, "annotation")} of image ids not in its images'),
        (zero_area, f'{_plural(zero_area, "box")} of zero area (under 1 pixel wide or high, or '
                    'area 0)'),
        (short_polygons, f'{_plural(short_polygons, "polygon")} of fewer than 3 points'),
    ) if present]
    if not parts:
        return None
    return (f"annotation file '{ann_file}' ({_plural(len(annotations), 'annotation')}): "
            f'{", ".join(parts)}. mmdet skips these without a word (they are neither trained on '
            'nor evaluated); fix or remove them in the file if they should count.')


def _plural(count: int, word: str) -> str:
    return f'{count} {word}' + ('' if count == 1 else 's')


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
    """Log, once per COCO annotation file, one line with the annotations mmdet drops silently."""
    priority = 'NORMAL'

    def __init__(self) -> None:
        self._checked = set()

    def _check(self, runner, dataloader) -> None:
        if dataloader is None:
            return
        refusal = None
        for dataset in _leaf_datasets(dataloader.dataset):
            ann_file = getattr(dataset, 'ann_file', None)
            if not isinstance(dataset, CocoDataset) or not ann_file or ann_file in self._checked:
                continue
            self._checked.add(ann_file)
            if not is_main_process():
                continue
            try:
                summary = coco_annotation_summary(ann_file, dataset.metainfo.get('classes'))
            except InvalidInputError as error:
                refusal = str(error)
                break
            if summary:
                runner.logger.warning(summary)
        shared = [refusal]
        broadcast_object_list(shared)  # every process stops, not only the one that read the file
        if shared[0]:
            raise InvalidInputError(shared[0])

    def before_train(self, runner) -> None:
        self._check(runner, runner.train_dataloader)
        if runner.val_loop is not None:  # built by now: check it before hours of training
            self._check(runner, runner.val_loop.dataloader)

    def before_val(self, runner) -> None:
        self._check(runner, runner.val_dataloader)

    def before_test(self, runner) -> None:
        self._check(runner, runner.test_dataloader)


def _check_label_loaders(transforms) -> None:
    """Swap mmseg's ``LoadAnnotations`` for the checking one, also inside TestTimeAug & co."""
    for transform in transforms:
        if isinstance(transform, (list, tuple)):
            _check_label_loaders(transform)
        elif isinstance(transform, dict):
            kind = transform.get('type')
            if kind in ('LoadAnnotations', 'mmseg.LoadAnnotations'):
                transform['type'] = kind.replace('LoadAnnotations', 'LoadCheckedAnnotations')
            elif kind is LoadAnnotations:  # a pure-Python config names the class itself
                transform['type'] = LoadCheckedAnnotations
            if isinstance(transform.get('transforms'), (list, tuple)):
                _check_label_loaders(transform['transforms'])


def add_data_checks(cfg: Config) -> None:
    """Make a config's runs refuse or report bad data, naming the files: checked label loaders
    and ``IgnoredLabelBatchHook`` (segmentation) or ``CocoAnnotationCheckHook`` (detection), and
    the checked image loader; the modules go into ``custom_imports`` for the dumped config."""
    modules = ['poolformer_mm.engine.hooks.data_checks', 'poolformer_mm.datasets.loading']
    if task_of(cfg) == 'mmseg':
        modules.append('poolformer_mm.datasets.transforms')
        for dataset in config_datasets(cfg, leaves=False):
            if isinstance(dataset.get('pipeline'), (list, tuple)):
                _check_label_loaders(dataset['pipeline'])
        add_hooks(cfg, 'IgnoredLabelBatchHook')
    else:
        add_hooks(cfg, 'CocoAnnotationCheckHook')
    add_custom_imports(cfg, *modules)
