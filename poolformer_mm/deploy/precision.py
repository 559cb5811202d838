"""The precision ``--amp`` runs in every tool, autocast at test time, and channels-last necks
and heads. ``--amp`` is fp16 on a GPU; on a CPU, bf16 where it has bf16 units (AVX-512 BF16 or
AMX): a CPU without them emulates bf16, about 140x slower than fp32 in matrix products, so there
a bare ``--amp`` says so and runs fp32 (``--amp bf16`` forces bf16). oneDNN converts the layout at
every call when only one of a convolution's input and weight is channels-last.
"""
import functools
import logging
from contextlib import contextmanager
from typing import Optional, Tuple

import torch
from mmengine.logging import print_log

from ..utils.cpu_flags import BF16_CPU_FLAGS, cpu_flags
from ..utils.errors import InvalidInputError
from ..utils.model_parts import find_backbone, unwrap_model

NO_BF16_UNITS = (f"this CPU has no bf16 units (neither {' nor '.join(BF16_CPU_FLAGS)} in "
                 '/proc/cpuinfo)')
UNKNOWN_BF16_UNITS = ('cannot tell whether this CPU has bf16 units (no x86 flags in '
                      '/proc/cpuinfo: not Linux, or not x86)')
# what emulation costs, as measured (the large products of tools/analysis/benchmark.py)
EMULATED_BF16_COST = 'slower than fp32 (about 140x in matrix products on an AVX2-only CPU)'


@functools.lru_cache(maxsize=None)
def cpu_bf16_units(cpuinfo: str = '/proc/cpuinfo') -> Optional[Tuple[str, ...]]:
    """The bf16 flags this CPU reports: () if it has none, None if it lists no x86 flags (not
    Linux, or not x86: then nobody here can tell)."""
    flags = cpu_flags(cpuinfo)
    return None if flags is None else tuple(flag for flag in BF16_CPU_FLAGS if flag in flags)


AMP_CHOICES = ('auto', 'bf16', 'fp16')


def amp_dtype(device: str, choice: str = 'auto') -> Tuple[Optional[torch.dtype], str]:
    """The autocast dtype of ``--amp CHOICE`` on ``device`` and a line saying what runs, or
    ``None`` and why it runs fp32. 'auto': fp16 on a GPU, bf16 on a CPU with bf16 units, fp32 on
    one without; 'bf16' and 'fp16' as asked (bf16 on a GPU without bf16 support is refused)."""
    if choice not in AMP_CHOICES:
        raise InvalidInputError(f"--amp takes auto, bf16 or fp16, not '{choice}'")
    on_gpu = str(device).startswith('cuda')
    if choice == 'fp16' and not on_gpu:
        raise InvalidInputError('--amp fp16 is for GPUs: CPU autocast runs bf16; use --amp or '
                                '--amp bf16')
    if on_gpu:
        if (choice == 'bf16' and torch.cuda.is_available()
                and not torch.cuda.is_bf16_supported(including_emulation=False)):
            raise InvalidInputError('--amp bf16: this GPU has no bf16 arithmetic; use --amp '
                                    '(fp16)')
        dtype, name = (torch.bfloat16, 'bf16') if choice == 'bf16' else (torch.float16, 'fp16')
        return dtype, f'mixed precision: {name} autocast on the GPU'
    units = cpu_bf16_units()
    if units:
        return torch.bfloat16, f"mixed precision: bf16 autocast (this CPU has {', '.join(units)})"
    missing = (UNKNOWN_BF16_UNITS if units is None else
               f'{NO_BF16_UNITS}: bf16 is emulated here, {EMULATED_BF16_COST}')
    if choice == 'bf16':
        return torch.bfloat16, f'mixed precision: bf16 autocast as asked, but {missing}'
    return None, f'--amp: {missing}; running in fp32 (--amp bf16 forces bf16)'


def log_amp_dtype(device: str, choice: str = 'auto') -> Optional[torch.dtype]:
    """:func:`amp_dtype`, with its line logged: a warning when it runs fp32 or bf16 on a CPU
    that may not have the units."""
    dtype, message = amp_dtype(device, choice)
    doubtful = dtype is None or (not str(device).startswith('cuda') and not cpu_bf16_units())
    print_log(message, logger='current', level=logging.WARNING if doubtful else logging.INFO)
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


@contextmanager
def fp32_for_mmcv_ops(model: torch.nn.Module):
    """Within the block, under a whole-forward autocast, mmcv's CPU ops that take fp32 only get
    fp32: the outputs of RPN heads (their proposals go through NMS) and the feature maps RoI
    extractors read (RoIAlign)."""
    handles = []
    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith('RPNHead'):
            handles.append(module.register_forward_hook(lambda _m, _args, out: _to_float(out)))
        elif kind.endswith('RoIExtractor'):
            handles.append(module.register_forward_pre_hook(lambda _m, args: _to_float(args)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
    """Run the forward passes of an mmdet or mmseg model's backbone, neck and heads under
    autocast, and the post-processing in fp32 (mmcv's NMS and RoIAlign take fp32 only, and boxes,
    masks and thresholds would be rounded): the heads' outputs come back in fp32, and the neck's
    too where RoI extractors read them. Returns the number of modules changed."""
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


def _contiguous_feature_maps(module, args):
    feats, *rest = args
    return (tuple(feat.contiguous() for feat in feats), *rest)


def to_channels_last(model: torch.nn.Module) -> None:
    """Convolution weights and the backbone's outputs channels-last; RoI extractors still get
    contiguous maps, because mmcv 2.1's CPU RoIAlign ignores strides and would misread them."""
    backbone = find_backbone(model)
    if hasattr(backbone, 'set_channels_last_outputs'):
        backbone.set_channels_last_outputs(True)
    # converts the 4-d weights (convolutions) and leaves everything else as it is
    model.to(memory_format=torch.channels_last)
    for module in model.modules():
        if type(module).__name__.endswith('RoIExtractor'):
            module.register_forward_pre_hook(_contiguous_feature_maps)
