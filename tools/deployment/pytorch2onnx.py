#!/usr/bin/env python
"""Export a segmentor, RetinaNet or (Cascade) Mask R-CNN with a folded backbone to ONNX.

    python tools/deployment/pytorch2onnx.py CONFIG CHECKPOINT --out FILE.onnx \
        [--shape H W] [--dynamic] [--verify] [--image PATH]

Plain ONNX ops (opset 17), NMS in the graph, and the normalisation, class names and
post-processing settings in the file's metadata, for tools/deployment/ort_infer.py (outputs:
docs/deployment.md). ``--verify`` compares ONNX Runtime with PyTorch on an image and exits with
code 1 over tolerance. Needs the deploy extra: pip install -e .[deploy]
"""
import sys

from poolformer_mm.utils.errors import report_user_errors
from poolformer_mm.utils.known_warnings import ignore_known_warnings


@report_user_errors
def main(argv=None):
    from poolformer_mm.cli.export import main as export_main
    return export_main(argv)


if __name__ == '__main__':
    ignore_known_warnings()
    sys.exit(main())
