"""Whether the boxes drawn on a detection picture name the shapes right: what a user sees in the
pictures ``tools/test.py --show-dir`` draws, as one number."""
from typing import List, Optional, Sequence

import numpy as np
import torch
from mmdet.structures.bbox import bbox_overlaps
from pycocotools.coco import COCO
from scipy.optimize import linear_sum_assignment


def pictures_named_right(results: Sequence[dict], ann_file: str, score_thr: float,
                         classes: Optional[Sequence[str]] = None,
                         iou_thr: float = 0.5) -> List[bool]:
    """For each result of ``tools/test.py --out``, whether the picture drawn at ``score_thr`` is
    right: its drawn boxes and the annotated objects pair one to one, each pair of the same class
    with IoU >= ``iou_thr``. Labels index ``classes`` (the data set's, default: every category)
    in the file's category order, as mmdet's ``CocoDataset`` numbers them.
    """
    coco = COCO(ann_file)
    label_of = {cat_id: index
                for index, cat_id in enumerate(coco.getCatIds(catNms=list(classes or [])))}
    verdicts = []
    for result in results:
        annotations = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[result['img_id']],
                                                                iscrowd=False))
                       if a['category_id'] in label_of]
        truth = np.array([[x, y, x + w, y + h] for x, y, w, h in
                          (a['bbox'] for a in annotations)], np.float64).reshape(-1, 4)
        truth_labels = np.array([label_of[a['category_id']] for a in annotations])
        predicted = result['pred_instances']
        drawn = np.asarray(predicted['scores']) >= score_thr
        boxes = np.asarray(predicted['bboxes'], np.float64)[drawn].reshape(-1, 4)
        labels = np.asarray(predicted['labels'])[drawn]
        if len(boxes) != len(truth):
            verdicts.append(False)
            continue
        matches = bbox_overlaps(torch.from_numpy(boxes), torch.from_numpy(truth)).numpy() >= iou_thr
        matches &= labels[:, None] == truth_labels[None, :]
        rows, columns = linear_sum_assignment(matches, maximize=True)  # the most pairs
        verdicts.append(bool(matches[rows, columns].all()))
    return verdicts
