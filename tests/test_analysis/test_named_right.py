"""Counting the detection pictures whose drawn boxes name every object right."""
import json

import numpy as np
import pytest

from poolformer_mm.analysis.named_right import pictures_named_right


@pytest.fixture
def ann_file(tmp_path):
    # categories in the file's order: square (id 7), circle (3), triangle (9): labels 0, 1, 2
    # as mmdet numbers them; image 5 has a circle and a triangle
    content = dict(
        images=[dict(id=5, file_name='a.png', width=128, height=128)],
        categories=[dict(id=7, name='square'), dict(id=3, name='circle'),
                    dict(id=9, name='triangle')],
        annotations=[dict(id=1, image_id=5, category_id=3, bbox=[10, 10, 40, 40], area=1600,
                          iscrowd=0),
                     dict(id=2, image_id=5, category_id=9, bbox=[60, 60, 50, 40], area=2000,
                          iscrowd=0)])
    path = tmp_path / 'instances.json'
    path.write_text(json.dumps(content))
    return str(path)


def _result(boxes, labels, scores):
    return dict(img_id=5, pred_instances=dict(bboxes=np.array(boxes, np.float32),
                                              labels=np.array(labels),
                                              scores=np.array(scores, np.float32)))


CIRCLE, TRIANGLE = [12, 9, 50, 52], [61, 58, 108, 100]


@pytest.mark.parametrize('boxes, labels, scores, right', [
    ([CIRCLE, TRIANGLE], [1, 2], [0.9, 0.6], True),
    # a box under the score is not drawn
    ([CIRCLE, TRIANGLE, [0, 0, 30, 30]], [1, 2, 0], [0.9, 0.6, 0.49], True),
    ([CIRCLE, TRIANGLE], [0, 2], [0.9, 0.6], False),                 # wrong class
    ([CIRCLE, TRIANGLE], [1, 2], [0.9, 0.4], False),                 # object not drawn
    ([CIRCLE, TRIANGLE, TRIANGLE], [1, 2, 0], [0.9, 0.6, 0.55], False),  # second label
    ([CIRCLE, TRIANGLE, [0, 0, 30, 30]], [1, 2, 1], [0.9, 0.6, 0.7], False),  # on nothing
    ([CIRCLE, [80, 80, 128, 128]], [1, 2], [0.9, 0.9], False),       # IoU under 0.5
    ([CIRCLE, CIRCLE], [1, 1], [0.9, 0.9], False),                   # two on one object
])
def test_a_picture_is_right_when_drawn_boxes_and_objects_pair_by_class(ann_file, boxes, labels,
                                                                       scores, right):
    assert pictures_named_right([_result(boxes, labels, scores)], ann_file, 0.5) == [right]


def test_labels_index_the_data_sets_classes_in_the_files_order(ann_file):
    # a data set of circles and triangles only: circle 0, triangle 1; squares are not its objects
    result = _result([CIRCLE, TRIANGLE], [0, 1], [0.9, 0.6])
    assert pictures_named_right([result], ann_file, 0.5, classes=('triangle', 'circle')) == [True]
    assert pictures_named_right([result], ann_file, 0.5) == [False]
