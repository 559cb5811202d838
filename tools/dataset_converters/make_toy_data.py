#!/usr/bin/env python
"""Write the small synthetic data sets used by the toy configs, demos and tests.

    python tools/dataset_converters/make_toy_data.py coco data/toy_coco
    python tools/dataset_converters/make_toy_data.py ade data/toy_ade
"""
import argparse
import inspect
import time

from poolformer_mm.datasets import make_toy_ade, make_toy_coco

MAKERS = {'coco': make_toy_coco, 'ade': make_toy_ade}
DEFAULTS = {kind: {name: p.default for name, p in inspect.signature(make).parameters.items()
                   if name in ('num_train', 'num_val')} for kind, make in MAKERS.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('kind', choices=list(MAKERS), help='which data set to write')
    parser.add_argument('out', help='output folder (the data root of the toy configs)')
    parser.add_argument('--num-train', type=int,
                        help=f'default: {DEFAULTS["coco"]["num_train"]} (coco), '
                        f'{DEFAULTS["ade"]["num_train"]} (ade)')
    parser.add_argument('--num-val', type=int, help=f'default: {DEFAULTS["coco"]["num_val"]}')
    parser.add_argument('--size', type=int, nargs='+',
                        help='image side (coco, square; default 128) or height width (ade; '
                        'default 128 160)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    # what is not given comes from the generator's own defaults, those of the toy configs
    given = dict(num_train=args.num_train, num_val=args.num_val)
    kwargs = dict(DEFAULTS[args.kind], seed=args.seed,
                  **{name: value for name, value in given.items() if value is not None})
    if args.size:
        kwargs['image_size'] = args.size[0] if args.kind == 'coco' else tuple(args.size)
    MAKERS[args.kind](args.out, **kwargs)
    print(f'wrote toy {args.kind} data set to {args.out} '
          f'({kwargs["num_train"]} train + {kwargs["num_val"]} val images, '
          f'{time.perf_counter() - start:.1f} s)')


if __name__ == '__main__':
    main()
