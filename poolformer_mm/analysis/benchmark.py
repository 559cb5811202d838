"""Speed and memory of PoolFormer variants, measured side by side in one process.

Each variant is the same network with the same weights, run a different way:

* ``reference`` - :class:`ReferencePoolFormer`, the paper's block written out plainly (NCHW);
* ``plain``     - :class:`PoolFormer` after ``set_fast_path(False)`` (the same formulation);
* ``fast``      - :class:`PoolFormer`'s default token-layout path (trains; same gradients);
* ``deploy``    - after ``switch_to_deploy()``: norms and layer scales folded in (inference only);
* ``cp``        - the default path after ``set_grad_checkpointing(True)`` (``with_cp=True``); for
  a whole segmentor also the loss of :class:`LowMemoryFPNHead`.

Modes are switched only through these public methods of the backbone.

Timings interleave the variants (A B C A B C ...) so that a machine whose speed drifts treats
them alike; medians are reported, and a speed-up is the median over rounds of the ratio of the
two variants' times in the same round, which cancels slow drifts of a shared machine. Memory is
the peak resident set size above the level just before the measured call (CPU, sampled every
millisecond) or ``max_memory_allocated`` (CUDA).
"""
import copy
import ctypes
import gc
import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import psutil
import torch
import torch.nn as nn
from mmengine.logging import MMLogger
from mmengine.model import revert_sync_batchnorm

from ..models import PoolFormer
from .reference import ReferencePoolFormer

VARIANTS = ('reference', 'plain', 'fast', 'deploy', 'cp')


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
        """Median over rounds of ``baseline time / own time``, the rounds being interleaved."""
        return statistics.median(b / m for b, m in zip(baseline.latency_ms, self.latency_ms))

    def as_dict(self, batch: int) -> dict:
        out = asdict(self)
        out.update(median_ms=self.median_ms, min_ms=min(self.latency_ms),
                   max_ms=max(self.latency_ms), images_per_s=batch * 1000 / self.median_ms)
        return out


def matmul_gflops(device: str = 'cpu', size: int = 2048, repeat: int = 10) -> float:
    """The machine's large fp32 matrix-multiply rate (best of ``repeat``): the ceiling for
    networks whose MACs sit in 1x1 convolutions. The best run, because a shared machine's
    slow moments would otherwise lower the ceiling and flatter the fraction reached."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    times = []
    for _ in range(repeat + 1):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times[1:]) / 1e9


def _sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def _release_memory() -> None:
    gc.collect()
    try:  # give freed heap back to the OS so the next RSS baseline is honest (glibc only)
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except OSError:
        pass


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


def backbone_variants(arch: str, names: Sequence[str], seed: int = 0,
                      **backbone_kwargs) -> Dict[str, nn.Module]:
    """PoolFormer backbones of ``arch`` with identical random weights, one per variant."""
    torch.manual_seed(seed)
    base = PoolFormer(arch, **backbone_kwargs)
    base.init_weights()
    with torch.no_grad():  # non-trivial norms and layer scales, so folding is really tested
        for name, param in base.named_parameters():
            if 'norm' in name or 'layer_scale' in name:
                param.add_(torch.randn_like(param) * 0.1)
    variants = {}
    for name in names:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant '{name}'; choose from {', '.join(VARIANTS)}")
        if name == 'reference':
            variants[name] = ReferencePoolFormer.like(base)
            continue
        model = copy.deepcopy(base)
        if name == 'plain':
            model.set_fast_path(False)
        elif name == 'deploy':
            model.switch_to_deploy()
        elif name == 'cp':
            model.set_grad_checkpointing(True)
        variants[name] = model
    return variants


def measure(variants: Dict[str, nn.Module], step: Callable[[nn.Module], object],
            train: bool = False, warmup: int = 2, repeat: int = 10,
            device: str = 'cpu', memory: bool = True) -> Dict[str, Measurement]:
    """Time ``step(model)`` for every variant (interleaved), then (``memory``) each one's peak
    memory."""
    results = {name: Measurement(name) for name in variants}
    for model in variants.values():
        model.train(train)
        for _ in range(warmup):
            step(model)
    for _ in range(repeat):
        for name, model in variants.items():
            _sync(device)
            start = time.perf_counter()
            step(model)
            _sync(device)
            results[name].latency_ms.append((time.perf_counter() - start) * 1000)
    if not memory:
        return results
    if not device.startswith('cuda'):
        # after the timings, which should see the allocator users have; it stays set for the
        # rest of the process, so time nothing after this
        _map_large_blocks_separately()
    for name, model in variants.items():
        _release_memory()
        if device.startswith('cuda'):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(model)
            results[name].peak_memory_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            with _PeakRss() as rss:
                step(model)
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


def output_differences(variants: Dict[str, nn.Module], inputs: torch.Tensor,
                       results: Dict[str, Measurement]) -> None:
    """Largest absolute and relative output difference of each variant against the first."""
    models = list(variants.values())
    with torch.no_grad():
        expected = models[0].eval()(inputs)
        scale = max(o.abs().max().item() for o in expected)
        for name, model in variants.items():
            diff = max((a - b).abs().max().item() for a, b in zip(expected, model.eval()(inputs)))
            results[name].max_abs_diff, results[name].max_rel_diff = diff, diff / scale


def segmentor_variants(config: str, names: Sequence[str], seed: int = 0) -> Dict[str, nn.Module]:
    """The config's segmentor with identical weights: 'plain', 'fast' or 'cp'.

    'cp' is the memory-saving setup of ``fpn_poolformer_s12_with_cp.py``: ``with_cp=True`` in
    the backbone and, where the config has mmseg's ``FPNHead``, :class:`LowMemoryFPNHead`.
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


def memory_saving(cfg):
    """A copy of a segmentation config with ``with_cp`` and the low-memory FPN loss."""
    cfg = copy.deepcopy(cfg)
    cfg.model.backbone.with_cp = True
    if cfg.model.decode_head.type in ('FPNHead', 'mmseg.FPNHead'):
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
    return model.data_preprocessor(dict(inputs=images, data_samples=samples), True)


def segmentation_training_step(model: nn.Module, height: int, width: int, batch: int,
                               num_classes: int) -> Callable:
    """A training step (loss, backward) of an mmseg model on a random labelled batch."""
    data = segmentation_batch(model, height, width, batch, num_classes)

    def step(variant: nn.Module) -> float:
        losses = variant(data['inputs'], data['data_samples'], mode='loss')
        loss, _ = variant.parse_losses(losses)
        loss.backward()
        variant.zero_grad(set_to_none=True)
        return loss.item()

    return step


def loss_differences(variants: Dict[str, nn.Module], step: Callable[[nn.Module], float],
                     results: Dict[str, Measurement]) -> None:
    """Loss difference of each variant's training step against the first's (same weights and
    random seed, so the head's dropout masks agree)."""
    losses = {}
    for name, model in variants.items():
        torch.manual_seed(0)
        losses[name] = step(model)
    expected = next(iter(losses.values()))
    for name, loss in losses.items():
        results[name].max_abs_diff = abs(loss - expected)
        results[name].max_rel_diff = abs(loss - expected) / max(abs(expected), 1e-12)


def format_results(results: Dict[str, Measurement], batch: int, baseline: str,
                   gmacs: Optional[float] = None, matmul_rate: Optional[float] = None) -> str:
    base = results.get(baseline)
    header = (f'{"variant":10} {"median ms":>10} {"min-max ms":>16} {"img/s":>8} '
              f'{"speed-up":>9} {"peak MB":>9} {"max |diff|":>11} {"rel diff":>9}')
    if gmacs and matmul_rate:
        header += f' {"% matmul":>9}'
    lines = [header]
    for name, m in results.items():
        speedup = f'{m.speedup_over(base):8.2f}x' if base else '        -'
        line = (f'{name:10} {m.median_ms:10.1f} {min(m.latency_ms):7.1f}-{max(m.latency_ms):<8.1f}'
                f' {batch * 1000 / m.median_ms:8.2f} {speedup} {m.peak_memory_mb:9.0f} '
                f'{m.max_abs_diff:11.2e} {m.max_rel_diff:9.2e}')
        if gmacs and matmul_rate:
            achieved = 2 * gmacs * batch / (m.median_ms / 1000)
            line += f' {100 * achieved / matmul_rate:8.0f}%'
        lines.append(line)
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------- ONNX Runtime
class OnnxRuntimeModel(nn.Module):
    """An ONNX Runtime CPU session behind ``nn.Module``'s call, so that :func:`measure` times it
    like the PyTorch variants; returns the outputs as tensors."""

    def __init__(self, path: str, threads: Optional[int] = None):
        super().__init__()
        from ..deployment.verify import ort_session
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
    from ..deployment.export import SegmentorExport, SingleStageDetectorExport, build_model
    from ..deployment.postprocess import read_deploy_info
    from ..engine.deploy_hook import switch_backbone_to_deploy

    runtime = OnnxRuntimeModel(onnx_path, threads)
    info = read_deploy_info(runtime.session.get_modelmeta().custom_metadata_map)
    model = build_model(config, checkpoint)[0]
    deploy = copy.deepcopy(model)
    switch_backbone_to_deploy(deploy)
    if info['task'] == 'segmentation':
        wrap = lambda m: SegmentorExport(m, 'logits' in info['outputs'])  # noqa: E731
    else:
        wrap = SingleStageDetectorExport
    return dict(eager=wrap(model).eval(), deploy=wrap(deploy).eval(), onnxruntime=runtime)


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
    def floats(outputs):
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs, )
        return [o.float() for o in outputs if o.is_floating_point()]

    step = inference_step(inputs)
    expected = floats(step(next(iter(variants.values()))))
    if not expected:
        return
    scale = max(o.abs().max().item() for o in expected)
    for name, model in variants.items():
        diff = max((a - b).abs().max().item() for a, b in zip(expected, floats(step(model))))
        results[name].max_abs_diff, results[name].max_rel_diff = diff, diff / scale
