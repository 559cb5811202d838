"""Speed and memory of PoolFormer variants, measured side by side in one process.

Each variant is the same network with the same weights, run a different way:

* ``reference`` - :class:`ReferencePoolFormer`, the paper's block written out plainly (NCHW);
* ``plain``     - :class:`PoolFormer` after ``set_fast_path(False)`` (the same formulation);
* ``fast``      - :class:`PoolFormer`'s default token-layout path (trains; same gradients);
* ``deploy``    - after ``switch_to_deploy()``: norms and layer scales folded in (inference only);
* ``cp``        - the default path after ``set_grad_checkpointing(True)`` (``with_cp=True``); for
  a whole segmentor whose config names mmseg's ``FPNHead``, also :class:`LowMemoryFPNHead`;
* ``timm``, ``mmpretrain`` - the peers' PoolFormer (:mod:`.peers`), when installed.

Whole detectors and segmentors (:func:`model_variants`) take ``reference`` (the paper's backbone
in the config's model with mmseg's heads, :func:`upstream_model`), ``plain``, ``fast``, ``cp``,
``channels_last`` (``tools/train.py --channels-last``) and ``deploy``, which is what
``tools/test.py --deploy`` runs (:func:`~poolformer_mm.engine.prepare_for_inference`).

A variant name may carry its precision, ``deploy:bf16``; ``bf16`` is what ``--amp`` runs: for a
backbone, autocast around it; for a whole model in inference, autocast in the backbone, neck and
heads with post-processing in fp32 (:func:`~poolformer_mm.engine.enable_inference_autocast`);
in training, autocast around the loss computation, as ``tools/train.py --amp``.

Modes are switched only through these public methods of the backbone.

Timings interleave the variants (A B C A B C ...) so that a machine whose speed drifts treats
them alike; medians are reported, and a speed-up is the ratio of the two medians. Memory is
the peak resident set size above the level just before the measured call (CPU, sampled every
millisecond) or ``max_memory_allocated`` (CUDA).
"""
import copy
import ctypes
import gc
import logging
import math
import os.path as osp
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import psutil
import torch
import torch.nn as nn
from mmengine.logging import MMLogger
from mmengine.model import revert_sync_batchnorm

from ..deploy.precision import NO_BF16_UNITS, cpu_bf16_units
from ..models import PoolFormer
from .reference import ReferencePoolFormer

VARIANTS = ('reference', 'plain', 'fast', 'deploy', 'cp')
MODEL_VARIANTS = ('reference', 'plain', 'fast', 'channels_last', 'deploy', 'cp')


@dataclass
class Measurement:
    variant: str
    latency_ms: List[float] = field(default_factory=list)
    peak_memory_mb: float = float('nan')
    max_abs_diff: float = float('nan')
    max_rel_diff: float = float('nan')

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latency_ms)

    def speedup_over(self, baseline: 'Measurement') -> float:
        """``baseline``'s median time over this one's: the ratio of the printed medians."""
        return baseline.median_ms / self.median_ms

    def as_dict(self, batch: int) -> dict:
        out = asdict(self)
        out.update(median_ms=self.median_ms, min_ms=min(self.latency_ms),
                   max_ms=max(self.latency_ms), images_per_s=batch * 1000 / self.median_ms)
        return out


def matmul_gflops(device: str = 'cpu', size: int = 2048, repeat: int = 10,
                  dtype: torch.dtype = torch.float32, seconds_per_call: float = 1.0) -> float:
    """The machine's large matrix-multiply rate in ``dtype`` (best of ``repeat``): the ceiling
    for networks whose MACs sit in 1x1 convolutions. The best run, because a shared machine's
    slow moments would otherwise lower the ceiling and flatter the fraction reached.

    ``size`` is halved (down to 256) only while a product of that size would take longer than
    ``seconds_per_call`` at the rate of small products (best of three): a CPU without bf16
    units emulates bf16 at about 1 GFLOP/s, where the products of 2048 would take minutes.
    A CPU whose 256-sized products run above about 17 GFLOP/s keeps 2048."""
    smallest = min(size, 256)
    rate = 2 * smallest**3 / _best_matmul_seconds(device, smallest, 3, dtype)
    while size > smallest and 2 * size**3 / rate > seconds_per_call:
        size = max(size // 2, smallest)
    return 2 * size**3 / _best_matmul_seconds(device, size, max(repeat, 1), dtype) / 1e9


def _best_matmul_seconds(device: str, size: int, repeat: int, dtype: torch.dtype) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = []
    for _ in range(repeat + 3):  # AMX and AVX-512 units reach full speed after a few calls
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        times.append(time.perf_counter() - start)
    return max(min(times[3:]), 1e-9)


def emulated_bf16_note(rates: Dict[str, float], device: str = 'cpu') -> Optional[str]:
    """A line saying that bf16 is emulated, with how much slower, when ``rates`` has a bf16
    matmul rate measured on a CPU without bf16 units; None otherwise."""
    # () is a CPU known to have none; None (flags unknown) or a unit: nothing to say
    if 'bf16' not in rates or str(device).startswith('cuda') or cpu_bf16_units() != ():
        return None
    return (f"note: {NO_BF16_UNITS}: bf16 is emulated here, its matmul {rates['bf16']:.3g} "
            f"GFLOP/s against fp32's {rates['fp32']:.0f} ({rates['fp32'] / rates['bf16']:.0f}x "
            "slower), so the bf16 variants are slow and their '% matmul' (of an emulated rate) is "
            'not shown; a bare --amp runs fp32 on such a CPU (in tools/train.py, test.py and '
            'infer.py), so the fp32 rows are what it gives here')


def _sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def _release_memory() -> None:
    gc.collect()
    try:  # give freed heap back to the OS so the next RSS baseline is honest (glibc only)
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except OSError:
        pass


def _release_scratch(model: nn.Module) -> None:
    """Free the scratch tensors that folded blocks keep between calls."""
    from ..models.layers import ScratchBuffers
    for module in model.modules():
        scratch = getattr(module, 'scratch', None)
        if isinstance(scratch, ScratchBuffers):
            scratch.clear()


def _map_large_blocks_separately() -> None:
    """Make RSS follow the memory in use (glibc only).

    glibc raises its mmap threshold (up to 32 MB) whenever a large block is freed, after which
    blocks of many MB come from the heap and stay counted in RSS after they are freed: the
    measured peak then depends on the allocation history. A fixed threshold of 1 MB keeps large
    blocks in their own mappings, returned to the system on free.
    """
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixing it turns the adjustment off)
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class _PeakRss:
    """Samples this process's RSS in a thread; ``peak_mb`` is the rise above the start."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.process = psutil.Process()

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.start) / 2**20


PRECISIONS = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def parse_variant(spec: str, default_dtype: str = 'fp32') -> tuple:
    """``'deploy:bf16'`` -> ``('deploy', 'bf16')``; without a precision, ``default_dtype``."""
    name, colon, dtype = spec.partition(':')
    if colon and not dtype:
        raise ValueError(f"variant '{spec}' names no precision after the ':'; write "
                         f"{name}:bf16, or {name} for --dtype's precision")
    dtype = dtype or default_dtype
    if dtype not in PRECISIONS:
        raise ValueError(f"unknown precision '{dtype}' in variant '{spec}'; choose from "
                         f"{', '.join(PRECISIONS)}")
    return name, dtype


def why_no_reference(backbone: nn.Module) -> Optional[str]:
    """Why :class:`ReferencePoolFormer` (and the peers' PoolFormer) cannot compute what
    ``backbone`` computes, or None when it can: the paper's PoolFormer has pooling, GroupNorm
    with one group, layer scales and a GELU MLP of one width ratio in every block."""
    if not isinstance(backbone, PoolFormer):
        return f'the backbone is a {type(backbone).__name__}, not a PoolFormer'
    blocks = [block for stage in backbone.stages for block in stage.blocks]
    if not all(getattr(block, 'supports_token_layout', False) for block in blocks):
        mixers = sorted({type(block.token_mixer).__name__ for block in blocks})
        return (f"not every block is a PoolFormer block (token mixers {', '.join(mixers)}; "
                'norms and layer scales as the paper has them)')
    if any(type(block.mlp.act) is not nn.GELU or block.mlp.act.approximate != 'none'
           for block in blocks):
        return 'its MLPs do not use (exact) GELU'
    if len({block.mlp.fc1.out_channels / block.mlp.fc1.in_channels for block in blocks}) > 1:
        return 'its stages have different MLP ratios'
    if len({block.token_mixer.pool_size for block in blocks}) > 1:
        return 'its stages pool with different window sizes'
    if backbone.stem.conv.in_channels != 3 or any(stage.pos_embed is not None
                                                  for stage in backbone.stages):
        return 'it has other input channels or a position embedding'
    return None


# settings of a config's backbone that the variants set themselves, or that load weights
VARIANT_SETTINGS = ('type', 'init_cfg', 'pretrained', 'with_cp', 'fast_path')


def backbone_settings(config) -> tuple:
    """``(arch, kwargs)`` of the PoolFormer backbone of a detector or segmentor config (a path
    or a loaded ``Config``): all its settings except :data:`VARIANT_SETTINGS`. Other backbones
    are refused."""
    from .complexity import load_config
    backbone = dict(load_config(config).model.backbone)
    kind = backbone.get('type')
    kind = getattr(kind, '__name__', str(kind)).split('.')[-1]
    if kind != PoolFormer.__name__:
        name = config if isinstance(config, str) else 'the config'
        raise ValueError(f"{name}: its backbone is {kind}; this benchmark times PoolFormer "
                         'backbones and models with one (its variants are forms of PoolFormer)')
    arch = backbone.pop('arch', 's12')
    return arch, {k: v for k, v in backbone.items() if k not in VARIANT_SETTINGS}


def has_roi_heads(config) -> bool:
    """Whether a config's model is a two-stage detector (an ``roi_head``)."""
    from .complexity import load_config
    return load_config(config).model.get('roi_head') is not None


def refuse_training_an_inference_form(name: str, train: bool) -> None:
    """'deploy' holds folded buffers, not parameters: it has no training step to time."""
    if train and name == 'deploy':
        raise ValueError("'deploy' is an inference form; it does not train (leave it out of "
                         '--variants with --mode train)')


def refuse_reference_unlike(name: str, backbone: nn.Module) -> None:
    """A 'reference' (or peer) variant of a backbone the paper's formulation is not."""
    reason = why_no_reference(backbone)
    if reason is not None:
        raise ValueError(f"'{name}' is the paper's PoolFormer, which this backbone is "
                         f"not: {reason}; leave '{name}' out of --variants (e.g. --variants "
                         'plain fast deploy)')


def backbone_variants(arch: Union[str, dict], names: Sequence[str], seed: int = 0,
                      notes: Optional[List[str]] = None, train: bool = False,
                      **backbone_kwargs) -> Dict[str, nn.Module]:
    """PoolFormer backbones of ``arch`` with identical random weights, one per variant name
    (a precision suffix, ``deploy:bf16``, is ignored here). A peer that is not installed is
    left out, and the reason appended to ``notes``. 'deploy' is refused in ``train``ing."""
    from .peers import PEERS, peer_backbone
    torch.manual_seed(seed)
    base = PoolFormer(arch, **backbone_kwargs)
    base.init_weights()
    with torch.no_grad():  # non-trivial norms and layer scales, so folding is really tested
        for name, param in base.named_parameters():
            if 'norm' in name or 'layer_scale' in name:
                param.add_(torch.randn_like(param) * 0.1)
    variants = {}
    for spec in names:
        name, _ = parse_variant(spec)
        if name not in VARIANTS + tuple(PEERS):
            raise ValueError(f"unknown variant '{name}'; choose from "
                             f"{', '.join(VARIANTS + tuple(PEERS))}")
        refuse_training_an_inference_form(name, train)
        if name == 'reference' or name in PEERS:
            refuse_reference_unlike(name, base)
        if name in PEERS:
            peer, reason = peer_backbone(name, base)
            if peer is None:
                if notes is not None:
                    notes.append(f'{spec} skipped: {reason}')
                continue
            variants[spec] = peer
            continue
        if name == 'reference':
            variants[spec] = ReferencePoolFormer.like(base)
            continue
        model = copy.deepcopy(base)
        if name == 'plain':
            model.set_fast_path(False)
        elif name == 'deploy':
            model.switch_to_deploy()
        elif name == 'cp':
            model.set_grad_checkpointing(True)
        variants[spec] = model
    return variants


def measure(variants: Dict[str, nn.Module],
            step: Union[Callable[[nn.Module], object], Dict[str, Callable]],
            train: bool = False, warmup: int = 2, repeat: int = 10,
            device: str = 'cpu', memory: bool = True) -> Dict[str, Measurement]:
    """Time ``step(model)`` for every variant (interleaved), then (``memory``) each one's peak
    memory. ``step`` may be a dict of one step per variant (their precisions, say)."""
    steps = step if isinstance(step, dict) else {name: step for name in variants}
    results = {name: Measurement(name) for name in variants}
    for name, model in variants.items():
        model.train(train)
        for _ in range(warmup):
            steps[name](model)
    for _ in range(repeat):
        for name, model in variants.items():
            _sync(device)
            start = time.perf_counter()
            steps[name](model)
            _sync(device)
            results[name].latency_ms.append((time.perf_counter() - start) * 1000)
    if not memory:
        return results
    if not device.startswith('cuda'):
        # after the timings, which should see the allocator users have; it stays set for the
        # rest of the process, so time nothing after this
        _map_large_blocks_separately()
    for name, model in variants.items():
        _release_scratch(model)  # counted in the peak: they are memory the step needs
        _release_memory()
        if device.startswith('cuda'):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            steps[name](model)
            results[name].peak_memory_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            with _PeakRss() as rss:
                steps[name](model)
            results[name].peak_memory_mb = rss.peak_mb
    return results


def backbone_step(inputs: torch.Tensor, train: bool, dtype: torch.dtype) -> Callable:
    """One inference (no grad) or training (forward + backward) call of a backbone."""
    device_type = inputs.device.type

    def step(model: nn.Module):
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            if not train:
                with torch.no_grad():
                    return model(inputs)
            outs = model(inputs)
        sum(o.float().mean() for o in outs).backward()
        model.zero_grad(set_to_none=True)

    return step


def record_differences(outputs: Dict[str, List[torch.Tensor]],
                       results: Dict[str, Measurement],
                       expected: Optional[List[torch.Tensor]] = None) -> None:
    """Each variant's largest absolute output difference from ``expected`` (default: the first
    variant's outputs), and that over the largest of them (nan when those are all zero);
    nothing without outputs."""
    if expected is None:
        expected = next(iter(outputs.values()), [])
    if not expected:
        return
    scale = max(o.abs().max().item() for o in expected)
    for name, outs in outputs.items():
        diff = max((a - b).abs().max().item() for a, b in zip(expected, outs))
        results[name].max_abs_diff = diff
        results[name].max_rel_diff = diff / scale if scale else float('nan')


def output_differences(variants: Dict[str, nn.Module], inputs: torch.Tensor,
                       results: Dict[str, Measurement], default_dtype: str = 'fp32') -> None:
    """Largest absolute and relative output difference of each variant (in its precision)
    from the first one's outputs in fp32. timm's features come before the output norms, so they
    are left out."""
    outputs, expected = {}, None
    for name, model in variants.items():
        if parse_variant(name)[0] == 'timm':
            continue
        dtype = PRECISIONS[parse_variant(name, default_dtype)[1]]
        model.eval()  # not chained: mmpretrain's train() returns None
        outputs[name] = [o.float() for o in backbone_step(inputs, False, dtype)(model)]
        if expected is None:
            expected = [o.float() for o in backbone_step(inputs, False, torch.float32)(model)]
    record_differences(outputs, results, expected)


# ---------------------------------------------------------------------------------- whole models
def model_variants(config: str, names: Sequence[str], seed: int = 0,
                   default_dtype: str = 'fp32', train: bool = False) -> Dict[str, nn.Module]:
    """The config's detector or segmentor with identical random weights, one per variant name:
    'reference' (the paper's model: its backbone, :class:`ReferencePoolFormer`, in the
    config's model with mmseg's heads in place of this project's, :func:`upstream_model`),
    'plain', 'fast', 'cp' (as :func:`segmentor_variants`), 'channels_last' (fast, with the
    neck and head channels-last: ``tools/train.py --channels-last``) and 'deploy' (inference
    only: what ``tools/test.py --deploy`` runs). A ``:bf16`` suffix in inference runs the model as
    ``--amp`` does (:func:`~poolformer_mm.engine.enable_inference_autocast`); in training the
    step applies it (:func:`model_training_step`)."""
    from ..deploy.fold import prepare_for_inference
    from ..deploy.precision import enable_inference_autocast, to_channels_last
    plain_names = [parse_variant(n)[0] for n in names]
    backbone_settings(config)  # a PoolFormer backbone, or a message saying it is not
    for name in plain_names:
        refuse_training_an_inference_form(name, train)
    base = segmentor_variants(config, ['fast'], seed)['fast']  # any mmdet or mmseg model
    variants = {}
    for spec, name in zip(names, plain_names):
        if name == 'reference':
            refuse_reference_unlike(name, base.backbone)
            model = upstream_model(config, seed)
            model.load_state_dict(base.state_dict())
            model.backbone = ReferencePoolFormer.like(base.backbone)
        elif name == 'deploy':
            model = copy.deepcopy(base)
            prepare_for_inference(model)
        elif name == 'cp':
            model = segmentor_variants(config, ['cp'], seed)['cp']
            model.load_state_dict(base.state_dict())
        elif name in ('plain', 'fast'):
            model = copy.deepcopy(base)
            model.backbone.set_fast_path(name == 'fast')
        elif name == 'channels_last':
            model = copy.deepcopy(base)
            to_channels_last(model)
        else:
            raise ValueError(f"whole models take the variants {', '.join(MODEL_VARIANTS)}, "
                             f"not '{name}'")
        dtype = parse_variant(spec, default_dtype)[1]
        if not train and dtype != 'fp32':
            enable_inference_autocast(model, 'cpu', PRECISIONS[dtype])
        variants[spec] = model.train(train)
    return variants


def model_inference_step(model: nn.Module, height: int, width: int, batch: int = 1,
                         mode: str = 'predict') -> Callable:
    """``model(inputs, data_samples, mode)`` without gradients on a reproducible random batch:
    'predict' includes the post-processing (NMS, resizing the logits), 'tensor' does not."""
    from .complexity import dummy_batch
    task = 'mmdet' if 'mmdet' in type(model).__module__ else 'mmseg'
    inputs, samples = dummy_batch(model, task, height, width)
    inputs, samples = inputs.expand(batch, -1, -1, -1).contiguous(), samples * batch

    def step(variant: nn.Module):
        with torch.no_grad():
            return variant(inputs, copy.deepcopy(samples), mode=mode)

    return step


def detection_batch(model: nn.Module, height: int, width: int, batch: int,
                    num_boxes: int = 8) -> dict:
    """A random batch of images with boxes, through ``model``'s data preprocessor
    (reproducible)."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    generator = torch.Generator().manual_seed(0)
    samples, images = [], []
    for _ in range(batch):
        sample = DetDataSample(metainfo=dict(img_shape=(height, width), ori_shape=(height, width),
                                             pad_shape=(height, width), scale_factor=(1., 1.)))
        corners = torch.rand(num_boxes, 2, 2, generator=generator) * torch.tensor(
            [width, height])
        low, high = corners.min(1).values, corners.max(1).values + 16
        num_classes = getattr(model.bbox_head if hasattr(model, 'bbox_head') else
                              model.roi_head.bbox_head, 'num_classes', 80)
        sample.gt_instances = InstanceData(
            bboxes=torch.cat([low, high], 1).clamp(max=torch.tensor([width, height] * 2)),
            labels=torch.randint(0, num_classes, (num_boxes, ), generator=generator))
        if hasattr(model, 'roi_head') and getattr(model.roi_head, 'with_mask', False):
            from mmdet.structures.mask import BitmapMasks
            masks = torch.zeros(num_boxes, height, width, dtype=torch.uint8)
            for j, (x1, y1, x2, y2) in enumerate(sample.gt_instances.bboxes.long().tolist()):
                masks[j, y1:y2, x1:x2] = 1
            sample.gt_instances.masks = BitmapMasks(masks.numpy(), height, width)
        samples.append(sample)
        images.append(torch.randint(0, 256, (3, height, width), dtype=torch.uint8,
                                    generator=generator))
    return model.data_preprocessor(dict(inputs=images, data_samples=samples), True)


def model_training_step(model: nn.Module, height: int, width: int, batch: int,
                        dtype: torch.dtype = torch.float32) -> Callable:
    """A training step (loss, backward) of an mmdet or mmseg model on a random labelled batch;
    a low-precision ``dtype`` autocasts the loss computation, as ``tools/train.py --amp``."""
    if 'mmdet' in type(model).__module__:
        data = detection_batch(model, height, width, batch)
    else:
        data = segmentation_batch(model, height, width, batch,
                                  model.decode_head.num_classes)
    device_type = data['inputs'].device.type

    def step(variant: nn.Module) -> float:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            losses = variant(data['inputs'], data['data_samples'], mode='loss')
        loss, _ = variant.parse_losses(losses)
        loss.backward()
        variant.zero_grad(set_to_none=True)
        return loss.item()

    return step


def segmentor_variants(config: str, names: Sequence[str], seed: int = 0) -> Dict[str, nn.Module]:
    """The config's segmentor with identical weights: 'plain', 'fast' or 'cp'.

    'cp' is the memory-saving setup of ``fpn_poolformer_s12_with_cp.py``: ``with_cp=True`` in
    the backbone and, where the config has mmseg's ``FPNHead``, :class:`LowMemoryFPNHead` (a
    detector: ``with_cp`` alone).
    """
    from .complexity import build_model_without_pretrained, load_config
    cfg = load_config(config)
    torch.manual_seed(seed)
    # as the Runner does in one process: SyncBN needs a process group
    base = revert_sync_batchnorm(build_model_without_pretrained(cfg))
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # init_weights logs one paragraph per parameter
    try:
        base.init_weights()
    finally:
        logger.setLevel(level)
    variants = {}
    for name in names:
        if name not in ('plain', 'fast', 'cp'):
            raise ValueError(f"whole models support the variants plain, fast and cp, not '{name}'")
        if name == 'cp':
            model = revert_sync_batchnorm(build_model_without_pretrained(memory_saving(cfg)))
            model.load_state_dict(base.state_dict())
        else:
            model = copy.deepcopy(base)
            model.backbone.set_fast_path(name != 'plain')
            model.backbone.set_grad_checkpointing(False)
        variants[name] = model
    return variants


# this project's heads and the upstream ones they compute the same outputs and loss as
UPSTREAM_HEADS = {'LowMemoryFPNHead': 'FPNHead', 'LowMemoryUPerHead': 'UPerHead',
                  'LowMemoryFCNHead': 'FCNHead'}


def upstream_model(config: str, seed: int = 0) -> nn.Module:
    """The config's model with mmseg's heads in place of this project's faster ones
    (:data:`UPSTREAM_HEADS`): the model the paper's code trains."""
    from .complexity import build_model_without_pretrained, load_config
    cfg = load_config(config)
    for key in ('decode_head', 'auxiliary_head'):
        heads = cfg.model.get(key)
        for head in (heads if isinstance(heads, list) else [heads] if heads else []):
            head.type = UPSTREAM_HEADS.get(head.type.split('.')[-1], head.type)
    torch.manual_seed(seed)
    return revert_sync_batchnorm(build_model_without_pretrained(cfg))


def memory_saving(cfg):
    """A copy of a detection or segmentation config with ``with_cp`` and, where it names mmseg's
    ``FPNHead``, the low-memory FPN loss."""
    cfg = copy.deepcopy(cfg)
    cfg.model.backbone.with_cp = True
    head = cfg.model.get('decode_head')  # detectors have none
    if head is not None and head.type in ('FPNHead', 'mmseg.FPNHead'):
        from ..models.decode_heads import LowMemoryFPNHead  # registers it
        cfg.model.decode_head.type = LowMemoryFPNHead.__name__
    return cfg


def segmentation_batch(model: nn.Module, height: int, width: int, batch: int,
                       num_classes: int) -> dict:
    """A random labelled batch, through ``model``'s data preprocessor (reproducible)."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(batch):
        sample = SegDataSample(metainfo=dict(img_shape=(height, width),
                                             ori_shape=(height, width),
                                             pad_shape=(height, width)))
        sample.gt_sem_seg = PixelData(data=torch.randint(
            0, num_classes, (1, height, width), generator=generator))
        samples.append(sample)
    images = [torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
              for _ in range(batch)]
    # mmseg's preprocessor pads training batches to the config's crop size (512x512 in the
    # ADE20K configs): the batch of this size is that crop
    preprocessor = model.data_preprocessor
    crop_size = getattr(preprocessor, 'size', None)
    if crop_size is not None:
        preprocessor.size = (height, width)
    try:
        return preprocessor(dict(inputs=images, data_samples=samples), True)
    finally:
        if crop_size is not None:
            preprocessor.size = crop_size


def loss_differences(variants: Dict[str, nn.Module],
                     step: Union[Callable[[nn.Module], float], Dict[str, Callable]],
                     results: Dict[str, Measurement],
                     baseline_step: Optional[Callable[[nn.Module], float]] = None) -> None:
    """Loss difference of each variant's training step (``step``, or its own of a dict)
    from the first variant's loss computed by ``baseline_step`` (default: its own step; same
    weights and random seed, so the head's dropout masks agree)."""
    steps = step if isinstance(step, dict) else {name: step for name in variants}
    losses = {}
    for name, model in variants.items():
        torch.manual_seed(0)
        losses[name] = steps[name](model)
    expected = next(iter(losses.values()))
    if baseline_step is not None:
        torch.manual_seed(0)
        expected = baseline_step(next(iter(variants.values())))
    for name, loss in losses.items():
        results[name].max_abs_diff = abs(loss - expected)
        results[name].max_rel_diff = abs(loss - expected) / max(abs(expected), 1e-12)


def format_results(results: Dict[str, Measurement], batch: int, baseline: str,
                   gmacs: Optional[float] = None,
                   matmul_rate: Union[None, float, Dict[str, float]] = None) -> str:
    """The results as a table. The speed-up is the ratio of the baseline's median to the
    variant's; '% matmul' is the rate reached (2 * MACs / median) as a share of the machine's
    matrix-multiply rate in the variant's precision (``matmul_rate`` by variant, or one rate)."""
    base = results.get(baseline)
    rates = matmul_rate if isinstance(matmul_rate, dict) else {
        name: matmul_rate for name in results}
    show_rate = bool(gmacs) and any(rates.values())
    header = (f'{"variant":18} {"median ms":>10} {"min-max ms":>16} {"img/s":>8} '
              f'{"speed-up":>9} {"peak MB":>9} {"max |diff|":>11} {"rel diff":>9}')
    if show_rate:
        header += f' {"% matmul":>9}'
    lines = [header]
    for name, m in results.items():
        speedup = f'{m.speedup_over(base):8.2f}x' if base else '        -'
        line = (f'{name:18} {m.median_ms:10.1f} {min(m.latency_ms):7.1f}-'
                f'{max(m.latency_ms):<8.1f} {batch * 1000 / m.median_ms:8.2f} {speedup} '
                f'{_megabytes(m.peak_memory_mb)} {_difference(m.max_abs_diff, 11)} '
                f'{_difference(m.max_rel_diff, 9)}')
        if show_rate and rates.get(name):
            achieved = 2 * gmacs * batch / (m.median_ms / 1000)
            line += f" {100 * achieved / rates[name]:8.0f}%"
        elif show_rate:
            line += f' {"-":>9}'
        lines.append(line)
    return '\n'.join(lines)


def _megabytes(value: float) -> str:
    return f'{"-":>9}' if math.isnan(value) else f'{value:9.0f}'


def _difference(value: float, width: int) -> str:
    """A difference for the table; '-' where none was computed (or it is undefined)."""
    return f'{"-":>{width}}' if math.isnan(value) else f'{value:{width}.2e}'


def machine_description(cpuinfo: str = '/proc/cpuinfo') -> str:
    """The CPU model and its SIMD / matrix flags, as ``lscpu`` shows them (Linux), so that a
    figure says what machine type it comes from."""
    import platform
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith('model name') and model in ('', platform.machine()):
                    model = line.split(':', 1)[1].strip()
                elif line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
                    break
    except OSError:
        pass
    shown = [flag for flag in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile')
             if flag in flags]
    return f"{model} ({' '.join(shown) or 'no AVX2/AVX-512/AMX flags'})"


def flat_float_outputs(outputs) -> List[torch.Tensor]:
    """Every floating tensor of nested tuples / lists, in order, in fp32."""
    if isinstance(outputs, torch.Tensor):
        return [outputs.float()] if outputs.is_floating_point() else []
    if isinstance(outputs, (tuple, list)):
        return [t for o in outputs for t in flat_float_outputs(o)]
    return []


def model_output_differences(variants: Dict[str, nn.Module], tensor_step: Callable,
                             results: Dict[str, Measurement],
                             baseline_fp32: Optional[nn.Module] = None) -> None:
    """Largest difference of each whole-model variant's network outputs (``mode='tensor'``:
    logits, head maps) from those of ``baseline_fp32`` (default: the first variant), relative to
    the largest."""
    outputs = {}
    for name, model in variants.items():
        model.eval()
        outputs[name] = flat_float_outputs(tensor_step(model))
    expected = (None if baseline_fp32 is None
                else flat_float_outputs(tensor_step(baseline_fp32.eval())))
    record_differences(outputs, results, expected)


# ---------------------------------------------------------------------------------- ONNX Runtime
class OnnxRuntimeModel(nn.Module):
    """An ONNX Runtime CPU session behind ``nn.Module``'s call, so that :func:`measure` times it
    like the PyTorch variants; returns the outputs as tensors."""

    def __init__(self, path: str, threads: Optional[int] = None):
        super().__init__()
        from ..deploy.onnx.verify import ort_session
        # no busy-waiting threads after a run, which would slow the PyTorch variant timed next
        self.session = ort_session(path, threads, spinning=False)

    def forward(self, inputs: torch.Tensor):
        outputs = self.session.run(None, {'input': inputs.numpy()})
        return tuple(torch.from_numpy(out) for out in outputs)


def onnx_variants(config: str, onnx_path: str, checkpoint: Optional[str] = None,
                  threads: Optional[int] = None) -> Dict[str, nn.Module]:
    """The exported model of ``onnx_path`` three ways, with the same weights and outputs:
    'eager' (the config's model as trained), 'deploy' (backbone folded, the CPU fast paths on)
    and 'onnxruntime' (the file). ``checkpoint`` should be the exported one; without it the
    weights are random and only the timings mean something."""
    from ..deploy.fold import switch_backbone_to_deploy
    from ..deploy.onnx.export import (
        MaskRCNNExport,
        SegmentorExport,
        SingleStageDetectorExport,
        build_model,
        model_digest,
    )
    from ..deploy.onnx.postprocess import session_deploy_info

    try:
        runtime = OnnxRuntimeModel(onnx_path, threads)
    except Exception as error:  # onnxruntime's own classes: InvalidProtobuf, Fail, ...
        raise ValueError(f"--onnx {onnx_path}: ONNX Runtime cannot load it ({error}); give a "
                         'file written by tools/deployment/pytorch2onnx.py') from error
    try:
        # checked against the graph: the timings below rely on its task, outputs and sizes
        runtime.info = info = session_deploy_info(runtime.session)
    except ValueError as error:
        raise ValueError(f'--onnx {onnx_path}: {error}') from error
    model = build_model(config, checkpoint)[0]
    builds = 'segmentation' if hasattr(model, 'decode_head') else 'detection'
    if info['task'] != builds:
        raise ValueError(f'--onnx {onnx_path} was exported from a {info["task"]} model, and '
                         f'{config} builds a {builds} model ({type(model).__name__}); give the '
                         'config it was exported from')
    # another model of the same task would run, and be compared with a different network
    exported_from = info.get('config', '?')
    if 'model_digest' in info:
        other = info['model_digest'] != model_digest(model)
        why = f'and {config} builds a model with other layers (arch, classes or heads)'
    else:  # exported before the digest was stored: its config's file name must match
        other = exported_from != osp.basename(config)
        why = f'not from {config}'
    if other:
        raise ValueError(f'--onnx {onnx_path} was exported from {exported_from}, {why}; give '
                         'the config it was exported from (and --checkpoint, the weights it '
                         'was exported with)')
    runtime.quantized = _is_quantized(onnx_path)
    deploy = copy.deepcopy(model)
    switch_backbone_to_deploy(deploy)
    if info['task'] == 'segmentation':
        wrap = lambda m: SegmentorExport(m, 'logits' in info['outputs'])  # noqa: E731
    elif 'masks' in info['outputs']:
        wrap = MaskRCNNExport
    else:
        wrap = SingleStageDetectorExport
    return dict(eager=wrap(model).eval(), deploy=wrap(deploy).eval(), onnxruntime=runtime)


def _is_quantized(onnx_path: str) -> bool:
    """Whether the graph computes in int8 (tools/deployment/quantize_onnx.py's QDQ form, or
    ONNX Runtime's other quantised operators)."""
    import onnx
    graph = onnx.load(onnx_path, load_external_data=False).graph
    return any(node.op_type in ('QuantizeLinear', 'QLinearConv', 'QLinearMatMul',
                                'ConvInteger', 'MatMulInteger') for node in graph.node)


def inference_step(inputs: torch.Tensor) -> Callable:
    """One no-grad call of a whole exported-model variant."""

    def step(model: nn.Module):
        with torch.no_grad():
            return model(inputs)

    return step


def float_output_differences(variants: Dict[str, nn.Module], inputs: torch.Tensor,
                             results: Dict[str, Measurement]) -> None:
    """Largest difference of each variant's float outputs (logits, head maps) from the first's;
    class-index outputs are left out."""
    step = inference_step(inputs)
    outputs = {}
    for name, model in variants.items():
        outputs[name] = flat_float_outputs(step(model))
        if not outputs[name]:  # class indices only: nothing to compare
            return
    record_differences(outputs, results)
