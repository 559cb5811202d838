#!/usr/bin/env python
"""Draw predictions on images: boxes (and masks) for detection configs, colour overlays for
segmentation configs. Works on CPU.

    python tools/infer.py CONFIG CHECKPOINT IMAGE_OR_FOLDER [...] --out-dir outputs/
"""
import argparse

from poolformer_mm.apis.inference import draw_predictions


def main():
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
                        'weights after loading: same predictions, faster')
    args = parser.parse_args()
    written = draw_predictions(args.config, args.checkpoint, args.inputs, args.out_dir,
                               args.device, args.score_thr, deploy=args.deploy)
    print(f'wrote {len(written)} pictures to {args.out_dir}/')


if __name__ == '__main__':
    main()
