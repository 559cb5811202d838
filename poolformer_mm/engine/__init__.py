from .amp_choice import amp_dtype, log_amp_dtype
from .channels_last import ChannelsLastHook, to_channels_last
from .checkpoint_hook import CrashSafeCheckpointHook
from .deploy_hook import DeployBackboneHook, prepare_for_inference, switch_backbone_to_deploy
from .hooks import FiniteLossHook
from .inference_precision import InferenceAutocastHook, enable_inference_autocast
from .optim_wrapper import BF16AutocastOptimWrapper
from .random_state import RandomStateHook, get_random_state, set_random_state
from .seg_pictures_hook import SegPicturesHook
from .work_dir import WorkDirLock, find_resumable_checkpoint, lock_work_dir, process_rank

__all__ = [
    'BF16AutocastOptimWrapper', 'ChannelsLastHook', 'CrashSafeCheckpointHook',
    'to_channels_last',
    'DeployBackboneHook', 'FiniteLossHook', 'InferenceAutocastHook', 'enable_inference_autocast',
    'amp_dtype', 'log_amp_dtype', 'prepare_for_inference',
    'WorkDirLock', 'find_resumable_checkpoint', 'lock_work_dir',
    'process_rank',
    'switch_backbone_to_deploy',
    'RandomStateHook', 'SegPicturesHook', 'get_random_state', 'set_random_state'
]
