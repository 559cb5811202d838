"""Mixed precision where mmengine's AmpOptimWrapper cannot go."""
from contextlib import contextmanager

import torch
import torch.nn as nn
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

from ..deploy.precision import float_outputs


@OPTIM_WRAPPERS.register_module()
class BF16AutocastOptimWrapper(OptimWrapper):
    """Runs the forward pass under ``torch.autocast('cpu', dtype=torch.bfloat16)``.

    mmengine's ``AmpOptimWrapper`` asserts a CUDA/NPU/MLU/MUSA device, so ``--amp`` would die on a
    CPU-only machine. bf16 has fp32's exponent range, so no loss scaling is needed. On CPUs
    without bf16 units this is for correctness checks, not speed.
    """

    @contextmanager
    def optim_context(self, model: nn.Module):
        # mmcv's CPU NMS and RoIAlign take fp32 only: a two-stage detector's proposals (from its
        # RPN head) and the feature maps its RoI extractors read (from its neck) stay fp32
        detector = model.module if is_model_wrapper(model) else model
        fp32_parts = ([getattr(detector, 'neck', None), getattr(detector, 'rpn_head', None)]
                      if hasattr(detector, 'roi_head') else [])
        with super().optim_context(model), torch.autocast('cpu', dtype=torch.bfloat16), \
                float_outputs(*fp32_parts):
            yield
