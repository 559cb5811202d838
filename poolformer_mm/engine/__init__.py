"""Training and testing runs: the hooks, the bf16 optimizer wrapper, CPU distributed training
and the work dir's lock."""
from .distributed import closing_process_group, prepare_cpu_distributed
from .hooks import (
    ChannelsLastHook,
    CocoAnnotationCheckHook,
    CrashSafeCheckpointHook,
    DeployBackboneHook,
    FiniteLossHook,
    IgnoredLabelBatchHook,
    InferenceAutocastHook,
    RandomStateHook,
    SegPicturesHook,
    add_data_checks,
    get_random_state,
    set_random_state,
)
from .optim_wrapper import BF16AutocastOptimWrapper
from .work_dir import WorkDirLock, find_resumable_checkpoint, lock_work_dir, process_rank

__all__ = [
    'BF16AutocastOptimWrapper', 'ChannelsLastHook', 'CocoAnnotationCheckHook',
    'CrashSafeCheckpointHook', 'DeployBackboneHook', 'FiniteLossHook', 'IgnoredLabelBatchHook',
    'InferenceAutocastHook', 'RandomStateHook', 'SegPicturesHook', 'WorkDirLock',
    'add_data_checks', 'closing_process_group', 'find_resumable_checkpoint', 'get_random_state',
    'lock_work_dir', 'prepare_cpu_distributed', 'process_rank', 'set_random_state'
]
