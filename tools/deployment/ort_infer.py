#!/usr/bin/env python
"""Run an exported model with ONNX Runtime alone (no torch) and draw its prediction.

    python tools/deployment/ort_infer.py FILE.onnx IMAGE --out PIC.png [--score-thr 0.3]

Segmentation: a colour overlay of the class map. Detection: boxes with class names and scores
(Mask R-CNN: and masks).
Normalisation, input size, class names and post-processing settings come from the ONNX file's
metadata (written by tools/deployment/pytorch2onnx.py). Needs onnxruntime, numpy, opencv.
"""
import argparse
import importlib.util
import os.path as osp
import sys

import cv2
import numpy as np
import onnxruntime as ort

_PACKAGE = osp.join(osp.dirname(osp.abspath(__file__)), '..', '..', 'poolformer_mm')


def load_torch_free_module(*path: str):
    """A module of poolformer_mm that needs only the standard library, NumPy and OpenCV, loaded
    by its path: importing the package would import torch and the OpenMMLab stack, which
    running an ONNX model does not need."""
    spec = importlib.util.spec_from_file_location(
        'poolformer_mm_' + osp.splitext(path[-1])[0], osp.join(_PACKAGE, *path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_postprocess():
    """poolformer_mm/deployment/postprocess.py (see :func:`load_torch_free_module`)."""
    return load_torch_free_module('deployment', 'postprocess.py')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model', help='the .onnx file')
    parser.add_argument('image')
    parser.add_argument('--out', required=True, help='the picture to write (e.g. PIC.png)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detection: lowest score drawn')
    parser.add_argument('--threads', type=int, help='ONNX Runtime intra-op threads')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    post = load_postprocess()
    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    if not osp.isfile(args.model):
        sys.exit(f"error: ONNX model '{args.model}' not found")
    try:
        session = ort.InferenceSession(args.model, options, providers=['CPUExecutionProvider'])
    except Exception as err:  # onnxruntime raises its own types for damaged or foreign files
        sys.exit(f"error: ONNX Runtime cannot load '{args.model}': {err}")
    try:
        info = post.read_deploy_info(session.get_modelmeta().custom_metadata_map)
    except ValueError as err:
        sys.exit(f'error: {args.model}: {err}')
    image = cv2.imread(args.image, cv2.IMREAD_COLOR)
    if image is None:
        sys.exit(f"error: image '{args.image}' cannot be read")
    resized, (scale_h, scale_w) = post.resize_for_model(image, info)
    inputs = post.normalize(resized, info)
    outputs = session.run(None, {'input': inputs})
    if info['task'] == 'segmentation':
        classes = outputs[0][0, 0]
        classes = cv2.resize(classes.astype(np.int32), image.shape[1::-1],
                             interpolation=cv2.INTER_NEAREST)
        picture = post.draw_segmentation(image, classes, info)
        found = ', '.join(info['classes'][i] for i in np.unique(classes))
        summary = f'classes present: {found}'
    else:
        found = post.detections_of(dict(zip(info['outputs'], outputs)), info, image.shape[:2],
                                   scale=(scale_h, scale_w))
        dets = found['dets']
        picture = post.draw_detections(image, dets, found['labels'], info, args.score_thr,
                                       found.get('masks'))
        summary = f'{int((dets[:, 4] >= args.score_thr).sum())} detections >= {args.score_thr}'
    if not cv2.imwrite(args.out, picture):
        sys.exit(f"error: cannot write '{args.out}' (unknown extension or folder missing?)")
    print(f'wrote {args.out}: {summary}')


if __name__ == '__main__':
    main()
