#!/usr/bin/env python
"""Export a segmentor, RetinaNet or (Cascade) Mask R-CNN with a folded backbone to ONNX.

    python tools/deployment/pytorch2onnx.py CONFIG CHECKPOINT --out FILE.onnx \
        [--shape H W] [--dynamic] [--verify] [--image PATH]

The backbone is folded (norms and layer scales inside the weights) and exported in plain ONNX
ops (opset 17). Input ``input``: a normalised float32 (N, 3, H, W) image. Segmentors output
``output``, int64 (N, 1, H, W) class indices; detectors ``dets`` (N, K, 5) and ``labels``
(N, K) after NMS in the graph, (Cascade) Mask R-CNN also ``masks`` (1, K, 28, 28), which
poolformer_mm/deploy/onnx/postprocess.py pastes into the image. The
normalisation, class names and post-processing settings are stored in the file's metadata, for
tools/deployment/ort_infer.py. ``--verify`` compares ONNX Runtime with PyTorch on an image and
exits with code 1 over tolerance. Needs the deploy extra: pip install -e .[deploy]
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
