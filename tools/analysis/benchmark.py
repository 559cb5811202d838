#!/usr/bin/env python
"""Images per second, latency and peak memory of PoolFormer variants with identical weights.

    # backbone inference at 512x512: the fast paths against the paper's plain formulation
    python tools/analysis/benchmark.py --arch s12 --shape 512 --variants reference fast deploy
    # backbone training step (forward + backward), batch 2
    python tools/analysis/benchmark.py --arch s12 --shape 512 --batch 2 --mode train \
        --variants reference fast cp
    # whole Semantic FPN training step: the memory saving of fpn_poolformer_s12_with_cp.py
    # (with_cp in the backbone, LowMemoryFPNHead's loss)
    python tools/analysis/benchmark.py --config configs/segmentation/fpn_poolformer_s12.py \
        --whole-model --shape 512 --batch 2 --variants fast cp
    # images/s against input size, as a PNG
    python tools/analysis/benchmark.py --arch s12 --plot speed.png --sizes 224 320 448 512
    # a whole exported model: ONNX Runtime against PyTorch eager and folded, at the file's size
    python tools/analysis/benchmark.py --config configs/segmentation/fpn_poolformer_s12.py \
        --onnx fpn.onnx [--checkpoint CKPT] --threads 2

The first variant is the baseline of the speed-up column (median over rounds of the per-round
time ratio; the variants run interleaved) and of the output differences (of the loss, for a
whole model).
"""
import argparse
import json
import platform

import torch

from poolformer_mm.analysis.benchmark import (
    backbone_step,
    backbone_variants,
    float_output_differences,
    format_results,
    inference_step,
    loss_differences,
    matmul_gflops,
    measure,
    onnx_variants,
    output_differences,
    segmentation_training_step,
    segmentor_variants,
)
from poolformer_mm.analysis.complexity import backbone_complexity, load_config


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--arch', help='a PoolFormer arch (s12, s24, s36, m36, m48)')
    source.add_argument('--config', help='a config; its backbone, or with --whole-model the '
                        'segmentor itself')
    parser.add_argument('--onnx', help='an exported model (tools/deployment/pytorch2onnx.py) of '
                        '--config: time it in ONNX Runtime against the PyTorch eager and '
                        'deploy forms, at its export size, batch --batch')
    parser.add_argument('--checkpoint', help='with --onnx: the exported weights (default: '
                        'random; the timings do not depend on them)')
    parser.add_argument('--whole-model', action='store_true',
                        help='time a training step of the whole segmentor of --config')
    parser.add_argument('--shape', type=int, nargs='+', default=[512], help='H [W]')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--mode', choices=['inference', 'train'], default='inference')
    parser.add_argument('--variants', nargs='+', default=None,
                        help='reference, plain, fast, deploy, cp (default: reference fast '
                        'deploy for inference, reference fast cp for training)')
    parser.add_argument('--dtype', choices=['fp32', 'bf16'], default='fp32')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeat', type=int, default=10)
    parser.add_argument('--json', help='also write the results to this JSON file')
    parser.add_argument('--plot', help='write images/s against input size (--sizes) to this PNG')
    parser.add_argument('--sizes', type=int, nargs='+', default=[224, 320, 448, 512])
    return parser.parse_args()


def run_backbone(args, arch, height, width, variants_names, kwargs, memory=True):
    train = args.mode == 'train'
    dtype = torch.bfloat16 if args.dtype == 'bf16' else torch.float32
    variants = backbone_variants(arch, variants_names, **kwargs)
    for model in variants.values():
        model.to(args.device)
    inputs = torch.randn(args.batch, 3, height, width, device=args.device)
    results = measure(variants, backbone_step(inputs, train, dtype), train=train,
                      warmup=args.warmup, repeat=args.repeat, device=args.device, memory=memory)
    output_differences(variants, inputs, results)
    return results


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = (args.shape * 2)[:2]
    train = args.mode == 'train' or args.whole_model
    names = args.variants or (['reference', 'fast', 'cp'] if train else
                              ['reference', 'fast', 'deploy'])
    if args.whole_model and 'reference' in names:
        names = [n for n in names if n != 'reference'] or ['fast']

    matmul = matmul_gflops(args.device)
    print(f'machine: {platform.machine()}, torch {torch.__version__}, {args.device}, '
          f'{torch.get_num_threads()} threads, fp32 matmul {matmul:.0f} GFLOP/s')
    kwargs, arch, gmacs = {}, args.arch, None
    if args.config:
        cfg = load_config(args.config)
        backbone = dict(cfg.model.backbone)
        arch = backbone.get('arch', 's12')
        kwargs = {k: backbone[k] for k in ('out_indices', 'pool_size') if k in backbone}
    if args.plot:  # timings only, before any memory measurement changes the allocator
        plot_sizes(args, arch, names, kwargs)
    if args.onnx:
        if not args.config:
            raise SystemExit('error: --onnx needs the --config it was exported from')
        variants = onnx_variants(args.config, args.onnx, args.checkpoint,
                                 torch.get_num_threads())
        names = list(variants)
        height, width = variants['onnxruntime'].session.get_inputs()[0].shape[2:]
        if not all(isinstance(side, int) for side in (height, width)):  # dynamic axes
            height, width = (args.shape * 2)[:2]
        inputs = torch.randn(args.batch, 3, height, width)
        step = inference_step(inputs)
        results = measure(variants, step, warmup=args.warmup, repeat=args.repeat)
        float_output_differences(variants, inputs, results)
        what = f'{args.config} whole model (no post-processing), ONNX Runtime vs PyTorch'
    elif args.whole_model:
        cfg = load_config(args.config)
        variants = segmentor_variants(args.config, names)
        step = segmentation_training_step(next(iter(variants.values())), height, width,
                                          args.batch, cfg.model.decode_head.num_classes)
        results = measure(variants, step, train=True, warmup=args.warmup, repeat=args.repeat,
                          device=args.device)
        loss_differences(variants, step, results)  # the |diff| columns: of the loss
        what = f'{args.config} training step'
    else:
        results = run_backbone(args, arch, height, width, names, kwargs)
        what = f'PoolFormer-{arch.upper()} backbone {args.mode}'
        if not train:
            gmacs = backbone_complexity(arch, (height, width)).macs / 1e9
    print(f'{what}, {height}x{width}, batch {args.batch}, {args.dtype}, median of {args.repeat}'
          + (f', {gmacs:.2f} GMACs per image' if gmacs else ''))
    print(format_results(results, args.batch, names[0], gmacs, None if train else matmul))
    base = results[names[0]]
    for name in names[1:]:
        m = results[name]
        print(f'{name} vs {names[0]}: {m.speedup_over(base):.2f}x speed, '
              f'{m.peak_memory_mb / base.peak_memory_mb:.2f}x peak memory'
              if base.peak_memory_mb > 0 else f'{name}: {m.speedup_over(base):.2f}x')

    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(what=what, shape=[height, width], batch=args.batch, dtype=args.dtype,
                           threads=torch.get_num_threads(), matmul_gflops=matmul, gmacs=gmacs,
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
        for name in names:
            rates[name].append(args.batch * 1000 / results[name].median_ms)
        print(f'{size}x{size}: ' + ', '.join(f'{n} {rates[n][-1]:.2f} img/s' for n in names))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        ax.plot(args.sizes, rates[name], marker='o', label=name)
    ax.set_xlabel('input size (square, pixels)')
    ax.set_ylabel('images / s')
    ax.set_yscale('log')
    ax.set_title(f'PoolFormer-{arch.upper()} backbone {args.mode}, batch {args.batch}, '
                 f'{torch.get_num_threads()} threads')
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f'plot written to {args.plot}')


if __name__ == '__main__':
    main()
