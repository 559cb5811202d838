"""Draw a detector's or segmentor's predictions on image files, with the upstream visualisers."""
import os
import os.path as osp
from typing import List, Sequence

from mmengine.config import Config

from ..engine import switch_backbone_to_deploy
from ..engine.safe_checkpoints import check_checkpoint_path
from .checkpoint_fit import check_checkpoint_fits
from .data_checks import check_image_fits_model, read_image_for_inference
from .eval_metrics import task_of

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
            raise FileNotFoundError(f"input '{path}' is neither an image file nor a folder")
    if not images:
        raise FileNotFoundError(f'no images ({", ".join(IMAGE_SUFFIXES)}) found in {list(inputs)}')
    return images


def draw_predictions(config: str, checkpoint: str, inputs: Sequence[str], out_dir: str,
                     device: str = 'cpu', score_thr: float = 0.3,
                     deploy: bool = False) -> List[str]:
    """Run the model on every image of ``inputs`` and write one PNG per image to ``out_dir``.

    Detection configs get boxes (and masks, for instance segmentation); segmentation configs get
    a colour overlay of the predicted classes. ``deploy`` folds the PoolFormer backbone after
    loading (same predictions, faster). Returns the written paths.
    """
    cfg = Config.fromfile(config)
    images = collect_images(inputs)
    check_checkpoint_path(checkpoint)
    if task_of(cfg) == 'mmdet':
        from mmdet.apis import inference_detector as infer
        from mmdet.apis import init_detector as init
        from mmdet.registry import VISUALIZERS
        draw_kwargs = dict(pred_score_thr=score_thr)
    else:
        from mmseg.apis import inference_model as infer
        from mmseg.apis import init_model as init
        from mmseg.registry import VISUALIZERS
        draw_kwargs = dict()
    model = init(cfg, checkpoint, device=device)
    check_checkpoint_fits(model, checkpoint, f"'{config}'")
    if deploy:
        switch_backbone_to_deploy(model)
    visualizer_cfg = dict(model.cfg.visualizer, name='poolformer_mm_inference', vis_backends=[])
    visualizer = VISUALIZERS.build(visualizer_cfg)
    visualizer.dataset_meta = model.dataset_meta
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for path in images:
        # Decode and check each image before the model's pipeline does, so a damaged file or one
        # too thin for the test resize stops with its name instead of an OpenCV assertion.
        image = read_image_for_inference(path)
        check_image_fits_model(path, image.shape, model.cfg)
        result = infer(model, path)
        if task_of(cfg) == 'mmseg':
            # mmseg's visualiser indexes the picture with the predicted label tensor, where a
            # one-pixel tensor acts as the scalar index 1 (IndexError on a 1x1 image); a numpy
            # label map draws the same picture at every size.
            result.pred_sem_seg.data = result.pred_sem_seg.data.cpu().numpy()
        out_file = osp.join(out_dir, osp.splitext(osp.basename(path))[0] + '.png')
        visualizer.add_datasample(osp.basename(path), image, data_sample=result, draw_gt=False,
                                  show=False, out_file=out_file, **draw_kwargs)
        written.append(out_file)
    return written
