"""Parameters and MACs of a config's detector / segmentor, of its backbone, or of a bare arch.

    python tools/analysis/get_flops.py --arch s12 s24 s36 m36 m48          # 224x224
    python tools/analysis/get_flops.py configs/detection/retinanet_poolformer_s12.py   # 1280x800
    python tools/analysis/get_flops.py configs/segmentation/fpn_poolformer_s12.py --shape 512
    python tools/analysis/get_flops.py CONFIG --part backbone                          # 224x224

Counting is mmengine's port of fvcore's counters, as the paper used: 1 MAC = 1 multiply-add.
Counted: convolutions and linear layers (without bias adds), GroupNorm (~5 ops per element),
upsampling. Not counted: the pooling token mixer (avg_pool2d), GELU, the element-wise
add/sub/mul of residuals and layer scales, and ops without a counter (RoIAlign, NMS, ...); each
run lists the ones it met. Whole models run their mode='tensor' forward (no post-processing)
on one random image passed through the model's data preprocessor; no weights are loaded.
"""
import argparse
import textwrap

from ..analysis.complexity import (
    DEFAULT_SHAPES,
    UNCOUNTED_NOTE,
    backbone_complexity,
    model_complexity,
)


def format_table(rows: dict) -> str:
    """One row per analysed item (a label and its :class:`Complexity`): shape, params, MACs."""
    header = ('model', 'input (HxW)', 'params', 'params (M)', 'MACs (G)')
    lines = [header] + [(label, f'{c.input_shape[0]}x{c.input_shape[1]}', f'{c.params:,}',
                         f'{c.params_m:.2f}', f'{c.macs_g:.3f}') for label, c in rows.items()]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ['  '.join(cell.ljust(w) if i == 0 else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(line, widths))) for line in lines]
    text.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(text)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split('\n\n', 1)[1])
    parser.add_argument('config', nargs='?', help='mmdet / mmseg config file')
    parser.add_argument('--arch', nargs='+', metavar='ARCH',
                        help='analyse bare PoolFormer backbones (s12, s24, s36, m36, m48) '
                        'instead of a config')
    parser.add_argument('--shape', type=int, nargs='+', metavar=('H', 'W'),
                        help='input height and width, or one side for a square image; default: '
                        f'{DEFAULT_SHAPES["backbone"][0]} for a backbone, '
                        '{} {} for detectors, {} {} for segmentors'.format(
                            *DEFAULT_SHAPES['mmdet'], *DEFAULT_SHAPES['mmseg']))
    parser.add_argument('--part', choices=('model', 'backbone'), default='model',
                        help="with a config: the whole model (default) or its backbone alone")
    args = parser.parse_args()
    if (args.config is None) == (args.arch is None):
        parser.error('give either a config file or --arch ARCH [ARCH ...]')
    try:
        if args.arch:
            rows = {f'PoolFormer-{arch.upper()}': backbone_complexity(arch, args.shape)
                    for arch in args.arch}
        else:
            rows = {f'{args.config} [{args.part}]':
                    model_complexity(args.config, args.shape, part=args.part)}
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(format_table(rows))
    for label, result in rows.items():
        ops = ', '.join(f'{name.replace("aten::", "")} x{count}'
                        for name, count in result.uncounted_ops.items())
        print(textwrap.fill(f'Uncounted ops in {label}: {ops or "none"}.', width=100,
                            subsequent_indent='    '))
    print(textwrap.fill(UNCOUNTED_NOTE, width=100))
