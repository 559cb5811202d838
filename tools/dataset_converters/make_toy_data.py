#!/usr/bin/env python
"""Write the small synthetic data sets used by the toy configs, demos and tests.

    python tools/dataset_converters/make_toy_data.py coco data/toy_coco
    python tools/dataset_converters/make_toy_data.py ade data/toy_ade
"""
import argparse
import time

from poolformer_mm.datasets import make_toy_ade, make_toy_coco


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('kind', choices=['coco', 'ade'], help='which data set to write')
    parser.add_argument('out', help='output folder (the data root of the toy configs)')
    parser.add_argument('--num-train', type=int, default=48)
    parser.add_argument('--num-val', type=int, default=16)
    parser.add_argument('--size', type=int, nargs='+', default=None,
                        help='image side (coco, square) or height width (ade)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.kind == 'coco':
        size = args.size[0] if args.size else 128
        make_toy_coco(args.out, args.num_train, args.num_val, size, args.seed)
    else:
        size = tuple(args.size) if args.size else (128, 160)
        make_toy_ade(args.out, args.num_train, args.num_val, size, args.seed)
    print(f'wrote toy {args.kind} data set to {args.out} '
          f'({args.num_train} train + {args.num_val} val images, '
          f'{time.perf_counter() - start:.1f} s)')


if __name__ == '__main__':
    main()
