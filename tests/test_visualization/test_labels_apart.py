"""Detection pictures keep their labels readable when boxes overlap."""
import numpy as np
import pytest
import torch
from mmdet.structures import DetDataSample
from mmdet.visualization import DetLocalVisualizer
from mmengine.config import Config
from mmengine.structures import InstanceData

from poolformer_mm.visualization import DetLabelsApartVisualizer, keep_labels_apart


def _label_boxes(visualizer):
    """The pixel boxes of the label texts drawn on the current picture."""
    renderer = visualizer.fig_save.canvas.get_renderer()
    boxes = []
    for text in visualizer.ax_save.texts:
        extent = text.get_window_extent(renderer)
        boxes.append((extent.x0, extent.y0, extent.x1, extent.y1))
    return boxes


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize('cls, apart', [(DetLocalVisualizer, False),
                                        (DetLabelsApartVisualizer, True)])
def test_labels_of_boxes_that_start_together_do_not_cover_each_other(cls, apart):
    visualizer = cls(name=f'labels_{cls.__name__}')
    visualizer.dataset_meta = dict(classes=('circle', 'square', 'triangle'))
    instances = InstanceData(
        bboxes=torch.tensor([[20., 20., 80., 80.], [22., 21., 78., 82.], [23., 22., 60., 50.],
                             [60., 90., 120., 125.]]),
        labels=torch.tensor([0, 2, 1, 1]), scores=torch.tensor([0.443, 0.371, 0.35, 0.9]))
    # (mmdet's own visualiser overlaps them: the check below can tell the two apart)
    visualizer._draw_instances(np.full((128, 128, 3), 120, np.uint8), instances,
                               visualizer.dataset_meta['classes'], None)
    boxes = _label_boxes(visualizer)
    assert len(boxes) == 4
    overlapping = [(i, j) for i in range(4) for j in range(i) if _overlap(boxes[i], boxes[j])]
    assert (not overlapping) == apart, overlapping
    texts = [text.get_text() for text in visualizer.ax_save.texts]
    assert texts == ['circle: 44.3', 'triangle: 37.1', 'square: 35.0', 'square: 90.0']


def test_pictures_with_labels_apart_have_mmdets_size_and_layout():
    visualizer = DetLabelsApartVisualizer(name='labels_layout')
    visualizer.dataset_meta = dict(classes=('circle', 'square', 'triangle'))
    sample = DetDataSample()
    sample.gt_instances = InstanceData(bboxes=torch.tensor([[20., 20., 80., 80.]]),
                                       labels=torch.tensor([0]))
    sample.pred_instances = InstanceData(bboxes=torch.tensor([[20., 20., 80., 80.]]),
                                         labels=torch.tensor([0]), scores=torch.tensor([0.9]))
    visualizer.add_datasample('picture', np.full((96, 128, 3), 90, np.uint8), sample)
    # ground truth on the left, prediction on the right, as mmdet draws them
    assert visualizer.get_image().shape == (96, 256, 3)


@pytest.mark.parametrize('given, used', [('DetLocalVisualizer', 'DetLabelsApartVisualizer'),
                                         ('mmdet.DetLocalVisualizer', 'DetLabelsApartVisualizer'),
                                         ('MyVisualizer', 'MyVisualizer')])
def test_only_mmdets_own_visualiser_is_swapped(given, used):
    cfg = Config(dict(visualizer=dict(type=given, name='visualizer', alpha=0.5)))
    keep_labels_apart(cfg)
    assert cfg.visualizer == dict(type=used, name='visualizer', alpha=0.5)
    # and the config the runner dumps imports what registers it
    assert ('poolformer_mm.visualization' in cfg.get('custom_imports', {}).get('imports', [])) \
        == (used != given)


def test_a_label_at_the_right_edge_moves_inside_the_picture():
    visualizer = DetLabelsApartVisualizer(name='labels_edge')
    instances = InstanceData(bboxes=torch.tensor([[100., 20., 127., 60.]]),
                             labels=torch.tensor([1]), scores=torch.tensor([0.793]))
    visualizer._draw_instances(np.full((128, 128, 3), 120, np.uint8), instances,
                               ('circle', 'square', 'triangle'), None)
    (x0, _, x1, _), = _label_boxes(visualizer)
    assert x1 <= 128 and x0 >= 0
