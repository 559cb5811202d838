"""Small synthetic data sets in the standard COCO and ADE20K layouts, for demos and tests.

Everything is drawn from one seeded random generator: the same arguments give identical files.
"""
import json
import math
import os
import os.path as osp
from typing import List, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

TOY_COCO_CLASSES = ('circle', 'square', 'triangle')
# Up to 3 shapes per image, of circumradius 15-27 % of the image side (the sizes the toy
# RetinaNet's stride-8 and stride-16 anchors cover), in colours that stand out.
_MAX_SHAPES = 3
_RADIUS = (0.15, 0.27)
_MIN_CONTRAST = 180


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour gradient plus blurred noise and faint stripes: texture, but no shapes."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(40, 200, 3)
    slope = rng.uniform(-60, 60, (2, 3))
    image = base + xs[..., None] * slope[0] + ys[..., None] * slope[1]
    noise = cv2.GaussianBlur(rng.normal(0, 25, (size, size, 3)).astype(np.float32), (0, 0), 2)
    angle, period = rng.uniform(0, math.pi), rng.uniform(6, 16)
    stripes = 10 * np.sin((xs * math.cos(angle) + ys * math.sin(angle)) * size / period * 2 *
                          math.pi)
    image = image + noise + stripes[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


# Upright shapes (a turned square or triangle looks like a circle to a briefly trained detector):
# (angle of the first corner, corners).
_UPRIGHT = {'circle': (0., 24), 'square': (math.pi / 4, 4), 'triangle': (-math.pi / 2, 3)}


def _place_shapes(rng: np.random.Generator, size: int) -> List[Tuple[str, np.ndarray]]:
    """Non-overlapping shapes (so every instance mask is exactly what is visible)."""
    placed, circles = [], []
    for _ in range(int(rng.integers(1, _MAX_SHAPES + 1))):
        for _attempt in range(50):
            radius = rng.uniform(size * _RADIUS[0], size * _RADIUS[1])
            cx, cy = rng.uniform(radius + 2, size - radius - 2, 2)
            if all(math.hypot(cx - x, cy - y) > radius + r + 3 for x, y, r in circles):
                break
        else:
            continue
        kind = TOY_COCO_CLASSES[int(rng.integers(len(TOY_COCO_CLASSES)))]
        circles.append((cx, cy, radius))
        start, corners = _UPRIGHT[kind]
        steps = start + np.arange(corners) * 2 * math.pi / corners
        placed.append((kind, np.stack([cx + radius * np.cos(steps), cy + radius * np.sin(steps)],
                                      axis=1)))
    return placed


def _contrasting_colour(rng: np.random.Generator, image: np.ndarray,
                        polygon: np.ndarray) -> List[int]:
    """A random colour at least _MIN_CONTRAST (summed over the channels) away from the mean of
    the background it covers."""
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(polygon).astype(np.int32)], 1)
    under = image[mask.astype(bool)].mean(axis=0)
    while True:  # over half of all colours qualify, whatever the background
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - under).sum() >= _MIN_CONTRAST:
            return [int(c) for c in colour]


def _draw_coco_split(root: str, split: str, num_images: int, size: int,
                     rng: np.random.Generator) -> None:
    os.makedirs(osp.join(root, split), exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        image = _background(rng, size)
        for kind, polygon in _place_shapes(rng, size):
            colour = _contrasting_colour(rng, image, polygon)
            cv2.fillPoly(image, [np.round(polygon).astype(np.int32)], colour)
            segmentation = [np.round(polygon, 1).flatten().tolist()]
            # Box and area as COCO defines them: from the polygon rasterised by pycocotools.
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, size, size))
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image_id,
                category_id=TOY_COCO_CLASSES.index(kind) + 1,
                bbox=[round(float(v), 2) for v in mask_utils.toBbox(rle)],
                area=float(mask_utils.area(rle)), iscrowd=0, segmentation=segmentation))
        file_name = f'{image_id:06d}.png'
        cv2.imwrite(osp.join(root, split, file_name), image)
        images.append(dict(id=image_id, file_name=file_name, width=size, height=size))
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(TOY_COCO_CLASSES)]
    with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories), f)


def make_toy_coco(root: str, num_train: int = 320, num_val: int = 16, image_size: int = 128,
                  seed: int = 0) -> str:
    """Write a COCO-format instance segmentation set of circles, squares and triangles to
    ``root/{train2017,val2017}/*.png`` and ``root/annotations/instances_{train2017,val2017}.json``
    (COCO 2017's names, so that ``--data-root`` points a stock COCO config at it); return root.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    _draw_coco_split(root, 'train2017', num_train, image_size, rng)
    _draw_coco_split(root, 'val2017', num_val, image_size, rng)
    return root


TOY_ADE_CLASSES = ('sky', 'tree', 'grass', 'water', 'road')
# A mean colour (BGR) per class, far enough apart that colour plus texture identify the class.
_TOY_ADE_COLOURS = np.array([[235, 180, 120], [40, 110, 40], [60, 200, 90], [170, 90, 30],
                             [110, 110, 110]], np.float32)
TOY_ADE_PALETTE = [[int(c) for c in colour[::-1]] for colour in _TOY_ADE_COLOURS]


def _draw_ade_split(root: str, split: str, num_images: int, size: Tuple[int, int],
                    rng: np.random.Generator) -> None:
    height, width = size
    image_dir, label_dir = osp.join(root, 'images', split), osp.join(root, 'annotations', split)
    for folder in (image_dir, label_dir):
        os.makedirs(folder, exist_ok=True)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for index in range(1, num_images + 1):
        # Voronoi regions around a few seeds, each seed with a class.
        num_seeds = int(rng.integers(3, 7))
        seeds = rng.uniform(0, 1, (num_seeds, 2)) * (height, width)
        classes = rng.integers(0, len(TOY_ADE_CLASSES), num_seeds)
        distance = np.stack([np.hypot(ys - y, xs - x) for y, x in seeds])
        order = np.sort(distance, axis=0)
        region = np.argmin(distance, axis=0)
        label = classes[region].astype(np.uint8) + 1  # 1..K; 0 is "unlabelled" in ADE20K
        label[order[1] - order[0] < 1.5] = 0  # region borders stay unlabelled
        image = _TOY_ADE_COLOURS[classes[region]]
        texture = cv2.GaussianBlur(rng.normal(0, 30, (height, width, 3)).astype(np.float32),
                                   (0, 0), 1.5)
        image = np.clip(image + texture + rng.normal(0, 15, 3), 0, 255).astype(np.uint8)
        name = f'ADE_{split}_{index:08d}'
        cv2.imwrite(osp.join(image_dir, name + '.jpg'), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(osp.join(label_dir, name + '.png'), label)


def make_toy_ade(root: str, num_train: int = 48, num_val: int = 16,
                 image_size: Tuple[int, int] = (128, 160), seed: int = 0) -> str:
    """Write an ADE20K-layout semantic segmentation set of textured regions of five classes to
    ``root/images/{training,validation}/*.jpg`` and ``root/annotations/{training,validation}/*.png``
    (0 = unlabelled, 1..5 = classes: read with ``reduce_zero_label=True``); return root.
    """
    rng = np.random.default_rng(seed)
    _draw_ade_split(root, 'training', num_train, image_size, rng)
    _draw_ade_split(root, 'validation', num_val, image_size, rng)
    return root
