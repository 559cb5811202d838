"""StarReLU, the activation of the MetaFormer baselines' MLPs and separable convolutions."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class StarReLU(nn.Module):
    """``s * relu(x) ** 2 + b`` with a learnable scalar scale ``s`` and bias ``b``.

    The paper derives it from squared ReLU: the scale and bias re-centre and re-scale the output
    so its distribution matches that of the input, which squared ReLU alone does not.

    Args:
        scale_value (float): Initial ``s``. Default: 1.0.
        bias_value (float): Initial ``b``. Default: 0.0.
    """

    def __init__(self, scale_value: float = 1.0, bias_value: float = 0.0):
        super().__init__()
        # Shape [1] rather than a 0-d tensor: it is the shape in the public checkpoints.
        self.scale = nn.Parameter(torch.full((1, ), float(scale_value)))
        self.bias = nn.Parameter(torch.full((1, ), float(bias_value)))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.relu(x).square() + self.bias
