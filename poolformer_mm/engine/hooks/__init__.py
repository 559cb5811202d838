"""Every hook of the project, registered in MMEngine's ``HOOKS`` registry on import."""
from .channels_last import ChannelsLastHook
from .checkpoint import CrashSafeCheckpointHook
from .data_checks import CocoAnnotationCheckHook, IgnoredLabelBatchHook, add_data_checks
from .deploy import DeployBackboneHook
from .finite_loss import FiniteLossHook
from .inference_autocast import InferenceAutocastHook
from .random_state import RandomStateHook, get_random_state, set_random_state
from .seg_pictures import SegPicturesHook

__all__ = [
    'ChannelsLastHook', 'CocoAnnotationCheckHook', 'CrashSafeCheckpointHook', 'DeployBackboneHook',
    'FiniteLossHook', 'IgnoredLabelBatchHook', 'InferenceAutocastHook', 'RandomStateHook',
    'SegPicturesHook', 'add_data_checks', 'get_random_state', 'set_random_state'
]
