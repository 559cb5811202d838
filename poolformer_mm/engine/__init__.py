from .deploy_hook import DeployBackboneHook, switch_backbone_to_deploy
from .hooks import FiniteLossHook
from .optim_wrapper import BF16AutocastOptimWrapper
from .safe_checkpoints import AtomicLocalBackend, load_from_local_weights_only, register_safe_checkpoint_io

__all__ = [
    'AtomicLocalBackend', 'BF16AutocastOptimWrapper', 'DeployBackboneHook', 'FiniteLossHook',
    'load_from_local_weights_only', 'register_safe_checkpoint_io', 'switch_backbone_to_deploy'
]
