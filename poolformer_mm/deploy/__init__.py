"""A trained model made ready to run: folded for inference (:func:`prepare_for_inference`; the
blocks' own ``switch_to_deploy`` and the folded necks here), in mixed precision and channels-last
(:mod:`.precision`); ONNX export in :mod:`.onnx`, which needs the optional ``deploy`` extra.
"""
from .fold import InferenceForm, prepare_for_inference, switch_backbone_to_deploy
from .precision import (
    amp_dtype,
    cpu_bf16_units,
    enable_inference_autocast,
    log_amp_dtype,
    to_channels_last,
)

__all__ = [
    'InferenceForm', 'amp_dtype', 'cpu_bf16_units', 'enable_inference_autocast', 'log_amp_dtype',
    'prepare_for_inference', 'switch_backbone_to_deploy', 'to_channels_last'
]
