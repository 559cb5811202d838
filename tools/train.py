#!/usr/bin/env python
"""Train a detector (mmdet config) or segmentor (mmseg config) with a PoolFormer backbone; the
flags of mmdet 3.3's / mmseg 1.2's tools/train.py, plus --data-root.

    python tools/train.py configs/detection/retinanet_poolformer_s12.py [--amp] [--resume]
"""
import sys

try:
    from poolformer_mm.cli.train_test import run_training
    from poolformer_mm.utils.errors import report_user_errors
    from poolformer_mm.utils.known_warnings import ignore_known_warnings
except ModuleNotFoundError as err:  # typically a fresh shell without the environment
    sys.exit(f'{err}. Activate the environment first: source .venv/bin/activate '
             '(see the README, "Quick start").')

if __name__ == '__main__':
    ignore_known_warnings()
    report_user_errors(run_training)()
