"""Mixed precision in the test loop (``tools/test.py --amp``): autocast in the backbone, neck
and heads, post-processing in fp32."""
from typing import Optional

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ...deploy.precision import amp_dtype, enable_inference_autocast


@HOOKS.register_module()
class InferenceAutocastHook(Hook):
    """The network parts of the model under autocast in ``dtype`` (default: fp16 on a GPU, bf16
    on a CPU) in the test loop; unlike ``TestLoop(fp16=True)``, post-processing stays fp32."""

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
