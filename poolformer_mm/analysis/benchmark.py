"""Speed and memory of PoolFormer variants: one network with the same weights, run different ways
(the forms this project runs, ``:bf16`` as ``--amp``; the paper's formulation, :mod:`.reference`;
the peers', :mod:`.peers`; an ONNX export in ONNX Runtime), for tools/analysis/benchmark.py."""
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
import torch.nn as nn
from mmdet.testing import demo_mm_inputs
from mmengine.logging import MMLogger
from mmengine.model import revert_sync_batchnorm
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample

from ..deploy.fold import prepare_for_inference, switch_backbone_to_deploy
from ..deploy.onnx.export import (
    MaskRCNNExport,
    SegmentorExport,
    SingleStageDetectorExport,
    build_model,
    model_digest,
)
from ..deploy.onnx.postprocess import session_deploy_info
from ..deploy.onnx.verify import ort_session
from ..deploy.precision import (
    NO_BF16_UNITS,
    cpu_bf16_units,
    enable_inference_autocast,
    to_channels_last,
)
from ..models import PoolFormer
from ..models.decode_heads import LowMemoryFPNHead
from ..utils.known_warnings import ignore_known_warnings
from .complexity import build_model_without_pretrained, load_config
from .peers import PEERS, peer_backbone
from .reference import ReferencePoolFormer

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

    def speedup_over(self, baseline):
        """``baseline``'s median time over this one's: the ratio of the printed medians."""
        return baseline.median_ms / self.median_ms


def parse_variant(spec, default_dtype='fp32'):
    """``'deploy:bf16'`` -> ``('deploy', 'bf16')``; without a precision, ``default_dtype``."""
    name, colon, dtype = spec.partition(':')
    if colon and not dtype:
        raise ValueError(f"variant '{spec}' names no precision after the ':'; write "
                         f"{name}:bf16, or {name} for --dtype's precision")
    if (dtype or default_dtype) not in PRECISIONS:
        raise ValueError(f"unknown precision '{dtype}' in variant '{spec}'; choose from "
                         f"{', '.join(PRECISIONS)}")
    return name, dtype or default_dtype


def machine_description(cpuinfo='/proc/cpuinfo'):
    """The CPU model and its SIMD / matrix flags, as ``lscpu`` shows them (Linux)."""
    text = Path(cpuinfo).read_text() if Path(cpuinfo).is_file() else ''
    model = re.search(r'^model name\s*:\s*(.+)$', text, re.M)
    flags = (re.search(r'^flags\s*:(.*)$', text, re.M) or ['', ''])[1].split()
    shown = [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile') if f in flags]
    return (f"{model[1] if model else 'unknown CPU'} "
            f"({' '.join(shown) or 'no AVX2/AVX-512/AMX flags'})")


def matmul_gflops(device='cpu', size=2048, repeat=10, dtype=torch.float32, seconds_per_call=1.):
    """The large matrix-multiply rate in ``dtype`` (best of ``repeat``); ``size`` is halved (to
    256) while a product would take over ``seconds_per_call`` (emulated bf16: ~1 GFLOP/s)."""
    smallest = min(size, 256)
    rate = 2 * smallest**3 / _best_matmul_seconds(device, smallest, 3, dtype)
    while size > smallest and 2 * size**3 / rate > seconds_per_call:
        size = max(size // 2, smallest)
    return 2 * size**3 / _best_matmul_seconds(device, size, max(repeat, 1), dtype) / 1e9


def _best_matmul_seconds(device, size, repeat, dtype):
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    times = []
    for _ in range(repeat + 3):  # AMX and AVX-512 units reach full speed after a few calls
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        times.append(time.perf_counter() - start)
    return max(min(times[3:]), 1e-9)


def _sync(device):
    if str(device).startswith('cuda'):
        torch.cuda.synchronize()


def emulated_bf16_note(rates, device='cpu'):
    """A line saying that bf16 is emulated, and how much slower, where ``rates`` has a bf16 rate
    of a CPU known to have no bf16 units; None otherwise."""
    if 'bf16' in rates and not str(device).startswith('cuda') and cpu_bf16_units() == ():
        return (f"note: {NO_BF16_UNITS}: bf16 is emulated here, its matmul {rates['bf16']:.3g} "
                f"GFLOP/s against fp32's {rates['fp32']:.0f} ({rates['fp32'] / rates['bf16']:.0f}"
                "x slower), so its '% matmul' is not shown; a bare --amp runs fp32 on such a CPU "
                '(tools/train.py, test.py, infer.py): the fp32 rows')


def why_no_reference(backbone):
    """Why the paper's PoolFormer (the reference, the peers) cannot compute what ``backbone``
    does, or None: pooling, one-group GroupNorm, layer scales and exact GELU everywhere."""
    if not isinstance(backbone, PoolFormer):
        return f'the backbone is a {type(backbone).__name__}, not a PoolFormer'
    blocks = [block for stage in backbone.stages for block in stage.blocks]
    if not all(getattr(block, 'supports_token_layout', False) for block in blocks):
        mixers = ', '.join(sorted({type(block.token_mixer).__name__ for block in blocks}))
        return (f'not every block is a PoolFormer block (token mixers {mixers}; norms and layer '
                'scales as the paper has them)')
    if any(type(b.mlp.act) is not nn.GELU or b.mlp.act.approximate != 'none' for b in blocks):
        return 'its MLPs do not use (exact) GELU'
    if len({b.mlp.fc1.out_channels / b.mlp.fc1.in_channels for b in blocks}) > 1:
        return 'its stages have different MLP ratios'
    if len({block.token_mixer.pool_size for block in blocks}) > 1:
        return 'its stages pool with different window sizes'
    if backbone.stem.conv.in_channels != 3 or any(s.pos_embed is not None
                                                  for s in backbone.stages):
        return 'it has other input channels or a position embedding'


def backbone_settings(config):
    """``(arch, kwargs)`` of a config's (a path's or a ``Config``'s) PoolFormer backbone,
    without :data:`VARIANT_SETTINGS`; other backbones are refused."""
    backbone = dict(load_config(config).model.backbone)
    kind = getattr(backbone.get('type'), '__name__', str(backbone.get('type'))).split('.')[-1]
    if kind != PoolFormer.__name__:
        raise ValueError(f"{config if isinstance(config, str) else 'the config'}: its backbone "
                         f'is {kind}; this benchmark times PoolFormer backbones and models with '
                         'one (its variants are forms of PoolFormer)')
    return backbone.pop('arch', 's12'), {k: v for k, v in backbone.items()
                                         if k not in VARIANT_SETTINGS}


def _refuse(name, known, train, backbone):
    if name not in known:
        raise ValueError(f"unknown variant '{name}'; choose from {', '.join(known)}")
    if train and name == 'deploy':
        raise ValueError("'deploy' is an inference form; it does not train (leave it out of "
                         '--variants with --mode train)')
    reason = (name == 'reference' or name in PEERS) and why_no_reference(backbone)
    if reason:
        raise ValueError(f"'{name}' is the paper's PoolFormer, which this backbone is not: "
                         f"{reason}; leave '{name}' out of --variants (e.g. --variants plain "
                         'fast deploy)')


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
    variants = {}
    for spec in names:
        name = parse_variant(spec)[0]
        _refuse(name, VARIANTS, train, base)
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
    """The config's model with random weights and SyncBN as BN (as the Runner in one process);
    for 'reference' with mmseg's heads in place of this project's, for 'cp' with ``with_cp``
    and :class:`LowMemoryFPNHead` in place of mmseg's ``FPNHead``."""
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
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # init_weights logs one paragraph per parameter
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    return model


def model_variants(config, names, default_dtype='fp32', train=False):
    """The config's detector or segmentor with the same random weights, one per name; in
    inference a precision (``deploy:bf16``) is set in the model as ``--amp`` does."""
    backbone_settings(config)  # a PoolFormer backbone, or a message saying it is not
    cfg = load_config(config)
    base, variants = _build(cfg), {}
    for spec in names:
        name, dtype = parse_variant(spec, default_dtype)
        _refuse(name, MODEL_VARIANTS, train, base.backbone)
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
            enable_inference_autocast(model, 'cpu', PRECISIONS[dtype])
        variants[spec] = model.train(train)
    return variants


def training_batch(model, height, width, batch):
    """A reproducible random batch of this size (not the config's crop size) through ``model``'s
    data preprocessor, labelled for training: a label map, or 8 boxes (with masks), per image."""
    if not hasattr(model, 'decode_head'):
        data = demo_mm_inputs(batch, (3, height, width), [8] * batch, getattr(
            getattr(model, 'bbox_head', None) or model.roi_head.bbox_head, 'num_classes', 80),
            with_mask=getattr(getattr(model, 'roi_head', None), 'with_mask', False))
        return model.data_preprocessor(data, True)
    random, preprocessor = torch.Generator().manual_seed(0), model.data_preprocessor
    data = dict(inputs=[], data_samples=[])
    for _ in range(batch):
        data['inputs'].append(torch.randint(0, 256, (3, height, width), dtype=torch.uint8,
                                            generator=random))
        data['data_samples'].append(SegDataSample(
            metainfo=dict(img_shape=(height, width), ori_shape=(height, width)),
            gt_sem_seg=PixelData(data=torch.randint(0, model.decode_head.num_classes,
                                                    (1, height, width), generator=random))))
    crop_size, preprocessor.size = preprocessor.size, (height, width)  # mmseg pads to its crop
    try:
        return preprocessor(data, True)
    finally:
        preprocessor.size = crop_size


class OnnxRuntimeModel(nn.Module):
    """An ONNX Runtime CPU session called like a module; returns its outputs as tensors."""

    def __init__(self, path, threads=None):
        super().__init__()
        # no busy-waiting threads after a run, which would slow the variant timed next
        self.session = ort_session(path, threads, spinning=False)

    def forward(self, inputs):
        return tuple(map(torch.from_numpy, self.session.run(None, {'input': inputs.numpy()})))


def onnx_variants(config, onnx_path, checkpoint=None, threads=None):
    """The export three ways, checked to be one network: 'eager' (the config's model), 'deploy'
    (folded) and 'onnxruntime' (the file); without ``checkpoint`` the weights are random."""
    try:
        runtime = OnnxRuntimeModel(onnx_path, threads)
    except Exception as error:  # onnxruntime's own classes: InvalidProtobuf, Fail, ...
        raise ValueError(f"--onnx {onnx_path}: ONNX Runtime cannot load it ({error}); give a "
                         'file written by tools/deployment/pytorch2onnx.py') from error
    try:  # the timings rely on its task, outputs and sizes
        runtime.info = info = session_deploy_info(runtime.session)
    except ValueError as error:
        raise ValueError(f'--onnx {onnx_path}: {error}') from error
    model = build_model(config, checkpoint)[0]
    task = 'segmentation' if hasattr(model, 'decode_head') else 'detection'
    if info['task'] != task:
        raise ValueError(f'--onnx {onnx_path} was exported from a {info["task"]} model, and '
                         f'{config} builds a {task} model ({type(model).__name__}); give the '
                         'config it was exported from')
    if info.get('model_digest') != model_digest(model):
        why = (f'and {config} builds a model with other layers (arch, classes or heads); give '
               'the config it was exported from (and --checkpoint, the weights it was exported '
               'with)' if 'model_digest' in info else 'before 0.2.0 (no digest of its layers '
               'to check against the config); export it again')
        raise ValueError(f"--onnx {onnx_path} was exported from {info.get('config', '?')}, {why}")
    deploy = copy.deepcopy(model)
    switch_backbone_to_deploy(deploy)
    wrap = (SegmentorExport if task == 'segmentation' else MaskRCNNExport
            if 'masks' in info['outputs'] else SingleStageDetectorExport)
    logits = ('logits' in info['outputs'], ) if task == 'segmentation' else ()
    return dict(eager=wrap(model, *logits).eval(), deploy=wrap(deploy, *logits).eval(),
                onnxruntime=runtime)


def _onnx_input_size(args, runtime):
    """The input size an export takes: its own, or a dynamic one's at ``--shape`` if given."""
    info, (batch, _, height, width) = runtime.info, runtime.session.get_inputs()[0].shape
    if isinstance(batch, int) and batch != args.batch:
        why = ('its export takes one image at a time, also with --dynamic' if info.get('dynamic')
               else 'exported without a dynamic batch axis')
        raise ValueError(f'--onnx {args.onnx} takes batches of {batch} ({why}); use --batch '
                         f'{batch}')
    if isinstance(height, int) and args.shape and [height, width] != (args.shape * 2)[:2]:
        raise ValueError(f'--onnx {args.onnx} was exported for {height}x{width} inputs only; '
                         'leave out --shape, or export with --dynamic')
    if not isinstance(height, int):
        height, width = (args.shape * 2)[:2] if args.shape else info['input_size']
    if height % info['size_divisor'] or width % info['size_divisor']:
        raise ValueError(f'--shape {height} {width}: --onnx {args.onnx} takes sides that are '
                         f"multiples of {info['size_divisor']} (the size divisor of its config)")
    return height, width


def flat_float_outputs(outputs):
    """Every floating tensor of nested tuples / lists, in order, in fp32."""
    if isinstance(outputs, torch.Tensor):
        return [outputs.float()] if outputs.is_floating_point() else []
    return [t for o in outputs for t in flat_float_outputs(o)] if isinstance(
        outputs, (tuple, list)) else []


def build(args, names, notes=None):
    """What ``args`` of tools/analysis/benchmark.py times: ``(variants, steps, compared, (height,
    width))``; ``steps[name](model)`` is timed, ``compared[name](model)`` gives what is compared
    (outputs in inference, of a whole model's network; in training the loss)."""
    train, (height, width) = args.mode == 'train', ((args.shape or [512]) * 2)[:2]
    dtypes = {name: PRECISIONS[parse_variant(name, args.dtype)[1]] for name in names}
    random, samples, loss = torch.Generator().manual_seed(0), None, _backbone_loss
    if args.onnx:
        variants = onnx_variants(args.config, args.onnx, args.checkpoint, torch.get_num_threads())
        height, width = _onnx_input_size(args, variants['onnxruntime'])
        dtypes = dict.fromkeys(variants, torch.float32)
        inputs = torch.randn(args.batch, 3, height, width, generator=random)
    elif args.model:
        variants = model_variants(args.model, names, args.dtype, train)
        data = training_batch(next(iter(variants.values())), height, width, args.batch)
        inputs, samples, loss = data['inputs'], data['data_samples'], _model_loss
        if not train:  # the precision is set in the model
            dtypes = dict.fromkeys(names, torch.float32)
    else:
        arch, kwargs = backbone_settings(args.config) if args.config else (args.arch, {})
        variants = backbone_variants(arch, names, notes, train, **kwargs)
        inputs = torch.randn(args.batch, 3, height, width, generator=random).to(args.device)
    for model in variants.values():
        model.to(args.device).train(train)
    mode = 'loss' if train else 'predict' if args.postprocess else 'tensor'
    steps = {n: _step(inputs, dtypes[n], train, loss, samples, mode) for n in variants}
    compared = {n: _step(inputs, dtypes[n], train, loss, samples, 'loss' if train else 'tensor')
                for n in variants if not n.startswith('timm')}  # timm: no output norms
    return variants, steps, compared, (height, width)


def _step(inputs, dtype, train, loss, samples=None, mode='tensor'):
    """A call of a variant, under autocast in a low ``dtype``; in training forward, loss and
    backward (seeded: the same dropout masks in every variant), returning the loss."""
    def step(model):
        torch.manual_seed(0)
        with torch.autocast(inputs.device.type, dtype, enabled=dtype != torch.float32), \
                torch.set_grad_enabled(train):
            out = model(inputs) if samples is None else model(inputs, copy.deepcopy(samples),
                                                              mode=mode)
            if not train:
                return out
            value = loss(model, out)
        value.backward()
        model.zero_grad(set_to_none=True)
        return value.detach()
    return step


def _backbone_loss(model, outputs):
    return sum(output.float().mean() for output in outputs)


def _model_loss(model, losses):
    return model.parse_losses(losses)[0]


def measure(variants, steps, warmup=2, repeat=10, device='cpu'):
    """Time ``steps[name](model)`` of every variant, interleaved (A B C A B C ...) so that a
    machine whose speed drifts treats them alike: ``{name: Measurement}``."""
    results = {name: Measurement(name) for name in variants}
    for _ in range(warmup):
        for name, model in variants.items():
            steps[name](model)
    for _ in range(repeat):
        for name, model in variants.items():
            _sync(device)
            start = time.perf_counter()
            steps[name](model)
            _sync(device)
            results[name].latency_ms.append((time.perf_counter() - start) * 1000)
    return results


def compare(args, variants, compared, results):
    """Each variant's largest absolute difference of what ``compared`` gives from the first
    variant's in fp32 (a model of its own where the first is in another precision), and that
    over the largest value; nan where there is nothing to compare (class indices, timm, another
    proposal count)."""
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
    """The memory one step of each variant needs: the rise of the resident set's high-water mark
    (Linux; nan elsewhere), or of ``max_memory_allocated`` on a GPU, during the first step in a
    fresh process per variant (none reuses what another freed; one-time allocations count)."""
    peaks, spawn = {}, multiprocessing.get_context('spawn')
    for name in names:  # an executor's process of its own (a dead one raises, never hangs)
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            peaks[name] = pool.submit(_peak_memory_mb, args, name).result()
    return peaks


def _peak_memory_mb(args, name):
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
        start = _status_mb('VmRSS')
        step(model)
        return _status_mb('VmHWM') - start
    except OSError:
        return math.nan


def _status_mb(key):
    lines = Path('/proc/self/status').read_text().splitlines()
    return next(int(line.split()[1]) for line in lines if line.startswith(key + ':')) / 1024


def format_results(results, batch, baseline, gmacs=None, rates=None):
    """A table; '% matmul' is 2 * MACs / median as a share of ``rates[name]``, the machine's
    matrix-multiply rate in the variant's precision ('-' where None)."""
    show_rate = bool(gmacs and rates and any(rates.values()))
    lines = [f'{"variant":18} {"median ms":>10} {"min-max ms":>16} {"img/s":>8} {"speed-up":>9} '
             f'{"peak MB":>9} {"max |diff|":>11} {"rel diff":>9}' + '  % matmul' * show_rate]
    for name, m in results.items():
        rate = show_rate and rates.get(name)  # GFLOP/s reached: 2 * GMACs * images / seconds
        lines.append(f'{name:18} {m.median_ms:10.1f} {min(m.latency_ms):7.1f}-'
                     f'{max(m.latency_ms):<8.1f} {batch * 1000 / m.median_ms:8.2f} '
                     f'{m.speedup_over(results[baseline]):8.2f}x {_cell(m.peak_memory_mb, "9.0f")}'
                     f' {_cell(m.max_abs_diff, "11.2e")} {_cell(m.max_rel_diff, "9.2e")}'
                     + (f' {2e3 * gmacs * batch / m.median_ms / rate:9.0%}' if rate else
                        f' {"-":>9}' if show_rate else ''))
    return '\n'.join(lines)


def _cell(value, form):
    return f'{"-":>{form.split(".")[0]}}' if math.isnan(value) else f'{value:{form}}'
