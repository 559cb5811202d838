"""Warnings of the OpenMMLab stack that every run prints and no user can act on, as
``(message regex, module regex)``: only that message from that library is ignored."""
import warnings

# Raised while mmengine, mmdet and mmseg import pkg_resources (attributed to importlib for some)
IMPORT_TIME_WARNINGS = [
    (r'pkg_resources is deprecated as an API', r'(mmengine|mmdet|mmseg|importlib)(\.|$)'),
]
# Raised by mmseg while the runner builds the model, the data sets and the hooks.
RUN_TIME_WARNINGS = [
    (r'``build_loss`` would be deprecated soon', r'mmseg\.'),
    (r'Default ``avg_non_ignore`` is False', r'mmseg\.'),
    (r'`reduce_zero_label` will be deprecated', r'mmseg\.'),
    (r'The draw is False, it means that the hook for visualization', r'mmseg\.'),
    # torch's ONNX exporter leaves strided slices (NMS's top-k of a static detector) unfolded
    (r'Constant folding - Only steps=1 can be constant folded', r'torch\.onnx\.'),
]


def ignore_known_warnings(import_time: bool = True, run_time: bool = True) -> None:
    """Ignore the warnings listed above (and only those) from here on."""
    known = (IMPORT_TIME_WARNINGS if import_time else []) + (RUN_TIME_WARNINGS if run_time else [])
    for message, module in known:
        warnings.filterwarnings('ignore', message=message, category=UserWarning, module=module)
