"""Mixed precision where mmengine's AmpOptimWrapper cannot go."""
from contextlib import contextmanager

import torch
import torch.nn as nn
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

from ..deploy.precision import fp32_for_mmcv_ops


@OPTIM_WRAPPERS.register_module()
class BF16AutocastOptimWrapper(OptimWrapper):
    """Runs the forward pass under ``torch.autocast('cpu', dtype=torch.bfloat16)``, where
    mmengine's ``AmpOptimWrapper`` asserts a GPU; bf16 needs no loss scaling."""

    @contextmanager
    def optim_context(self, model: nn.Module):
        # mmcv's CPU NMS and RoIAlign take fp32 only: proposals and RoI features stay fp32
        with super().optim_context(model), torch.autocast('cpu', dtype=torch.bfloat16), \
                fp32_for_mmcv_ops(model):
            yield
