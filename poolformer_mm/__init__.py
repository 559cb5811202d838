"""PoolFormer and MetaFormer backbones for OpenMMLab 2.x (mmdet 3.x, mmseg 1.x).

Importing the package registers the backbones in MMEngine's root ``MODELS`` registry, so
``custom_imports=dict(imports=['poolformer_mm'], allow_failed_imports=False)`` in any mmdet or
mmseg config makes ``dict(type='PoolFormer', arch='s12')`` available. It also makes checkpoint
loading safe (weights only, for every scheme mmengine knows) and checkpoint writing atomic, for the
whole process; :mod:`poolformer_mm.engine.safe_checkpoints` says what it changes and why.
"""
from .engine import register_safe_checkpoint_io
from .models import PoolFormer
from .version import __version__

register_safe_checkpoint_io()

__all__ = ['PoolFormer', '__version__']
