"""PoolFormer and MetaFormer backbones for OpenMMLab 2.x (mmdet 3.x, mmseg 1.x).

Importing the package registers the backbones in MMEngine's root ``MODELS`` registry, so
``custom_imports=dict(imports=['poolformer_mm'], allow_failed_imports=False)`` in any mmdet or
mmseg config makes ``dict(type='PoolFormer', arch='s12')`` available.
"""
from .compat import register_safe_checkpoint_globals
from .version import __version__

register_safe_checkpoint_globals()

from . import engine  # noqa: E402,F401  (registers BF16AutocastOptimWrapper)
from .models import PoolFormer  # noqa: E402  (registers the backbone)

__all__ = ['PoolFormer', '__version__']
