#!/usr/bin/env python
"""Speed and peak memory of PoolFormer backbones and whole models, variants side by side.

    # backbone inference at 512x512: the paper's formulation, timm's and mmpretrain's (if
    # installed), this project's fast and folded forms, all with the same weights
    python tools/analysis/benchmark.py --arch s12 --shape 512 \
        --variants reference timm mmpretrain fast deploy
    # the same in bf16 (autocast, as --amp runs it on a CPU with bf16 units or --amp bf16
    # anywhere): ':bf16' after a variant name
    python tools/analysis/benchmark.py --arch s12 --variants reference deploy deploy:bf16
    # a whole segmentor or detector in inference (backbone, neck and head; --postprocess adds
    # NMS / resizing), as tools/test.py runs it: the paper's backbone in fp32 against --deploy
    # and --deploy --amp
    python tools/analysis/benchmark.py --model configs/segmentation/fpn_poolformer_s12.py \
        --shape 512 --variants reference deploy deploy:bf16
    python tools/analysis/benchmark.py --model configs/detection/retinanet_poolformer_s12.py \
        --shape 800 1333 --variants reference deploy deploy:bf16
    # a whole model's training step (forward, loss, backward), fp32 and --amp
    python tools/analysis/benchmark.py --model configs/segmentation/fpn_poolformer_s12.py \
        --mode train --batch 2 --variants reference fast fast:bf16
    # backbone training step, batch 2; with_cp's memory saving
    python tools/analysis/benchmark.py --arch s12 --batch 2 --mode train \
        --variants reference fast cp
    # images/s against input size, as a PNG
    python tools/analysis/benchmark.py --arch s12 --plot speed.png --sizes 224 320 448 512
    # an exported model: ONNX Runtime against PyTorch eager and folded, at the file's size
    python tools/analysis/benchmark.py --config configs/segmentation/fpn_poolformer_s12.py \
        --onnx fpn.onnx [--checkpoint CKPT] --threads 2

The variants run interleaved (A B C A B C ...), so a machine whose speed drifts treats them
alike. The first variant is the baseline: the speed-up column is its median time over each
variant's (the ratio of the printed medians), and the differences are against its outputs in
fp32 (of the network outputs, for a whole model; of the loss, in training). A row not in fp32
names its precision (``--dtype bf16`` makes ``deploy`` ``deploy:bf16``). '% matmul' is the rate
reached as a share of the machine's matrix-multiply rate in the variant's precision, measured at
the start (not shown for bf16 where the CPU emulates it). ``--config`` times the config's
backbone with all its settings. The first line names the CPU and its AVX-512 / AMX flags.
"""
import argparse
import json
import math
import os

import torch

from poolformer_mm.analysis.benchmark import (
    MODEL_VARIANTS,
    PRECISIONS,
    VARIANTS,
    backbone_settings,
    backbone_step,
    backbone_variants,
    emulated_bf16_note,
    float_output_differences,
    format_results,
    has_roi_heads,
    inference_step,
    loss_differences,
    machine_description,
    matmul_gflops,
    measure,
    model_inference_step,
    model_output_differences,
    model_training_step,
    model_variants,
    onnx_variants,
    output_differences,
    parse_variant,
    refuse_training_an_inference_form,
    why_no_reference,
)
from poolformer_mm.analysis.complexity import backbone_complexity, model_complexity
from poolformer_mm.analysis.peers import PEERS
from poolformer_mm.datasets.checks import MIN_MODEL_INPUT_SIDE
from poolformer_mm.models import PoolFormer
from poolformer_mm.utils.known_warnings import ignore_known_warnings


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--arch', help='a PoolFormer arch (s12, s24, s36, m36, m48)')
    source.add_argument('--config', help="a config: time its backbone (with its out_indices "
                        'and pool_size)')
    source.add_argument('--model', help='a detector or segmentor config: time the whole model')
    parser.add_argument('--onnx', help='an exported model (tools/deployment/pytorch2onnx.py) of '
                        '--config: time it in ONNX Runtime against the PyTorch eager and '
                        'deploy forms, at its export size, batch --batch')
    parser.add_argument('--checkpoint', help='with --onnx: the exported weights (default: '
                        'random; the timings do not depend on them)')
    parser.add_argument('--postprocess', action='store_true',
                        help='with --model in inference: time predict(), post-processing (NMS, '
                        'resizing the logits to the image, argmax) included; default: the '
                        'network (backbone, neck, head) alone')
    parser.add_argument('--whole-model', action='store_true',
                        help='with --config: the same as --model CONFIG --mode train')
    parser.add_argument('--shape', type=int, nargs='+', default=None,
                        help='H [W] (default: 512; with --onnx, the export size)')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--mode', choices=['inference', 'train'], default=None,
                        help='default: inference (train with --whole-model)')
    parser.add_argument('--variants', nargs='+', default=None,
                        help='backbones: reference, plain, fast, deploy, cp, timm, mmpretrain; '
                        'whole models: reference, plain, fast, channels_last, deploy, cp; each '
                        'with an optional precision, deploy:bf16 (default: reference fast '
                        'deploy for inference, reference fast cp for training)')
    parser.add_argument('--dtype', choices=['fp32', 'bf16'], default='fp32',
                        help='the precision of variants named without one')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeat', type=int, default=10)
    parser.add_argument('--json', help='also write the results to this JSON file')
    parser.add_argument('--plot', help='write images/s against input size (--sizes) to this PNG')
    parser.add_argument('--sizes', type=int, nargs='+', default=[224, 320, 448, 512])
    args = parser.parse_args()
    check_args(parser, args)
    return args


# The relative output difference above which ONNX Runtime and PyTorch disagree for more
# reasons than float rounding (they agree to about 1e-6 with the weights of the export).
ONNX_AGREEMENT = 1e-3


def check_args(parser, args):
    """Refuse settings that cannot run or would be ignored, before anything is built or
    timed; resolve --whole-model and the default --mode."""
    if args.whole_model:
        if not args.config:
            parser.error('--whole-model goes with --config; or use --model CONFIG')
        if args.mode == 'inference':
            parser.error('--whole-model times training steps; for inference use --model CONFIG')
        args.model, args.config, args.mode = args.config, None, 'train'
    args.mode = args.mode or 'inference'
    train = args.mode == 'train'
    args.shape_given = args.shape is not None
    args.shape = args.shape or [512]
    if args.onnx:
        if not args.config:
            parser.error('--onnx needs the --config it was exported from')
        ignored = [option for option, given in (('--mode train', train),
                                                ('--variants', args.variants),
                                                ('--dtype bf16', args.dtype != 'fp32'),
                                                ('--plot', args.plot)) if given]
        if ignored:
            parser.error(f'--onnx times the exported model in fp32 inference against PyTorch '
                         f'eager and deploy; drop {", ".join(ignored)}')
    elif args.checkpoint:
        parser.error('--checkpoint goes with --onnx (the other variants use random weights)')
    if args.postprocess and (not args.model or train):
        parser.error('--postprocess goes with --model in inference (backbones and training '
                     'steps have no post-processing)')
    if args.arch and args.arch.lower() not in PoolFormer.arch_settings:
        parser.error(f"--arch {args.arch}: choose one of {', '.join(PoolFormer.arch_settings)}")
    check_variants(parser, args)
    for option in ('config', 'model', 'onnx', 'checkpoint'):
        path = getattr(args, option)
        if path and os.path.isdir(path):
            parser.error(f"--{option} {path} is a folder; give a file")
        if path and not os.path.isfile(path):
            parser.error(f"--{option}: no such file '{path}'")
    if len(args.shape) > 2:
        parser.error(f'--shape takes H or H W, got {len(args.shape)} values')
    for option, sides in (('--shape', args.shape), ('--sizes', args.sizes)):
        if min(sides) < MIN_MODEL_INPUT_SIDE:
            parser.error(f'{option} {" ".join(map(str, sides))}: every side must be at least '
                         f'{MIN_MODEL_INPUT_SIDE} pixels (the backbone reduces its input '
                         f'{MIN_MODEL_INPUT_SIDE} times)')
    for option, value, least in (('--batch', args.batch, 1), ('--repeat', args.repeat, 1),
                                 ('--warmup', args.warmup, 0)):
        if value < least:
            parser.error(f'{option} must be at least {least}, got {value}')
    if args.threads is not None and args.threads < 1:
        parser.error(f'--threads must be a positive number of threads, got {args.threads} '
                     f'(leave it out for torch\'s default, {torch.get_num_threads()} here)')
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f'--device {args.device}: not a device torch knows; use cpu or cuda')
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error(f'--device {args.device}: this torch ({torch.__version__}) sees no CUDA '
                     'GPU; use --device cpu')
    if device.type not in ('cpu', 'cuda'):
        parser.error(f'--device {args.device}: the benchmark runs on cpu or cuda')
    if device.type == 'cuda' and (args.model or args.onnx):
        parser.error(f'--device {args.device}: whole models are timed on the CPU here; '
                     '--device cuda times backbones (--arch, --config)')
    if args.plot and args.model:
        parser.error('--plot times backbones (--arch or --config), not whole models (--model)')
    for option in ('json', 'plot'):
        path = getattr(args, option)
        if not path:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            parser.error(f"--{option} {path}: a folder; name the file to write in it")
        if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            parser.error(f"--{option} {path}: cannot write into '{folder}' (it does not exist "
                         'or is not writable); the results are written after the whole run, '
                         'so name a writable folder')
    if args.plot:
        from matplotlib.figure import Figure
        formats = Figure().canvas.get_supported_filetypes()
        extension = os.path.splitext(args.plot)[1].lstrip('.').lower()
        if extension not in formats:
            parser.error(f'--plot {args.plot}: name the image with one of the extensions '
                         f"{', '.join(sorted(formats))} (e.g. speed.png)")


def check_variants(parser, args):
    """The variant names: known for what is timed, each with a precision after a ':' if it has
    one, 'deploy' not in training, and no row twice."""
    if not args.variants or args.onnx:
        return
    known = MODEL_VARIANTS if args.model else VARIANTS + tuple(PEERS)
    rows = []
    for spec in args.variants:
        try:
            name, dtype = parse_variant(spec, args.dtype)
            if name not in known:
                raise ValueError(f"--variants: unknown variant '{name}' for "
                                 f"{'whole models' if args.model else 'backbones'}; choose "
                                 f"from {', '.join(known)}")
            refuse_training_an_inference_form(name, args.mode == 'train')
        except ValueError as error:
            parser.error(str(error))
        rows.append(f'{name}:{dtype}')
    repeated = sorted({row for row in rows if rows.count(row) > 1})
    if repeated:
        parser.error(f"--variants names {', '.join(repeated)} more than once")


def run_backbone(args, arch, height, width, names, kwargs, memory=True, notes=None):
    train = args.mode == 'train'
    variants = backbone_variants(arch, names, notes=notes, train=train, **kwargs)
    for model in variants.values():
        model.to(args.device)
    inputs = torch.randn(args.batch, 3, height, width, device=args.device)
    steps = {name: backbone_step(inputs, train, dtype_of(name, args)) for name in variants}
    results = measure(variants, steps, train=train, warmup=args.warmup, repeat=args.repeat,
                      device=args.device, memory=memory)
    output_differences(variants, inputs, results, args.dtype)
    return results


def arch_title(arch):
    """'S12' for an arch name, 'custom' for an arch dict."""
    return arch.upper() if isinstance(arch, str) else 'custom'


def dtype_of(name, args):
    return PRECISIONS[parse_variant(name, args.dtype)[1]]


def run_model(args, height, width, names):
    train = args.mode == 'train'
    variants = model_variants(args.model, names, default_dtype=args.dtype, train=train)
    first = next(iter(variants.values()))
    if train:
        steps = {name: model_training_step(first, height, width, args.batch,
                                           dtype_of(name, args)) for name in variants}
    else:
        steps = model_inference_step(first, height, width, args.batch,
                                     'predict' if args.postprocess else 'tensor')
    results = measure(variants, steps, train=train, warmup=args.warmup, repeat=args.repeat,
                      device=args.device)
    # differences from the first variant in fp32, however that one runs
    first_name, first_dtype = parse_variant(next(iter(variants)), args.dtype)
    in_fp32 = first_dtype == 'fp32'
    if train:
        loss_differences(variants, steps, results, None if in_fp32 else model_training_step(
            first, height, width, args.batch, torch.float32))
    else:
        model_output_differences(
            variants, model_inference_step(first, height, width, args.batch, 'tensor'), results,
            None if in_fp32 else model_variants(args.model, [first_name])[first_name])
    return results


def run_onnx(args, notes):
    """Time the exported model of --onnx against PyTorch eager and deploy: at the export size
    (a dynamic export at --shape if given), with the outputs compared where that means
    something. Returns the results, the input size and a title."""
    variants = onnx_variants(args.config, args.onnx, args.checkpoint, torch.get_num_threads())
    info = variants['onnxruntime'].info
    exported_batch, _, height, width = variants['onnxruntime'].session.get_inputs()[0].shape
    if isinstance(exported_batch, int) and exported_batch != args.batch:
        why = ('its export takes one image at a time, also with --dynamic'
               if info.get('dynamic') else 'exported without a dynamic batch axis')
        raise ValueError(f'--onnx {args.onnx} takes batches of {exported_batch} ({why}); '
                         f'use --batch {exported_batch}')
    if not all(isinstance(side, int) for side in (height, width)):  # dynamic axes
        height, width = ((args.shape * 2)[:2] if args.shape_given
                         else info.get('input_size', (512, 512)))
        divisor = info.get('size_divisor', 1)
        if height % divisor or width % divisor:
            raise ValueError(f'--shape {height} {width}: --onnx {args.onnx} takes sides that '
                             f'are multiples of {divisor} (the size divisor of its config)')
    elif args.shape_given and [height, width] != (args.shape * 2)[:2]:
        raise ValueError(f'--onnx {args.onnx} was exported for {height}x{width} inputs only; '
                         'leave out --shape, or export with --dynamic')
    inputs = torch.randn(args.batch, 3, height, width)
    results = measure(variants, inference_step(inputs), warmup=args.warmup, repeat=args.repeat)
    float_output_differences(variants, inputs, results)
    runtime = results['onnxruntime']
    # its arena keeps the memory of the warm-up runs: the process's peak does not grow
    runtime.peak_memory_mb = math.nan
    notes.append('onnxruntime: peak memory not measured (ONNX Runtime keeps its memory '
                 'between runs)')
    quantized = variants['onnxruntime'].quantized
    if all(math.isnan(m.max_abs_diff) for m in results.values()):
        notes.append('no differences: the export outputs class indices only (export with '
                     '--logits to compare logits)')
    elif not args.checkpoint:
        runtime.max_abs_diff = runtime.max_rel_diff = math.nan
        notes.append('onnxruntime: outputs not compared: without --checkpoint (the weights it '
                     'was exported with) the PyTorch variants have random weights')
    elif quantized:
        notes.append('onnxruntime: an int8 model; its differences from the fp32 variants are '
                     'those of quantisation')
    elif runtime.max_rel_diff > ONNX_AGREEMENT:
        notes.append(f'onnxruntime: outputs differ by {runtime.max_rel_diff:.2g} of the '
                     f'largest; was {args.onnx} exported with the weights of {args.checkpoint}?')
    detection = info['task'] == 'detection'
    if detection and not all(math.isnan(m.max_abs_diff) for m in results.values()):
        notes.append('detections are compared in the order NMS keeps them: where scores are '
                     'near-equal that order can change between variants, and the differences '
                     'say little')
    what = (f'{args.config} as exported ({"int8; " if quantized else ""}outputs: '
            f'{", ".join(info.get("outputs", []))}' + ('; NMS included' if detection else '')
            + '), ONNX Runtime vs PyTorch')
    return results, height, width, what


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = (args.shape * 2)[:2]
    train = args.mode == 'train'
    names = args.variants or (['reference', 'fast', 'cp'] if train else
                              ['reference', 'fast', 'deploy'])
    # every row names its precision where it is not fp32
    names = [f'{name}:{args.dtype}' if ':' not in name and args.dtype != 'fp32' else name
             for name in names]
    # a config without a PoolFormer backbone stops here, before anything is timed
    kwargs, arch, notes = {}, args.arch, []
    if args.config or args.model:
        # all of the config's backbone settings
        arch, kwargs = backbone_settings(args.config or args.model)
    reason = (why_no_reference(PoolFormer(arch, **kwargs))
              if not (args.variants or args.onnx) else None)
    if reason:
        names = [name for name in names if parse_variant(name)[0] != 'reference']
        notes.append(f"'reference' (the paper's PoolFormer) left out of the default variants: "
                     f'{reason}')

    rates = {'fp32': matmul_gflops(args.device)}
    if any(parse_variant(n, args.dtype)[1] == 'bf16' for n in names):
        rates['bf16'] = matmul_gflops(args.device, dtype=torch.bfloat16)
    print(f'machine: {machine_description()}, torch {torch.__version__}, {args.device}, '
          f'{torch.get_num_threads()} threads, matmul ' +
          ', '.join(f'{k} {v:.0f} GFLOP/s' if v >= 10 else f'{k} {v:.2g} GFLOP/s'
                    for k, v in rates.items()))
    emulated = emulated_bf16_note(rates, args.device)
    if emulated:
        print(emulated, flush=True)
    gmacs = None
    if args.plot:  # timings only, before any memory measurement changes the allocator
        plot_sizes(args, arch, names, kwargs)
    if args.onnx:
        results, height, width, what = run_onnx(args, notes)
    elif args.model:
        try:
            results = run_model(args, height, width, names)
        except ValueError as error:
            if train and args.batch == 1 and 'more than 1 value per channel' in str(error):
                # e.g. UPerNet's pyramid pooling: batch norm after pooling to 1x1
                raise ValueError(f'{args.model}: a training step at --batch 1 has a batch norm '
                                 f'with one value per channel ({error}); use --batch 2') from error
            raise
        what = f'{args.model} whole model ' + (
            'training step' if train else 'inference, post-processing included'
            if args.postprocess else 'inference (backbone, neck, head)')
        if not train:
            gmacs = model_complexity(args.model, (height, width)).macs / 1e9
    else:
        results = run_backbone(args, arch, height, width, names, kwargs, notes=notes)
        what = f'PoolFormer-{arch_title(arch)} backbone {args.mode}' + (
            f' (of {args.config})' if args.config else '')
        if not train:
            gmacs = backbone_complexity(dict(type='PoolFormer', arch=arch, **kwargs),
                                        (height, width)).macs / 1e9
    names = list(results)
    if not names:  # every variant was a peer that is not installed
        raise ValueError('no variant left to time: ' + '; '.join(notes))
    print(f'{what}, {height}x{width}, batch {args.batch}, median of {args.repeat}'
          + (f', {gmacs:.2f} GMACs per image' if gmacs else ''))
    for line in notes:
        print(line)
    # an emulated rate (bf16 without bf16 units) is no ceiling worth a percentage
    variant_rates = {n: rates.get(parse_variant(n, args.dtype)[1]) for n in names
                     if not (emulated and parse_variant(n, args.dtype)[1] == 'bf16')}
    if train or (args.model and has_roi_heads(args.model)):
        # a two-stage detector's work follows its proposal count, which the MAC count fixes
        variant_rates = None
    print(format_results(results, args.batch, names[0], gmacs, variant_rates))
    base = results[names[0]]
    for name in names[1:]:
        m = results[name]
        print(f'{name} vs {names[0]}: {m.speedup_over(base):.2f}x speed '
              f'({base.median_ms:.1f} / {m.median_ms:.1f} ms)' +
              (f', {m.peak_memory_mb / base.peak_memory_mb:.2f}x peak memory'
               if base.peak_memory_mb > 0 and not math.isnan(m.peak_memory_mb) else ''))

    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(what=what, machine=machine_description(), shape=[height, width],
                           batch=args.batch, dtype=args.dtype,
                           threads=torch.get_num_threads(), matmul_gflops=rates, gmacs=gmacs,
                           baseline=names[0],
                           results={k: dict(v.as_dict(args.batch),
                                            speedup=v.speedup_over(results[names[0]]))
                                    for k, v in results.items()}), f,
                      indent=2)


def plot_sizes(args, arch, names, kwargs):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rates = {name: [] for name in names}
    for size in args.sizes:
        results = run_backbone(args, arch, size, size, names, kwargs, memory=False)
        for name in results:
            rates[name].append(args.batch * 1000 / results[name].median_ms)
        print(f'{size}x{size}: ' + ', '.join(f'{n} {rates[n][-1]:.2f} img/s' for n in results))
    rates = {name: rate for name, rate in rates.items() if rate}  # peers not installed
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rate in rates.items():
        ax.plot(args.sizes, rate, marker='o', label=name)
    ax.set_xlabel('input size (square, pixels)')
    ax.set_ylabel('images / s')
    ax.set_yscale('log')
    ax.set_title(f'PoolFormer-{arch_title(arch)} backbone {args.mode}, batch {args.batch}, '
                 f'{torch.get_num_threads()} threads')
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f'plot written to {args.plot}')


if __name__ == '__main__':
    ignore_known_warnings()
    try:
        main()
    except ValueError as error:  # an unknown variant, peer or precision: one line, no traceback
        raise SystemExit(f'error: {error}')
