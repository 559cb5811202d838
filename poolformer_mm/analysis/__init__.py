"""Model analysis: parameter and MAC counts (``tools/analysis/get_flops.py``); loss and metric
curves of training runs (``tools/analysis/plot_logs.py``)."""
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
from .log_curves import (
    Curve,
    TrainingLog,
    extract_curves,
    find_json_log,
    plot_curves,
    plot_work_dirs,
    read_json_log,
)

__all__ = [
    'DEFAULT_SHAPES', 'UNCOUNTED_NOTE', 'Complexity', 'backbone_complexity', 'build_backbone',
    'build_model_without_pretrained', 'dummy_batch', 'format_table', 'image_shape',
    'load_config', 'model_complexity', 'uncounted_summary', 'Curve', 'TrainingLog',
    'extract_curves', 'find_json_log', 'plot_curves', 'plot_work_dirs', 'read_json_log'
]
