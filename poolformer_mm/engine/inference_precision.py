"""Mixed precision at test time (``tools/test.py --amp``, ``tools/infer.py --amp``), and the
choice of precision that ``--amp`` makes in every tool (``tools/train.py`` too).

On a GPU this is fp16 autocast, as mmengine's test loop does it. On a CPU it is bf16 autocast,
which pays only where the CPU has bf16 units (AVX-512 BF16 or AMX): there the matrix products
run several times faster than in fp32. A CPU without them emulates bf16, many times slower
than fp32 (a large bf16 product ran at 1.2 GFLOP/s against fp32's 180 on an AVX2-only AMD EPYC),
so there a bare ``--amp`` says so and runs fp32 instead: it is never silently slower.
"""
import functools
import logging
from typing import Optional, Tuple

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

from ..errors import InvalidInputError
from .model_parts import unwrap_model

# the CPU flags (Linux /proc/cpuinfo names) of native bf16 arithmetic
BF16_CPU_FLAGS = ('avx512_bf16', 'amx_bf16')
NO_BF16_UNITS = (f"this CPU has no bf16 units (neither {' nor '.join(BF16_CPU_FLAGS)} in "
                 '/proc/cpuinfo)')


@functools.lru_cache(maxsize=None)
def cpu_bf16_units(cpuinfo: str = '/proc/cpuinfo') -> Tuple[str, ...]:
    """The bf16 flags this CPU reports, or () if it has none or does not say (not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
                    return tuple(flag for flag in BF16_CPU_FLAGS if flag in flags)
    except OSError:
        pass
    return ()


def amp_dtype(device: str, choice: str = 'auto') -> Tuple[Optional[torch.dtype], str]:
    """The autocast dtype of ``--amp CHOICE`` (training or inference) on ``device`` and a line
    saying what runs, or ``None`` and the reason it runs fp32.

    ``choice`` is 'auto' (fp16 on a GPU; bf16 on a CPU with bf16 units, fp32 on one without),
    'bf16' or 'fp16' (as asked; bf16 on a CPU without bf16 units is emulated, and slower than
    fp32, which the line says)."""
    if choice not in ('auto', 'bf16', 'fp16'):
        raise InvalidInputError(f"--amp takes auto, bf16 or fp16, not '{choice}'")
    on_gpu = str(device).startswith('cuda')
    if choice == 'fp16' and not on_gpu:
        raise InvalidInputError('--amp fp16 is for GPUs: CPU autocast runs bf16; use --amp or '
                                '--amp bf16')
    if on_gpu:
        name = 'bf16' if choice == 'bf16' else 'fp16'
        return getattr(torch, 'bfloat16' if name == 'bf16' else 'float16'), (
            f'mixed precision: {name} autocast on the GPU')
    units = cpu_bf16_units()
    if units:
        return torch.bfloat16, f"mixed precision: bf16 autocast (this CPU has {', '.join(units)})"
    missing = f'{NO_BF16_UNITS}: bf16 is emulated there, many times slower than fp32'
    if choice == 'bf16':
        return torch.bfloat16, f'mixed precision: bf16 autocast as asked, but {missing}'
    return None, f'--amp: {missing}; running in fp32 (--amp bf16 forces bf16)'


def log_amp_dtype(device: str, choice: str = 'auto') -> Optional[torch.dtype]:
    """:func:`amp_dtype`, with its line logged (a warning when it runs fp32)."""
    dtype, message = amp_dtype(device, choice)
    print_log(message, logger='current', level=logging.INFO if dtype else logging.WARNING)
    return dtype


def _to_float(outputs):
    """``outputs`` with every low-precision floating tensor (in tuples, lists, dicts) in fp32."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_to_float(o) for o in outputs)
    if isinstance(outputs, dict):
        return type(outputs)((k, _to_float(v)) for k, v in outputs.items())
    return outputs


def _autocast_forward(self, *args, **kwargs):
    device_type, dtype, float_outputs = self._inference_autocast
    with torch.autocast(device_type, dtype=dtype):
        outputs = type(self).forward(self, *args, **kwargs)
    return _to_float(outputs) if float_outputs else outputs


def _wrap(module, device_type: str, dtype: torch.dtype, float_outputs: bool) -> int:
    if module is None:
        return 0
    if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):  # cascade stages
        return sum(_wrap(m, device_type, dtype, float_outputs) for m in (
            module.values() if isinstance(module, torch.nn.ModuleDict) else module))
    module._inference_autocast = (device_type, dtype, float_outputs)
    # a bound method in the instance dict; deepcopy rebinds it to the copy
    module.forward = _autocast_forward.__get__(module)
    return 1


def enable_inference_autocast(model: torch.nn.Module, device_type: str,
                              dtype: torch.dtype) -> int:
    """Run the network parts of an mmdet or mmseg model under autocast, the rest in fp32.

    Autocast around a whole ``predict`` would hand mmcv's NMS and RoIAlign, which take fp32
    only, low-precision boxes and maps (``expected scalar type Float but found BFloat16``), and
    round the boxes, masks and score thresholds. So the forward passes of the backbone, neck and
    heads run under autocast: the heads' outputs come back in fp32 for the post-processing,
    and the neck's too where RoI extractors read them (two-stage detectors). Returns the number
    of modules changed.
    """
    model = unwrap_model(model)  # DDP, test-time augmentation
    roi_head = getattr(model, 'roi_head', None)
    changed = _wrap(getattr(model, 'backbone', None), device_type, dtype, False)
    changed += _wrap(getattr(model, 'neck', None), device_type, dtype, roi_head is not None)
    for name in ('decode_head', 'auxiliary_head', 'bbox_head', 'rpn_head'):
        changed += _wrap(getattr(model, name, None), device_type, dtype, True)
    if roi_head is not None:
        for name in ('bbox_head', 'mask_head'):
            changed += _wrap(getattr(roi_head, name, None), device_type, dtype, True)
    return changed


@HOOKS.register_module()
class InferenceAutocastHook(Hook):
    """``tools/test.py --amp``: the network parts of the model under autocast in the test loop
    (:func:`enable_inference_autocast`), in ``dtype`` (default: fp16 on a GPU, bf16 on a CPU).

    mmengine's ``TestLoop(fp16=True)`` would wrap the whole ``test_step``, post-processing
    included, which mmcv's fp32-only ops refuse on a CPU.
    """

    priority = 'LOW'  # after DeployBackboneHook, whose folding replaces modules

    def __init__(self, dtype: Optional[str] = None):
        self.dtype = dtype

    def before_test(self, runner) -> None:
        device = next(runner.model.parameters()).device
        dtype = getattr(torch, self.dtype) if self.dtype else amp_dtype(str(device))[0]
        if dtype is None:  # the reason was logged when the hook was configured
            return
        enable_inference_autocast(runner.model, device.type, dtype)
        name = {torch.bfloat16: 'bf16', torch.float16: 'fp16'}.get(dtype, str(dtype))
        runner.logger.info(f'mixed precision: {name} autocast in the backbone, neck and heads; '
                           'post-processing in fp32')
