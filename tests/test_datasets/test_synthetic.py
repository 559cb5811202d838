"""The synthetic data sets: deterministic, valid COCO / ADE20K layouts."""
import hashlib
from pathlib import Path

import cv2
import numpy as np
from pycocotools.coco import COCO

from poolformer_mm.datasets import TOY_COCO_CLASSES, make_toy_ade, make_toy_coco


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(Path(root).rglob('*')):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_toy_coco_is_deterministic(tmp_path):
    assert _digest(make_toy_coco(str(tmp_path / 'a'), 4, 2)) == \
        _digest(make_toy_coco(str(tmp_path / 'b'), 4, 2))
    assert _digest(make_toy_coco(str(tmp_path / 'c'), 4, 2, seed=1)) != _digest(tmp_path / 'a')


def test_toy_coco_is_valid_coco_with_masks_matching_boxes(tmp_path):
    root = Path(make_toy_coco(str(tmp_path / 'coco'), num_train=6, num_val=2, image_size=96))
    coco = COCO(str(root / 'annotations/instances_train2017.json'))
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(TOY_COCO_CLASSES)
    assert len(coco.getImgIds()) == 6 and len(coco.getAnnIds()) >= 6
    for ann in coco.loadAnns(coco.getAnnIds()):
        mask = coco.annToMask(ann)
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann['bbox']
        assert abs(xs.min() - x) <= 1 and abs(ys.min() - y) <= 1
        assert abs(xs.max() + 1 - (x + w)) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1
        assert mask.sum() == ann["area"]
    image = cv2.imread(str(root / 'train2017' / coco.loadImgs(1)[0]['file_name']))
    assert image.shape == (96, 96, 3)


def test_toy_coco_shapes_are_large_and_stand_out_from_their_background(tmp_path):
    """What makes the toy detection demo work from scratch in minutes: no box smaller than a
    fifth of the image side, and no shape in a colour close to the background around it."""
    root = Path(make_toy_coco(str(tmp_path / 'coco'), num_train=24, num_val=2))
    coco = COCO(str(root / 'annotations/instances_train2017.json'))
    for image_info in coco.loadImgs(coco.getImgIds()):
        image = cv2.imread(str(root / 'train2017' / image_info['file_name'])).astype(np.float32)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_info['id']))
        masks = [coco.annToMask(ann) for ann in anns]
        shapes = np.any(masks, axis=0)
        for ann, mask in zip(anns, masks):
            assert max(ann['bbox'][2:]) >= 0.2 * 128, ann
            inside = cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)
            ring = cv2.dilate(mask, np.ones((7, 7), np.uint8)).astype(bool) & ~shapes
            contrast = np.abs(image[inside].mean(0) - image[ring].mean(0)).sum()
            assert contrast > 120, (image_info['file_name'], ann['id'], contrast)


def test_toy_ade_uses_reduce_zero_labels(tmp_path):
    root = Path(make_toy_ade(str(tmp_path / 'ade'), num_train=3, num_val=2, image_size=(64, 80)))
    labels = sorted((root / 'annotations/training').glob('*.png'))
    images = sorted((root / 'images/training').glob('*.jpg'))
    assert [p.stem for p in labels] == [p.stem for p in images] and len(images) == 3
    assert len(list((root / 'images/validation').glob('*.jpg'))) == 2
    values = np.unique(np.concatenate([cv2.imread(str(p), cv2.IMREAD_UNCHANGED).ravel()
                                       for p in labels]))
    label = cv2.imread(str(labels[0]), cv2.IMREAD_UNCHANGED)
    assert label.dtype == np.uint8 and label.shape == (64, 80)
    assert values[0] == 0 and values.max() <= 5 and len(values) >= 3  # 0 = unlabelled borders
