#!/usr/bin/env python
"""Plot loss and metric curves of training runs from their json logs to one PNG.

    python tools/analysis/plot_logs.py work_dirs/fpn_poolformer_s12_toy
    python tools/analysis/plot_logs.py WORK_DIR [WORK_DIR ...] --keys loss bbox_mAP --out curves.png

Each WORK_DIR is a --work-dir of tools/train.py (its newest run is read) or a json log
(<timestamp>/vis_data/<timestamp>.json).
"""
import argparse

from poolformer_mm.analysis.log_curves import plot_work_dirs
from poolformer_mm.utils.errors import report_user_errors


@report_user_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('work_dirs', nargs='+', metavar='WORK_DIR',
                        help='work dir of a training run, or its json log')
    parser.add_argument('--keys', nargs='+', help='log keys to draw, e.g. loss loss_cls mIoU '
                        'bbox_mAP (default: loss and the main metrics)')
    parser.add_argument('--legend', nargs='+', help='one name per WORK_DIR for the legend')
    parser.add_argument('--title', help='title of the figure')
    parser.add_argument('--out', help='the PNG to write (default: <first WORK_DIR>/curves.png)')
    args = parser.parse_args(argv)
    out, curves = plot_work_dirs(args.work_dirs, args.keys, args.out, args.legend, args.title)
    keys = ', '.join(dict.fromkeys(curve.key for curve in curves))
    print(f'wrote curves of {keys} to {out}')


if __name__ == '__main__':
    main()
