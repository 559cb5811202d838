"""What runs around an exported ONNX model: pre-processing, detection post-processing, drawing,
set by the deploy information in the model's ``metadata_props``. NumPy and OpenCV only, no import
from the rest of the package: ``tools/deployment/ort_infer.py`` loads this file by its path.
"""
import json

import cv2
import numpy as np

METADATA_KEY = 'poolformer_mm.deploy'


def read_deploy_info(metadata: dict, input_shape=None, outputs=None) -> dict:
    """The deploy information of an ONNX model's custom metadata (str -> str); a ``ValueError``
    names what is wrong (:func:`deploy_info_problem`)."""
    if METADATA_KEY not in metadata:
        raise ValueError(f'the ONNX model has no {METADATA_KEY!r} metadata: export it with '
                         'tools/deployment/pytorch2onnx.py')
    try:
        info = json.loads(metadata[METADATA_KEY])
    except ValueError as error:
        info, problem = None, f'is not valid JSON ({error})'
    else:
        problem = deploy_info_problem(info, input_shape, outputs)
    if problem:
        raise ValueError(f'the ONNX model\'s {METADATA_KEY!r} metadata {problem}: it was '
                         'changed after export; export the model again with '
                         'tools/deployment/pytorch2onnx.py')
    return info


def session_deploy_info(session) -> dict:
    """:func:`read_deploy_info` of an ONNX Runtime session, checked against its graph."""
    return read_deploy_info(session.get_modelmeta().custom_metadata_map,
                            session.get_inputs()[0].shape, [o.name for o in session.get_outputs()])


# the outputs an export of each task has (export.py), without and with the optional last one
TASK_OUTPUTS = dict(segmentation=(['output'], ['output', 'logits']),
                    detection=(['dets', 'labels'], ['dets', 'labels', 'masks']))


def _numbers(value, count: int, least=None) -> bool:
    """Whether ``value`` is a list of ``count`` numbers (integers >= ``least`` if given)."""
    kinds = int if least is not None else (int, float)
    return (isinstance(value, list) and len(value) == count
            and all(isinstance(v, kinds) and not isinstance(v, bool) for v in value)
            and (least is None or all(v >= least for v in value)))


REQUIRED_KEYS = ('input_size', 'dynamic', 'mean', 'std', 'to_rgb', 'classes', 'outputs')
# each key the runtime side reads: whether a value fits, and what a value that does not is not
SCHEMA = dict(
    input_size=(lambda v: _numbers(v, 2, least=1), 'not two positive integers (height, width)'),
    size_divisor=(lambda v: _numbers([v], 1, least=1), 'not a positive integer'),
    dynamic=(lambda v: isinstance(v, bool), 'not true or false'),
    to_rgb=(lambda v: isinstance(v, bool), 'not true or false'),
    mean=(lambda v: _numbers(v, 3), 'not three numbers'),
    std=(lambda v: _numbers(v, 3) and all(v), 'not three non-zero numbers'),
    classes=(lambda v: isinstance(v, list) and v and all(isinstance(c, str) for c in v),
             'not a list of names'),
    palette=(lambda v: v is None or isinstance(v, list) and all(_numbers(c, 3, 0) for c in v),
             'not a list of RGB colours'),
    detection=(lambda v: isinstance(v, dict), 'not a mapping'))


def deploy_info_problem(info, input_shape=None, outputs=None):
    """What is wrong with parsed deploy information, as "has ..." (None if nothing): the first
    key that is missing, does not fit, or disagrees with another or with the graph's
    ``input_shape`` (N, C, H, W) and ``outputs`` (names)."""
    if not isinstance(info, dict) or 'task' not in info:
        return 'has no task'
    task = info['task']
    if task not in TASK_OUTPUTS:
        return f"has task {json.dumps(task)}, neither 'segmentation' nor 'detection'"
    if info.get('outputs', TASK_OUTPUTS[task][0]) not in TASK_OUTPUTS[task]:
        expected = ' or '.join(map(json.dumps, TASK_OUTPUTS[task]))
        return (f"has task {json.dumps(task)} and outputs {json.dumps(info['outputs'])}, "
                f'which do not go together (a {task} model outputs {expected})')
    missing = [key for key in REQUIRED_KEYS + ('detection', ) * (task == 'detection')
               if key not in info]
    if missing:
        return f"has no {', '.join(missing)} entry"
    for key, (fits, what) in SCHEMA.items():
        if key in info and not fits(info[key]):
            value = json.dumps(info[key])
            return f"has {key} {value if len(value) < 60 else value[:56] + ' ...'}, {what}"
    classes, palette = info['classes'], info.get('palette')
    if palette is not None and len(palette) != len(classes):
        return (f'has {len(classes)} class names and {len(palette)} palette colours (one for '
                'each class)')
    if outputs is not None and list(outputs) != info['outputs']:
        return (f"has outputs {json.dumps(info['outputs'])}, and the model outputs "
                f'{json.dumps(list(outputs))}')
    detection = info.get('detection', {})
    if task == 'detection' and detection.get('num_classes') != len(classes):
        return (f"has {len(classes)} class names, and the model's detection.num_classes is "
                f"{detection.get('num_classes')}")
    if 'masks' in info['outputs'] and not _numbers([detection.get('mask_thr_binary')], 1):
        return 'has no number for detection.mask_thr_binary'
    if input_shape is not None:
        size = list(input_shape[2:])
        graph_dynamic = not all(isinstance(side, int) for side in size)
        if info['dynamic'] != graph_dynamic:
            return 'has dynamic {}, and the model takes {}'.format(
                json.dumps(info['dynamic']),
                'any input size' if graph_dynamic else f'{size[0]}x{size[1]} inputs only')
        if not graph_dynamic and info['input_size'] != size:
            return (f"has input_size {json.dumps(info['input_size'])}, and the model takes "
                    f'{size[0]}x{size[1]} inputs')
    return None


def resize_for_model(image: np.ndarray, info: dict, shape=None):
    """The BGR ``image`` resized for the model, and its (h, w) scale: a static model's export
    size; for a dynamic one ``shape`` (H, W), or the image's aspect ratio within the export size
    rounded up to the size divisor."""
    height, width = image.shape[:2]
    if not info['dynamic']:
        target = tuple(info['input_size'])
    elif shape is not None:
        target = tuple(shape)
    else:
        ratio = min(info['input_size'][0] / height, info['input_size'][1] / width)
        divisor = info.get('size_divisor', 1)
        target = tuple(int(np.ceil(round(side * ratio) / divisor) * divisor)
                       for side in (height, width))
    resized = cv2.resize(image, target[::-1], interpolation=cv2.INTER_LINEAR)
    return resized, (target[0] / height, target[1] / width)


def normalize(image: np.ndarray, info: dict) -> np.ndarray:
    """(H, W, 3) BGR uint8 -> (1, 3, H, W) float32, as the config's data preprocessor does."""
    pixels = image[..., ::-1] if info['to_rgb'] else image
    pixels = (pixels.astype(np.float32) - np.float32(info['mean'])) / np.float32(info['std'])
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


def detections_of(outputs: dict, info: dict, image_shape, scale=(1.0, 1.0)) -> dict:
    """Image 0's detections from the model's outputs by name, without the padding rows, for an
    image of ``image_shape`` (H, W) that the model's input is ``scale`` (h, w) times: ``dets``
    (K, 5), ``labels`` (K,) and, for Mask R-CNN, ``masks`` (K, H, W) bool."""
    labels = outputs['labels'][0]
    kept = labels >= 0
    dets = outputs['dets'][0][kept].copy()
    dets[:, :4] /= np.float32([scale[1], scale[0]] * 2)  # x by the width's scale, y the height's
    result = dict(dets=dets, labels=labels[kept])
    if 'masks' in outputs:
        result['masks'] = paste_masks(outputs['masks'][0][kept], dets[:, :4], image_shape,
                                      info['detection']['mask_thr_binary'])
    return result


def _paste_weights(start: float, end: float, size: int, grid: int) -> np.ndarray:
    """(size, grid) bilinear weights of the grid cells for the pixel centres of an image axis,
    the grid spread over [start, end] (``grid_sample``, ``align_corners=False``)."""
    extent = end - start
    if extent == 0:  # mmdet samples the grid's middle for a box without width
        position = np.full(size, (grid - 1) / 2, np.float32)
    else:
        position = (np.arange(size, dtype=np.float32) + 0.5 - start) / extent * grid - 0.5
    # a tent around each cell: the two neighbours of a position share it, cells outside are 0
    return np.clip(1 - np.abs(position[:, None] - np.arange(grid, dtype=np.float32)), 0, None)


def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_shape,
                threshold: float = 0.5) -> np.ndarray:
    """(K, m, m) mask probabilities in their (K, 4) boxes -> (K, H, W) bool image masks, as
    mmdet's ``FCNMaskHead`` (bilinear sampling is separable: ``rows @ mask @ cols.T``)."""
    height, width = (int(s) for s in image_shape)
    pasted = np.zeros((len(masks), height, width), bool)
    for i, (mask, (x1, y1, x2, y2)) in enumerate(zip(masks, boxes)):
        rows = _paste_weights(y1, y2, height, mask.shape[0])
        cols = _paste_weights(x1, x2, width, mask.shape[1])
        pasted[i] = rows @ mask.astype(np.float32) @ cols.T >= threshold
    return pasted


def _colours(count: int) -> np.ndarray:
    rng = np.random.default_rng(42)  # fixed, so a class keeps its colour between runs
    return rng.integers(40, 256, (count, 3))


def draw_segmentation(image: np.ndarray, classes: np.ndarray, info: dict,
                      opacity: float = 0.5) -> np.ndarray:
    """Blend a colour per class (the config's palette, RGB) over a BGR image of the same size."""
    palette = info.get('palette') or _colours(len(info['classes'])).tolist()
    colours = np.asarray(palette, np.uint8)[:, ::-1]  # RGB -> BGR
    overlay = colours[np.clip(classes, 0, len(colours) - 1)]
    return cv2.addWeighted(image, 1 - opacity, overlay, opacity, 0)


def draw_detections(image: np.ndarray, dets: np.ndarray, labels: np.ndarray, info: dict,
                    score_thr: float = 0.3, masks=None) -> np.ndarray:
    """Boxes with class name and score (and masks, (K, H, W) bool at the image's size, half
    opaque) for detections at or above ``score_thr``."""
    image = image.copy()
    names = info['classes']
    colours = _colours(len(names))
    for i, ((x1, y1, x2, y2, score), label) in enumerate(zip(dets, labels)):
        if score < score_thr:
            continue
        colour = tuple(int(c) for c in colours[label])
        if masks is not None:
            image[masks[i]] = (image[masks[i]] * 0.5 + np.float32(colour) * 0.5).astype(np.uint8)
        cv2.rectangle(image, (int(x1), int(y1)), (int(x2), int(y2)), colour, 1)
        cv2.putText(image, f'{names[label]} {score:.2f}', (int(x1), max(int(y1) - 2, 8)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.3, colour, 1, cv2.LINE_AA)
    return image
