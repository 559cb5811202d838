#!/usr/bin/env python
"""Run an exported model with ONNX Runtime alone (no torch) and draw its prediction.

    python tools/deployment/ort_infer.py FILE.onnx IMAGE --out PIC.png [--score-thr 0.3]

Segmentation: a colour overlay of the class map; detection: boxes, class names, scores (and
masks). The settings come from the file's metadata. Needs onnxruntime, numpy, opencv.
"""
import argparse
import importlib.util
import os.path as osp

import cv2
import numpy as np
import onnxruntime as ort

_PACKAGE = osp.join(osp.dirname(osp.abspath(__file__)), '..', '..', 'poolformer_mm')
AGAIN = 'export the model again with tools/deployment/pytorch2onnx.py'


def load_torch_free_module(*path: str):
    """A torch-free module of poolformer_mm, loaded by its path (not importing the package)."""
    spec = importlib.util.spec_from_file_location(
        'poolformer_mm_' + osp.splitext(path[-1])[0], osp.join(_PACKAGE, *path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


errors = load_torch_free_module('utils', 'errors.py')  # the package's error classes, torch-free
post = load_torch_free_module('deploy', 'onnx', 'postprocess.py')


def check_file(path: str, what: str, give: str) -> None:
    """An InputNotFoundError for a ``path`` that is missing or a folder."""
    if not osp.isfile(path):
        why = f'is a folder; give {give}' if osp.isdir(path) else 'not found; check the path'
        raise errors.InputNotFoundError(f"{what} '{path}' {why}")


def check_output(out: str, inputs, flag: str = '--out') -> None:
    """Refuse an output path that is one of ``inputs`` or a symbolic link."""
    if osp.islink(out):
        raise errors.InvalidInputError(f"{flag} '{out}' is a symbolic link: writing there would "
                                       'overwrite the file it points to; give another path')
    if any(osp.exists(path) and osp.exists(out) and osp.samefile(out, path) for path in inputs):
        raise errors.InvalidInputError(f"{flag} '{out}' is one of the inputs: writing there "
                                       'would replace it; give another path')


def open_export(path: str, threads=None):
    """An ONNX Runtime CPU session and the checked deploy information of an exported model."""
    check_file(path, 'ONNX model', 'the .onnx file')
    if not osp.getsize(path):
        raise errors.InvalidInputError(f"ONNX model '{path}' is empty; {AGAIN}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default
    try:
        session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    except Exception as err:  # onnxruntime raises its own types for damaged or foreign files
        reason = str(err).splitlines()[0].split('failed:')[-1].strip()
        raise errors.InvalidInputError(f"ONNX Runtime cannot load '{path}' ({reason}): it is "
                                       f'truncated or not an ONNX model; {AGAIN}') from None
    try:
        return session, post.session_deploy_info(session)
    except ValueError as err:
        raise errors.InvalidInputError(f'{path}: {err}') from None


def read_image(path: str) -> np.ndarray:
    """A BGR image; a UserInputError for a missing file or one OpenCV cannot decode."""
    check_file(path, 'image', 'an image file')
    logging, level = cv2.utils.logging, cv2.utils.logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_SILENT)  # its lines about a damaged file: ours says it
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    logging.setLogLevel(level)
    if image is None:
        raise errors.InvalidInputError(f"image '{path}' cannot be read (damaged, or not an "
                                       'image); give a .jpg, .png or .bmp')
    return image


@errors.report_user_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model', help='the .onnx file')
    parser.add_argument('image')
    parser.add_argument('--out', required=True, help='the picture to write (e.g. PIC.png)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detection: lowest score drawn')
    parser.add_argument('--threads', type=int, help='ONNX Runtime intra-op threads')
    args = parser.parse_args(argv)
    check_output(args.out, [args.model, args.image])
    session, info = open_export(args.model, args.threads)
    image = read_image(args.image)
    resized, scale = post.resize_for_model(image, info)
    outputs = session.run(None, {'input': post.normalize(resized, info)})
    if info['task'] == 'segmentation':
        classes = cv2.resize(outputs[0][0, 0].astype(np.int32), image.shape[1::-1],
                             interpolation=cv2.INTER_NEAREST)
        if classes.max() >= len(info['classes']):  # the names were shortened after export
            raise errors.InvalidInputError(
                f'{args.model}: the model outputs class {classes.max()}, and its '
                f"{post.METADATA_KEY!r} metadata has {len(info['classes'])} class names: it was "
                f'changed after export; {AGAIN}')
        picture = post.draw_segmentation(image, classes, info)
        summary = 'classes present: ' + ', '.join(info['classes'][i] for i in np.unique(classes))
    else:
        found = post.detections_of(dict(zip(info['outputs'], outputs)), info, image.shape[:2],
                                   scale)
        picture = post.draw_detections(image, found['dets'], found['labels'], info,
                                       args.score_thr, found.get('masks'))
        summary = (f"{int((found['dets'][:, 4] >= args.score_thr).sum())} detections >= "
                   f'{args.score_thr}')
    if not (cv2.haveImageWriter(args.out) and cv2.imwrite(args.out, picture)):
        raise errors.InvalidInputError(f"cannot write '{args.out}' (unknown extension or folder "
                                       'missing?)')
    print(f'wrote {args.out}: {summary}')


if __name__ == '__main__':
    main()
