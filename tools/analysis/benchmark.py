#!/usr/bin/env python
"""Speed and peak memory of PoolFormer backbones and whole models, variants side by side.

The first variant is the baseline of the speed-ups and, in fp32, of the output (training: loss)
differences; peak MB is measured in a fresh process per variant. Columns and figures: docs/speed.md.
"""
import argparse
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch

from poolformer_mm.analysis import benchmark as bench
from poolformer_mm.analysis.complexity import backbone_complexity, load_config, model_complexity
from poolformer_mm.datasets.checks import MIN_MODEL_INPUT_SIDE as SIDE
from poolformer_mm.models import PoolFormer
from poolformer_mm.utils.cpu_flags import machine_description
from poolformer_mm.utils.known_warnings import ignore_known_warnings


def checked(test, message, convert=str):
    """An argparse type: ``convert(text)`` where ``test`` holds, else ``message`` or the error."""
    def value_of(text):
        try:
            value = convert(text)
            if test(value):
                return value
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error
        raise argparse.ArgumentTypeError(message.format(value))
    return value_of


def at_least(least, unit=''):
    return checked(lambda value: value >= least, f'must be at least {least}{unit}, got {{}}', int)


def writable(path, image=False):
    if image:  # a name matplotlib can save
        from matplotlib.figure import Figure
        image = Figure().canvas.get_supported_filetypes()
    return (not os.path.isdir(path) and os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)
            and (not image or os.path.splitext(path)[1].lstrip('.').lower() in image))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--arch', type=str.lower, choices=list(PoolFormer.arch_settings))
    config = checked(os.path.isfile, "'{}' is no file (missing, or a folder)")
    source.add_argument('--config', type=config, help='a config: time its backbone')
    source.add_argument('--model', type=config, help='a detector or segmentor: time it whole')
    parser.add_argument('--whole-model', action='store_true', help='with --config: as --model '
                        'CONFIG --mode train')
    parser.add_argument('--onnx', type=config, help='an export of --config (tools/deployment/'
                        'pytorch2onnx.py): ONNX Runtime against PyTorch eager and deploy')
    parser.add_argument('--checkpoint', type=config, help='with --onnx: the exported weights '
                        '(default: random; the timings do not depend on them)')
    parser.add_argument('--postprocess', action='store_true', help='with --model in inference: '
                        'time predict(), NMS or resizing the logits included')
    parser.add_argument('--mode', choices=['inference', 'train'])
    parser.add_argument('--variants', type=checked(bench.parse_variant, ''), nargs='+',
                        help=f"backbones: {', '.join(bench.VARIANTS)}; whole models: "
                        f"{', '.join(bench.MODEL_VARIANTS)}; optionally with a precision, "
                        'deploy:bf16 (default: reference fast deploy; in training reference '
                        'fast cp)')
    parser.add_argument('--dtype', choices=list(bench.PRECISIONS), default='fp32',
                        help='the precision of variants named without one')
    side = at_least(SIDE, f' pixels (the backbone reduces its input {SIDE} times)')
    parser.add_argument('--shape', type=side, nargs='+', help='H [W] (512; --onnx: its own)')
    parser.add_argument('--sizes', type=side, nargs='+', default=[224, 320, 448, 512])
    parser.add_argument('--batch', type=at_least(1), default=1)
    parser.add_argument('--threads', type=at_least(1), help='torch and ONNX Runtime threads')
    parser.add_argument('--device', default='cpu', type=checked(
        lambda name: name == 'cpu' or name.startswith('cuda') and torch.cuda.is_available(),
        '{}: use cpu, or cuda where torch sees a GPU'))
    parser.add_argument('--warmup', type=at_least(0), default=2)
    parser.add_argument('--repeat', type=at_least(1), default=10)
    parser.add_argument('--json', type=checked(writable, '{}: a folder, or its folder does not '
                        'exist or is not writable'), help='also write the results to this file')
    parser.add_argument('--plot', type=checked(lambda path: writable(path, True), '{}: not a '
                        'writable image file name (speed.png, .pdf, .svg, ...)'),
                        help='plot images/s against input size (--sizes) to this image')
    args = parser.parse_args(argv)
    # the one check of options that do not go together, before anything is built or timed
    if args.whole_model and args.config and args.mode != 'inference':
        args.model, args.config, args.mode = args.config, None, 'train'
    args.mode = args.mode or 'inference'
    train = args.mode == 'train'
    dropped = [option for option, given in (('--mode train', train), ('--variants', args.variants),
                                            (f'--dtype {args.dtype}', args.dtype != 'fp32'),
                                            ('--plot', args.plot)) if given]
    for refused, message in [
            (args.whole_model and not args.model, '--whole-model times training steps of the '
             '--config model; for inference use --model CONFIG'),
            (args.onnx and not args.config, '--onnx needs the --config it was exported from'),
            (args.onnx and dropped, '--onnx times the exported model in fp32 inference against '
             f'PyTorch eager and deploy; drop {", ".join(dropped)}'),
            (args.checkpoint and not args.onnx, '--checkpoint goes with --onnx'),
            (args.postprocess and (train or not args.model), '--postprocess goes with --model '
             'in inference (backbones and training steps have no post-processing)'),
            (args.plot and args.model, '--plot times backbones (--arch or --config)'),
            (args.device != 'cpu' and args.onnx, '--onnx times ONNX Runtime on the CPU; leave '
             'out --device'),
            (len(args.shape or []) > 2, f'--shape takes H or H W, got {len(args.shape or [])}')]:
        if refused:
            parser.error(message)
    try:
        bench.check_variants(args.variants or [], bool(args.model), train, args.dtype)
    except ValueError as error:
        parser.error(str(error))
    return args


def main():
    args = parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    train, notes = args.mode == 'train', []
    names = ['eager', 'deploy', 'onnxruntime'] if args.onnx else [
        name if ':' in name or args.dtype == 'fp32' else f'{name}:{args.dtype}' for name in
        args.variants or ['reference', 'fast', 'cp' if train else 'deploy']]
    # a config without a PoolFormer backbone stops here, before anything is timed
    arch, kwargs = (bench.backbone_settings(args.config or args.model)
                    if args.config or args.model else (args.arch, {}))
    backbone = f"PoolFormer-{arch.upper() if isinstance(arch, str) else 'custom'} backbone"
    reason = not (args.variants or args.onnx) and bench.why_no_reference(PoolFormer(arch,
                                                                                    **kwargs))
    if reason:
        names = names[1:]
        notes.append(f"'reference' (the paper's PoolFormer) left out of the default variants: "
                     f'{reason}')
    rates = {dtype: bench.matmul_gflops(args.device, dtype=bench.PRECISIONS[dtype]) for dtype in
             ['fp32'] + sorted({bench.parse_variant(name)[1] for name in names} - {'fp32'})}
    machine = machine_description()
    print(f'machine: {machine}, torch {torch.__version__}, {args.device}, '
          f'{torch.get_num_threads()} threads, matmul ' + ', '.join(
              f'{k} {v:.{0 if v >= 10 else 2}f} GFLOP/s' for k, v in rates.items()), flush=True)
    emulated = bench.emulated_bf16_note(rates, args.device)
    if emulated:
        print(emulated, flush=True)
    if args.plot:
        plot_sizes(args, backbone, names)
    try:
        variants, steps, compared, (height, width) = bench.build(args, names, notes)
        results = bench.measure(variants, steps, args.warmup, args.repeat, args.device)
    except ValueError as error:  # e.g. UPerNet's pyramid pooling: batch norm after 1x1 pooling
        if train and args.batch == 1 and 'more than 1 value per channel' in str(error):
            raise ValueError(f'{args.model}: a training step at --batch 1 has a batch norm '
                             f'with one value per channel ({error}); use --batch 2') from error
        raise
    if not results:  # every variant was a peer that is not installed
        raise ValueError('no variant left to time: ' + '; '.join(notes))
    bench.compare(args, variants, compared, results)
    for name, peak in bench.peak_memory_mb(args, list(results)).items():
        results[name].peak_memory_mb = peak
    gmacs = None
    if args.onnx:
        info = variants['onnxruntime'].info
        what = (f"{args.config} as exported (outputs: {', '.join(info['outputs'])}"
                f"{'; NMS included' if info['task'] == 'detection' else ''}), ONNX Runtime vs "
                'PyTorch')
        if all(math.isnan(m.max_abs_diff) for m in results.values()):
            notes.append('no differences: the export outputs class indices only (export with '
                         '--logits to compare logits)')
        elif not args.checkpoint:
            notes.append('onnxruntime: outputs not compared: without --checkpoint (the weights '
                         'it was exported with) the PyTorch variants have random weights')
    elif args.model:
        what = f'{args.model} whole model ' + ('training step' if train else
                                               'inference, post-processing included'
                                               if args.postprocess else
                                               'inference (backbone, neck, head)')
        gmacs = None if train else model_complexity(args.model, (height, width)).macs_g
    else:
        what = f'{backbone} {args.mode}' + (f' (of {args.config})' if args.config else '')
        gmacs = None if train else backbone_complexity(dict(
            type='PoolFormer', arch=arch, **kwargs), (height, width)).macs_g
    print(f'{what}, {height}x{width}, batch {args.batch}, median of {args.repeat}'
          + (f', {gmacs:.2f} GMACs per image' if gmacs else ''))
    for line in notes:
        print(line)
    # no ceiling: an emulated rate; a two-stage detector's work follows its proposal count
    two_stage = args.model and 'roi_head' in load_config(args.model).model
    variant_rates = None if two_stage else {n: rates[bench.parse_variant(n)[1]] for n in results
                                            if not (emulated and n.endswith(':bf16'))}
    first = next(iter(results))
    base = results[first]
    print(bench.format_results(results, args.batch, first, gmacs, variant_rates))
    for name, m in list(results.items())[1:]:
        print(f'{name} vs {first}: {m.speedup_over(base):.2f}x speed ({base.median_ms:.1f} / '
              f'{m.median_ms:.1f} ms)' + (f', {m.peak_memory_mb / base.peak_memory_mb:.2f}x '
                                          'peak memory' if base.peak_memory_mb > 0 else ''))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            what=what, machine=machine, shape=[height, width], batch=args.batch, dtype=args.dtype,
            threads=torch.get_num_threads(), gmacs=gmacs, matmul_gflops=rates, baseline=first,
            results={n: dict(asdict(m), median_ms=m.median_ms, speedup=m.speedup_over(base),
                             images_per_s=args.batch * 1000 / m.median_ms)
                     for n, m in results.items()}), indent=2))


def plot_sizes(args, backbone, names):
    """Images/s of each variant against the input size, as an image (timings only)."""
    from matplotlib.figure import Figure
    rates = {}
    for size in args.sizes:
        sized = argparse.Namespace(**dict(vars(args), shape=[size]))
        timed = bench.measure(*bench.build(sized, names)[:2], args.warmup, args.repeat, args.device)
        for name, m in timed.items():
            rates.setdefault(name, []).append(args.batch * 1000 / m.median_ms)
        print(f'{size}x{size}: ' + ', '.join(f'{n} {r[-1]:.2f} img/s' for n, r in rates.items()))
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, rate in rates.items():
        ax.plot(args.sizes, rate, marker='o', label=name)
    ax.set(xlabel='input size (square, pixels)', ylabel='images / s', yscale='log',
           title=f'{backbone} {args.mode}, batch {args.batch}, {torch.get_num_threads()} threads')
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f'plot written to {args.plot}')


if __name__ == '__main__':
    ignore_known_warnings()
    try:
        main()
    except ValueError as error:  # an export that does not fit, a peer or precision: one line
        raise SystemExit(f'error: {error}')
