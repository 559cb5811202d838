"""Model analysis: parameter and MAC counts (``tools/analysis/get_flops.py``)."""
from .complexity import (
    DEFAULT_SHAPES,
    UNCOUNTED_NOTE,
    Complexity,
    backbone_complexity,
    build_backbone,
    build_model_without_pretrained,
    dummy_batch,
    format_table,
    image_shape,
    load_config,
    model_complexity,
    uncounted_summary,
)

__all__ = [
    'DEFAULT_SHAPES', 'UNCOUNTED_NOTE', 'Complexity', 'backbone_complexity', 'build_backbone',
    'build_model_without_pretrained', 'dummy_batch', 'format_table', 'image_shape',
    'load_config', 'model_complexity', 'uncounted_summary'
]
