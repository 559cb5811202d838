"""``tools/test.py --show-dir`` for segmentors: one picture per test image, in that folder."""
import os
import os.path as osp
from typing import Sequence

import mmcv
from mmengine.fileio import get
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class SegPicturesHook(Hook):
    """Draw every test image's prediction (right of its ground truth, with ``draw_gt``) into
    ``out_dir`` as ``<image name>.png``, as mmdet's hook and ``tools/infer.py`` do (mmseg's nests
    them under ``vis_data/vis_image/`` as ``test_<name>_<step>.png``)."""

    priority = 'NORMAL'

    def __init__(self, out_dir: str, draw_gt: bool = True, backend_args: dict = None):
        self.out_dir = out_dir
        self.draw_gt = draw_gt
        self.backend_args = backend_args

    def before_test(self, runner) -> None:
        os.makedirs(self.out_dir, exist_ok=True)

    def after_test_iter(self, runner, batch_idx: int, data_batch: dict = None,
                        outputs: Sequence = None) -> None:
        for output in outputs or []:
            image = mmcv.imfrombytes(get(output.img_path, backend_args=self.backend_args),
                                     channel_order='rgb')
            name = osp.splitext(osp.basename(output.img_path))[0] + '.png'
            runner.visualizer.add_datasample(
                name, image, data_sample=output, draw_gt=self.draw_gt, show=False,
                out_file=osp.join(self.out_dir, name))
