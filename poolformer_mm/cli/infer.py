"""Draw predictions on images: boxes (and masks) for detection configs, colour overlays for
segmentation configs. Works on CPU."""
import argparse
import re

from mmengine.logging import MMLogger

from ..apis.inference import draw_predictions
from ..utils.errors import report_user_errors
from .options import add_amp_option

# mmengine's notice, on every run, that the collate-function lookup falls back from the mmdet or
# mmseg scope to mmengine's, where their collate functions are anyway
SCOPE_NOTICE = re.compile(r'Failed to search registry with scope "(mmdet|mmseg)" in the '
                          '"function" registry tree')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('inputs', nargs='+', help='image files or folders of images')
    parser.add_argument('--out-dir', default='outputs', help='where the PNGs go')
    parser.add_argument('--device', default='cpu', help="e.g. 'cpu' or 'cuda:0'")
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detection: lowest score drawn')
    parser.add_argument('--deploy', action='store_true',
                        help="fold the PoolFormer backbone's norms and layer scales into its "
                        'weights after loading and run the neck and head channels-last: same '
                        'predictions, faster')
    add_amp_option(parser, 'mixed precision, as in tools/test.py')
    return parser.parse_args(argv)


@report_user_errors
def main(argv=None):
    args = parse_args(argv)
    MMLogger.get_current_instance().addFilter(
        lambda record: not SCOPE_NOTICE.match(record.getMessage()))
    written = draw_predictions(args.config, args.checkpoint, args.inputs, args.out_dir,
                               args.device, args.score_thr, deploy=args.deploy,
                               amp=args.amp)
    print(f"wrote {len(written)} picture{'s' * (len(written) != 1)} to {args.out_dir}/")
