"""Mixed precision at test time (``tools/test.py --amp``, ``tools/infer.py --amp``): autocast
in the backbone, neck and heads, post-processing in fp32. Which precision ``--amp`` runs is
:mod:`.amp_choice`'s decision.
"""
from typing import Optional

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from .amp_choice import amp_dtype
from .model_parts import unwrap_model


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
