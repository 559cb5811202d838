"""Former home of PoolFormer's token-layout and folded forms, which now live with the block and
stage (:mod:`poolformer_mm.models.layers.blocks`); kept only so that old imports work."""
from .layers.blocks import DeployPoolFormerBlock

__all__ = ['DeployPoolFormerBlock']
