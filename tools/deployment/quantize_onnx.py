#!/usr/bin/env python
"""Quantise an exported model to int8 with ONNX Runtime (static, calibrated on images).

    python tools/deployment/quantize_onnx.py FILE.onnx CALIB_IMAGES_OR_FOLDER --out FILE_int8.onnx

Weights int8 per output channel (7-bit with ``--reduce-range``), activations uint8 calibrated
(min-max) on the images, in QDQ format; the metadata is kept for tools/deployment/ort_infer.py.
Measured on the toy Semantic FPN only: check a detector's accuracy. Needs onnxruntime (no torch).
"""
import argparse
import glob
import os
import os.path as osp
import sys
import tempfile

from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import ort_infer  # noqa: E402

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp')
# CPU flags (Linux /proc/cpuinfo names) of instructions that multiply uint8 by int8 into 32 bits;
# without them ONNX Runtime sums pairs of products in 16 bits, which saturate with 8-bit weights
VNNI_CPU_FLAGS = ('avx512_vnni', 'avx_vnni', 'amx_int8')


def reduce_range_choice(choice, cpuinfo='/proc/cpuinfo'):
    """``(reduce_range, why)`` for ``--reduce-range CHOICE`` ('auto', 'yes' or 'no')."""
    if choice != 'auto':
        return choice == 'yes', f'--reduce-range {choice}'
    flags = ort_infer.load_torch_free_module('utils', 'cpu_flags.py').cpu_flags(cpuinfo)
    if flags is None:
        return False, ('no x86 CPU flags to read (not Linux, or not x86); --reduce-range yes '
                       'for an x86 CPU without VNNI')
    vnni = [flag for flag in VNNI_CPU_FLAGS if flag in flags]
    if vnni:
        return False, f"this CPU has {', '.join(vnni)}"
    return True, (f"this CPU has no VNNI (none of {', '.join(VNNI_CPU_FLAGS)}), where 8-bit "
                  'weights saturate')


class ImageReader(CalibrationDataReader):
    """The model's normalised inputs for the calibration images, one at a time."""

    def __init__(self, paths, info):
        post = ort_infer.post
        self.inputs = ({'input': post.normalize(post.resize_for_model(image, info)[0], info)}
                       for image in map(ort_infer.read_image, paths))

    def get_next(self):
        return next(self.inputs, None)


def calibration_images(inputs, limit):
    paths = []
    for item in inputs:
        if osp.isdir(item):
            paths += sorted(p for p in glob.glob(osp.join(item, '*'))
                            if p.lower().endswith(IMAGE_SUFFIXES))
        else:
            paths.append(item)
    if not paths:
        sys.exit(f'error: no calibration images in {", ".join(inputs)}')
    return paths[:limit]


@ort_infer.errors.report_user_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model', help='the float .onnx file (tools/deployment/pytorch2onnx.py)')
    parser.add_argument('calib', nargs='+', help='calibration images or folders of images')
    parser.add_argument('--out', required=True, help='the int8 .onnx file to write')
    parser.add_argument('--num', type=int, default=32, help='at most this many images')
    parser.add_argument('--reduce-range', choices=['auto', 'yes', 'no'], default='auto',
                        help='7-bit weights, for CPUs without VNNI, where ONNX Runtime sums '
                        'products of 8-bit weights in 16 bits, which saturate. auto: yes when '
                        'this CPU has no VNNI; name the target CPU\'s choice otherwise')
    args = parser.parse_args(argv)
    info = ort_infer.open_export(args.model)[1]  # a missing, damaged or changed file: one line
    images = [osp.abspath(path) for path in calibration_images(args.calib, args.num)]
    ort_infer.check_output(args.out, [args.model, *images])
    reduce_range, why = reduce_range_choice(args.reduce_range)
    model_path, out_path, cwd = osp.abspath(args.model), osp.abspath(args.out), os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)  # ONNX Runtime's shape inference writes temporary files there
        try:
            # symbolic shape inference gives up on dynamic height and width, ONNX's own does not
            prepared = osp.join(folder, 'prepared.onnx')
            quant_pre_process(model_path, prepared, skip_symbolic_shape=info['dynamic'])
            quantize_static(prepared, out_path, ImageReader(images, info),
                            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=True,
                            reduce_range=reduce_range)
        finally:
            os.chdir(cwd)
    bits = '7-bit' if reduce_range else '8-bit'
    print(f'wrote {args.out}: int8 ({bits} weights: {why}), calibrated on {len(images)} images')


if __name__ == '__main__':
    main()
