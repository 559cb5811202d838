"""Predictions and pictures of them for image files, through mmdet's ``DetInferencer`` and
mmseg's ``MMSegInferencer``, with this project's checks of the inputs, outputs and weights."""
import copy
import os
import os.path as osp
from typing import List, Optional, Sequence, Union

import mmcv
import torch
from mmdet.apis import DetInferencer
from mmengine.config import Config
from mmengine.logging import print_log
from mmseg.apis import MMSegInferencer

from ..checkpoint_io import check_checkpoint_path
from ..datasets.checks import check_image_fits_model, read_image_for_inference
from ..deploy.fold import prepare_for_inference
from ..deploy.precision import enable_inference_autocast, log_amp_dtype
from ..engine.work_dir import check_writable, refuse_output_over_inputs
from ..models import check_neck_in_channels
from ..models.checkpoint_fit import check_checkpoint_fits
from ..utils.config import inherit_default_scope, read_config, task_of
from ..utils.errors import InputNotFoundError, InvalidInputError
from ..visualization import keep_labels_apart

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def collect_images(inputs: Sequence[str]) -> List[str]:
    """Image files given directly or found (non-recursively) in given folders, sorted."""
    images = []
    for path in inputs:
        if osp.isdir(path):
            images += sorted(osp.join(path, name) for name in os.listdir(path)
                             if name.lower().endswith(IMAGE_SUFFIXES))
        elif osp.isfile(path):
            images.append(path)
        else:
            raise InputNotFoundError(f"input '{path}' is neither an image file nor a folder: "
                                     'check the path')
    if not images:
        raise InputNotFoundError(f'no images ({", ".join(IMAGE_SUFFIXES)}) found in '
                                 f'{", ".join(inputs)}')
    return images


class SegInferencer(MMSegInferencer):
    """``MMSegInferencer`` that also draws the label map of a one-pixel image, and runs
    the configs that tools/train.py saves in its work dirs."""

    def _init_pipeline(self, cfg):
        # mmseg drops its label loading step by name; the checked loader is dropped here
        pipeline = cfg.test_dataloader.dataset.pipeline
        cfg.test_dataloader.dataset.pipeline = [
            step for step in pipeline if step.get('type') != 'LoadCheckedAnnotations']
        return super()._init_pipeline(cfg)

    def visualize(self, inputs, preds, *args, **kwargs):
        # a label tensor indexes a 1x1 picture as a scalar in mmseg's visualiser; numpy does not
        drawn = []
        for pred in preds:
            pred = pred.clone()
            pred.pred_sem_seg.data = pred.pred_sem_seg.data.cpu().numpy()
            drawn.append(pred)
        return super().visualize(inputs, drawn, *args, **kwargs)


def init_inferencer(config: Union[str, Config], checkpoint: str, device: str = 'cpu',
                    deploy: bool = False, amp: Optional[str] = None):
    """mmdet's ``DetInferencer`` or mmseg's ``MMSegInferencer`` for ``config`` (file or loaded)
    with the weights of ``checkpoint`` (path or URL), which must fit its model.

    ``deploy`` folds the PoolFormer backbone and runs the neck and head channels-last (same
    predictions, faster); ``amp`` ('auto', 'bf16' or 'fp16') runs the backbone, neck and heads
    in mixed precision (see :func:`~poolformer_mm.deploy.precision.amp_dtype`).
    """
    cfg = read_config(config) if isinstance(config, str) else inherit_default_scope(
        copy.deepcopy(config))
    name = f"'{cfg.filename}'" if cfg.filename else 'the config'
    check_checkpoint_path(checkpoint)
    # the inferencers return the pictures; a backend without a save_dir would only warn
    cfg.visualizer = dict(cfg.visualizer, vis_backends=[])
    if task_of(cfg) == 'mmdet':
        keep_labels_apart(cfg)
        inferencer = DetInferencer(model=cfg, weights=checkpoint, device=device,
                                   show_progress=False)
    else:
        inferencer = SegInferencer(model=cfg, weights=checkpoint, device=device)
        inferencer.show_progress = False
    check_neck_in_channels(inferencer.model)
    check_checkpoint_fits(inferencer.model, checkpoint, name)
    if deploy:
        print_log(prepare_for_inference(inferencer.model).describe(), logger='current')
    if amp:
        dtype = log_amp_dtype(device, amp)
        if dtype is not None:
            enable_inference_autocast(inferencer.model, torch.device(device).type, dtype)
    return inferencer


def draw_predictions(config: str, checkpoint: str, inputs: Sequence[str], out_dir: str,
                     device: str = 'cpu', score_thr: float = 0.3,
                     deploy: bool = False, amp: Optional[str] = None) -> List[str]:
    """Draw the predictions on every image of ``inputs`` into ``out_dir/<image stem>.png``:
    boxes (and masks) scoring at least ``score_thr``, or a colour overlay of the classes.

    ``deploy`` and ``amp`` are those of :func:`init_inferencer`. Returns the written paths. Bad
    inputs or outputs are refused before anything is written.
    """
    cfg = read_config(config)
    images = collect_images(inputs)
    out_files = [osp.join(out_dir, osp.splitext(osp.basename(path))[0] + '.png')
                 for path in images]
    drawn_by = {}
    for path, out_file in zip(images, out_files):
        if out_file in drawn_by:
            raise InvalidInputError(
                f"images '{drawn_by[out_file]}' and '{path}' would both be drawn to "
                f"'{out_file}': give them different names, or run them in separate calls with "
                'different --out-dir')
        drawn_by[out_file] = path
    # the pictures found in folders too: one may be a link into out_dir
    refuse_output_over_inputs(out_dir, [*inputs, *images], '--out-dir')
    check_writable(out_dir, '--out-dir')
    check_checkpoint_path(checkpoint)
    # every image is checked before the model is built: a damaged or too thin one stops at once
    for path in images:
        check_image_fits_model(path, read_image_for_inference(path).shape, cfg)
    inferencer = init_inferencer(cfg, checkpoint, device, deploy, amp)
    os.makedirs(out_dir, exist_ok=True)
    kwargs = dict(pred_score_thr=score_thr) if task_of(cfg) == 'mmdet' else dict()
    # lossless PNGs where the user asked, not the inferencers' out_dir/vis/<input name>
    for path, out_file in zip(images, out_files):
        pictures = inferencer([path], return_vis=True, **kwargs)['visualization']
        # MMSegInferencer unwraps the list of a single input
        picture = pictures[0] if isinstance(pictures, list) else pictures
        mmcv.imwrite(mmcv.rgb2bgr(picture), out_file)
    return out_files
