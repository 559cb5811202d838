#!/usr/bin/env python
"""Test a detector or segmentor checkpoint; the flags of mmdet 3.3's / mmseg 1.2's
tools/test.py, plus --data-root and --eval with the old metric names.

    python tools/test.py configs/segmentation/fpn_poolformer_s12.py CKPT --eval mIoU
"""
import sys

try:
    from poolformer_mm.cli.train_test import run_testing
    from poolformer_mm.utils.errors import report_user_errors
    from poolformer_mm.utils.known_warnings import ignore_known_warnings
except ModuleNotFoundError as err:  # typically a fresh shell without the environment
    sys.exit(f'{err}. Activate the environment first: source .venv/bin/activate '
             '(see the README, "Quick start").')

if __name__ == '__main__':
    ignore_known_warnings()
    report_user_errors(run_testing)()
