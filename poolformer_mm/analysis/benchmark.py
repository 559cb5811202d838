"""Speed and memory of one network run different ways, for tools/analysis/benchmark.py: this
project's forms, the paper's (:mod:`.reference`), the peers' (:mod:`.peers`), an ONNX export."""
import copy
import ctypes
import gc
import logging
import math
import multiprocessing
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mmdet.testing import demo_mm_inputs
from mmengine.model import revert_sync_batchnorm
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample

from ..deploy import precision
from ..deploy.fold import prepare_for_inference
from ..deploy.onnx.verify import onnx_variants
from ..deploy.precision import NO_BF16_UNITS, cpu_bf16_units, to_channels_last
from ..models import PoolFormer
from ..models.decode_heads import LowMemoryFPNHead
from ..utils.known_warnings import ignore_known_warnings
from .complexity import build_model_without_pretrained, load_config
from .peers import PEERS, peer_backbone
from .reference import ReferencePoolFormer, why_no_reference

VARIANTS = ('reference', 'plain', 'fast', 'deploy', 'cp') + tuple(PEERS)  # of a backbone
MODEL_VARIANTS = ('reference', 'plain', 'fast', 'channels_last', 'deploy', 'cp')
PRECISIONS = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# settings of a config's backbone that the variants set themselves, or that load weights
VARIANT_SETTINGS = ('type', 'init_cfg', 'pretrained', 'with_cp', 'fast_path')
# this project's heads and the mmseg ones whose outputs and loss they compute
UPSTREAM_HEADS = {'LowMemoryFPNHead': 'FPNHead', 'LowMemoryUPerHead': 'UPerHead',
                  'LowMemoryFCNHead': 'FCNHead'}


@dataclass
class Measurement:
    variant: str
    latency_ms: list = field(default_factory=list)
    peak_memory_mb: float = math.nan
    max_abs_diff: float = math.nan
    max_rel_diff: float = math.nan

    @property
    def median_ms(self):
        return statistics.median(self.latency_ms)

    def speedup_over(self, baseline):  # the ratio of the printed medians
        return baseline.median_ms / self.median_ms


def parse_variant(spec, default_dtype='fp32'):
    """``'deploy:bf16'`` -> ``('deploy', 'bf16')``; without a precision, ``default_dtype``."""
    name, colon, dtype = spec.partition(':')
    if (dtype if colon else default_dtype) not in PRECISIONS:
        raise ValueError(f"unknown precision '{dtype}' in variant '{spec}'; choose from "
                         f"{', '.join(PRECISIONS)}")
    return name, dtype if colon else default_dtype


def check_variants(specs, whole_model=False, train=False, dtype='fp32', backbone=None):
    """Refuse (ValueError) unknown or repeated variants, 'deploy' in training, and the paper's
    PoolFormer (reference, peers) where ``backbone`` computes something else."""
    rows = [':'.join(parse_variant(spec, dtype)) for spec in specs]
    names, known = [row.split(':')[0] for row in rows], MODEL_VARIANTS if whole_model else VARIANTS
    unknown = [name for name in names if name not in known]
    twice = sorted({row for row in rows if rows.count(row) > 1})
    paper = [name for name in names if name == 'reference' or name in PEERS]
    reason = paper and backbone is not None and why_no_reference(backbone)
    if unknown:
        raise ValueError(f"--variants: unknown variant {', '.join(unknown)} for "
                         f"{'whole models' if whole_model else 'backbones'}; choose from "
                         f"{', '.join(known)}")
    if train and 'deploy' in names:
        raise ValueError("'deploy' is an inference form; it does not train (leave it out of "
                         '--variants with --mode train)')
    if twice:
        raise ValueError(f"--variants names {', '.join(twice)} more than once")
    if reason:
        raise ValueError(f"'{paper[0]}' is the paper's PoolFormer, which this backbone is not: "
                         f"{reason}; leave '{paper[0]}' out of --variants (e.g. --variants plain "
                         'fast deploy)')


def _clock(device):  # time.perf_counter() once the GPU's queued work is done
    if str(device).startswith('cuda'):
        torch.cuda.synchronize()
    return time.perf_counter()


def matmul_gflops(device='cpu', size=2048, repeat=10, dtype=torch.float32, seconds_per_call=1.):
    """The best matrix-multiply rate in ``dtype`` of ``repeat`` products of ``size`` (halved, to
    256, while a product would take over ``seconds_per_call``: emulated bf16 is ~1 GFLOP/s)."""
    def seconds(size, repeat):
        a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
        times = []
        for _ in range(repeat + 3):  # AMX and AVX-512 units reach full speed after a few calls
            start = _clock(device)
            torch.mm(a, b)
            times.append(_clock(device) - start)
        return max(min(times[3:]), 1e-9)

    smallest = min(size, 256)
    rate = 2 * smallest**3 / seconds(smallest, 3)
    while size > smallest and 2 * size**3 / rate > seconds_per_call:
        size = max(size // 2, smallest)
    return 2 * size**3 / seconds(size, max(repeat, 1)) / 1e9


def emulated_bf16_note(rates, device='cpu'):
    """A line saying how much slower bf16 is where a CPU emulates it (no bf16 units); else None."""
    if 'bf16' in rates and not str(device).startswith('cuda') and cpu_bf16_units() == ():
        return (f"note: {NO_BF16_UNITS}: bf16 is emulated here, its matmul {rates['bf16']:.3g} "
                f"GFLOP/s against fp32's {rates['fp32']:.0f} ({rates['fp32'] / rates['bf16']:.0f}"
                "x slower), so its '% matmul' is not shown; a bare --amp runs fp32 on such a CPU "
                '(tools/train.py, test.py, infer.py): the fp32 rows')


def backbone_settings(config):
    """``(arch, kwargs)`` of a config's (path or ``Config``) PoolFormer backbone, without
    :data:`VARIANT_SETTINGS`; other backbones are refused."""
    backbone = dict(load_config(config).model.backbone)
    kind = getattr(backbone.get('type'), '__name__', str(backbone.get('type'))).split('.')[-1]
    if kind != PoolFormer.__name__:
        raise ValueError(f"{config if isinstance(config, str) else 'the config'}: its backbone "
                         f'is {kind}; this benchmark times PoolFormer backbones and models with '
                         'one (its variants are forms of PoolFormer)')
    return backbone.pop('arch', 's12'), {k: v for k, v in backbone.items()
                                         if k not in VARIANT_SETTINGS}


def backbone_variants(arch, names, notes=None, train=False, **kwargs):
    """PoolFormer backbones with the same random weights, one per name (its precision is the
    step's); a peer that is not installed is left out, and why added to ``notes``."""
    torch.manual_seed(0)
    base = PoolFormer(arch, **kwargs)
    base.init_weights()
    with torch.no_grad():  # non-trivial norms and layer scales, so folding is really tested
        for key, param in base.named_parameters():
            if 'norm' in key or 'layer_scale' in key:
                param.add_(torch.randn_like(param) * 0.1)
    check_variants(names, train=train, backbone=base)
    variants = {}
    for spec in names:
        name = parse_variant(spec)[0]
        if name in PEERS:
            peer, reason = peer_backbone(name, base)
            if peer is not None:
                variants[spec] = peer
            elif notes is not None:
                notes.append(f'{spec} skipped: {reason}')
            continue
        model = ReferencePoolFormer.like(base) if name == 'reference' else copy.deepcopy(base)
        variants[spec] = (model.set_fast_path(False) if name == 'plain' else
                          model.switch_to_deploy() if name == 'deploy' else
                          model.set_grad_checkpointing(True) if name == 'cp' else model)
    return variants


def _build(cfg, name='fast'):
    # random weights, SyncBN as BN; 'reference' with mmseg's heads, 'cp' with LowMemoryFPNHead
    cfg = copy.deepcopy(cfg)
    cfg.model.backbone.update(with_cp=name == 'cp', fast_path=True)
    for key in ('decode_head', 'auxiliary_head'):
        heads = cfg.model.get(key)
        for head in heads if isinstance(heads, list) else [heads] if heads else []:
            kind = head.type.split('.')[-1]
            if name == 'reference':
                head.type = UPSTREAM_HEADS.get(kind, head.type)
            elif name == 'cp' and kind == 'FPNHead' and key == 'decode_head':
                head.type = LowMemoryFPNHead.__name__
    torch.manual_seed(0)
    model = revert_sync_batchnorm(build_model_without_pretrained(cfg))
    logging.disable(logging.INFO)  # init_weights logs one paragraph per parameter
    try:
        model.init_weights()
    finally:
        logging.disable(logging.NOTSET)
    return model


def model_variants(config, names, default_dtype='fp32', train=False, device='cpu'):
    """The config's detector or segmentor on ``device`` with the same random weights, one per
    name; in inference a precision (``deploy:bf16``) is set in the model as ``--amp`` does."""
    backbone_settings(config)  # a PoolFormer backbone, or a message saying it is not
    cfg = load_config(config)
    base, variants = _build(cfg), {}
    check_variants(names, True, train, default_dtype, base.backbone)
    for spec in names:
        name, dtype = parse_variant(spec, default_dtype)
        model = _build(cfg, name) if name in ('reference', 'cp') else copy.deepcopy(base)
        model.load_state_dict(base.state_dict())
        if name == 'reference':
            model.backbone = ReferencePoolFormer.like(base.backbone)
        elif name == 'plain':
            model.backbone.set_fast_path(False)
        elif name == 'channels_last':
            to_channels_last(model)
        elif name == 'deploy':
            prepare_for_inference(model)
        if not train and dtype != 'fp32':
            precision.enable_inference_autocast(model, device.split(':')[0], PRECISIONS[dtype])
        variants[spec] = model.to(device).train(train)
    return variants


def training_batch(model, height, width, batch):
    """A reproducible random batch of this size (not the config's crop size) through ``model``'s
    data preprocessor, labelled for training: a label map, or 8 boxes (with masks), per image."""
    if not hasattr(model, 'decode_head'):
        data = demo_mm_inputs(batch, (3, height, width), [8] * batch, getattr(
            getattr(model, 'bbox_head', None) or model.roi_head.bbox_head, 'num_classes', 80),
            with_mask=getattr(getattr(model, 'roi_head', None), 'with_mask', False))
        return model.data_preprocessor(data, True)
    random, preprocessor = torch.Generator().manual_seed(0), copy.copy(model.data_preprocessor)
    preprocessor.size = (height, width)  # mmseg pads to its crop size
    data = dict(inputs=[], data_samples=[])
    for _ in range(batch):
        data['inputs'].append(torch.randint(0, 256, (3, height, width), dtype=torch.uint8,
                                            generator=random))
        data['data_samples'].append(SegDataSample(
            metainfo=dict(img_shape=(height, width), ori_shape=(height, width)),
            gt_sem_seg=PixelData(data=torch.randint(0, model.decode_head.num_classes,
                                                    (1, height, width), generator=random))))
    return preprocessor(data, True)


def flat_float_outputs(outputs):
    """Every floating tensor of nested tuples / lists, in order, in fp32."""
    if isinstance(outputs, (tuple, list)):
        return [t for o in outputs for t in flat_float_outputs(o)]
    return [outputs.float()] if torch.is_tensor(outputs) and outputs.is_floating_point() else []


def build(args, names, notes=None):
    """What ``args`` of tools/analysis/benchmark.py times: ``(variants, steps, compared, (height,
    width))``; ``steps[name](model)`` is timed, ``compared[name](model)`` gives what is compared
    (outputs in inference, of a whole model's network; in training the loss)."""
    train, (height, width), samples = args.mode == 'train', ((args.shape or [512]) * 2)[:2], None
    if args.onnx:
        variants = onnx_variants(args.config, args.onnx, args.checkpoint, torch.get_num_threads(),
                                 args.batch, args.shape)
        height, width = variants['onnxruntime'].input_size
    elif args.model:
        variants = model_variants(args.model, names, args.dtype, train, args.device)
        data = training_batch(next(iter(variants.values())), height, width, args.batch)
        inputs, samples = data['inputs'], data['data_samples']
    else:
        arch, kwargs = backbone_settings(args.config) if args.config else (args.arch, {})
        variants = backbone_variants(arch, names, notes, train, **kwargs)
    if not args.model:
        inputs = torch.randn(args.batch, 3, height, width,
                             generator=torch.Generator().manual_seed(0)).to(args.device)
    fp32 = args.onnx or args.model and not train  # else the precision is set in the model
    dtypes = {n: PRECISIONS['fp32' if fp32 else parse_variant(n, args.dtype)[1]] for n in variants}
    for model in variants.values():
        model.to(args.device).train(train)
    mode = 'loss' if train else 'predict' if args.postprocess else 'tensor'
    steps = {n: _step(inputs, dtypes[n], train, samples, mode) for n in variants}
    # timm: no output norms; an export's weights are those of --checkpoint only
    compared = {n: _step(inputs, dtypes[n], train, samples, 'loss' if train else 'tensor')
                for n in variants if not n.startswith('timm')
                and not (n == 'onnxruntime' and not args.checkpoint)}
    return variants, steps, compared, (height, width)


def _step(inputs, dtype, train, samples, mode):
    # under autocast in a low dtype; seeded: the same dropout masks in every variant
    def step(model):
        torch.manual_seed(0)
        with torch.autocast(inputs.device.type, dtype, enabled=dtype != torch.float32), \
                torch.set_grad_enabled(train):
            out = model(inputs) if samples is None else model(inputs, copy.deepcopy(samples),
                                                              mode=mode)
            if not train:
                return out
            value = (sum(output.float().mean() for output in out) if samples is None else
                     model.parse_losses(out)[0])
        value.backward()
        model.zero_grad(set_to_none=True)
        return value.detach()
    return step


def measure(variants, steps, warmup=2, repeat=10, device='cpu'):
    """Time ``steps[name](model)`` of every variant, interleaved (A B C A B C ...) so that a
    machine whose speed drifts treats them alike: ``{name: Measurement}``."""
    results = {name: Measurement(name) for name in variants}
    for _ in range(warmup):
        for name, model in variants.items():
            steps[name](model)
    for _ in range(repeat):
        for name, model in variants.items():
            start = _clock(device)
            steps[name](model)
            results[name].latency_ms.append((_clock(device) - start) * 1000)
    return results


def compare(args, variants, compared, results):
    """Set each result's largest |difference| from the first variant in fp32, and relative to
    that's largest value; nan with nothing to compare (class indices, timm, other proposals)."""
    first = next(iter(results))
    name, dtype = parse_variant(first)
    first = first if dtype == 'fp32' else f'{name}:fp32'
    if first not in variants:
        first_variants, _, first_compared, _ = build(args, [first])
        variants, compared = {**variants, **first_variants}, {**compared, **first_compared}
    expected = flat_float_outputs(compared[first](variants[first])) if first in compared else []
    scale = max((o.abs().max().item() for o in expected), default=0.0)
    for name in results.keys() & compared.keys():
        outputs = flat_float_outputs(compared[name](variants[name]))
        if outputs and [o.shape for o in outputs] == [o.shape for o in expected]:
            diff = max((a - b).abs().max().item() for a, b in zip(expected, outputs))
            results[name].max_abs_diff = diff
            results[name].max_rel_diff = diff / scale if scale else math.nan


def peak_memory_mb(args, names):
    """The rise of the resident set's high-water mark (Linux; else nan), or on a GPU of
    ``max_memory_allocated``, in one step of each variant, each in a fresh process."""
    peaks, spawn = {}, multiprocessing.get_context('spawn')
    for name in names:  # an executor's process of its own (a dead one raises, never hangs)
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            peaks[name] = pool.submit(_peak_memory_mb, args, name).result()
    return peaks


def _peak_memory_mb(args, name):
    def status_mb(key):
        status = Path('/proc/self/status').read_text()
        return int(re.search(rf'^{key}:\s*(\d+)', status, re.M)[1]) / 1024

    ignore_known_warnings()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    variants, steps, _, _ = build(args, [name])
    model, step = variants.pop(name), steps[name]
    del variants
    gc.collect()
    if hasattr(ctypes.CDLL(None), 'malloc_trim'):  # glibc: what the step reuses counts too
        ctypes.CDLL(None).malloc_trim(0)
    if args.device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step(model)
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    try:  # not ru_maxrss: a spawned process starts with its parent's
        Path('/proc/self/clear_refs').write_text('5')  # VmHWM down to the resident set
        start = status_mb('VmRSS')
        step(model)
        return status_mb('VmHWM') - start
    except OSError:
        return math.nan


def format_results(results, batch, baseline, gmacs=None, rates=None):
    """A table; '% matmul' is 2 * MACs / median as a share of ``rates[name]``, the machine's
    matrix-multiply rate in the variant's precision ('-' where None)."""
    def cell(value, form):
        return f'{"-":>{form.split(".")[0]}}' if math.isnan(value) else f'{value:{form}}'

    show_rate = bool(gmacs and rates and any(rates.values()))
    lines = [f'{"variant":18} {"median ms":>10} {"min-max ms":>16} {"img/s":>8} {"speed-up":>9} '
             f'{"peak MB":>9} {"max |diff|":>11} {"rel diff":>9}' + '  % matmul' * show_rate]
    for name, m in results.items():
        rate = show_rate and rates.get(name)  # GFLOP/s reached: 2 * GMACs * images / seconds
        lines.append(f'{name:18} {m.median_ms:10.1f} {min(m.latency_ms):7.1f}-'
                     f'{max(m.latency_ms):<8.1f} {batch * 1000 / m.median_ms:8.2f} '
                     f'{m.speedup_over(results[baseline]):8.2f}x {cell(m.peak_memory_mb, "9.0f")}'
                     f' {cell(m.max_abs_diff, "11.2e")} {cell(m.max_rel_diff, "9.2e")}'
                     + (f' {2e3 * gmacs * batch / m.median_ms / rate:9.0%}' if rate else
                        f' {"-":>9}' if show_rate else ''))
    return '\n'.join(lines)
