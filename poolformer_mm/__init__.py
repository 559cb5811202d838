"""PoolFormer and MetaFormer backbones for OpenMMLab 2.x (mmdet 3.x, mmseg 1.x).

Importing the package registers the backbones in MMEngine's root ``MODELS`` registry, so
``custom_imports=dict(imports=['poolformer_mm'], allow_failed_imports=False)`` in any mmdet or
mmseg config makes ``dict(type='PoolFormer', arch='s12')`` available. It also makes checkpoint
loading safe (weights only) and checkpoint writing atomic; see ``compat`` and ``engine``.
"""
from .compat import register_safe_checkpoint_globals
from .engine import register_safe_checkpoint_io
from .models import PoolFormer
from .version import __version__

register_safe_checkpoint_globals()
register_safe_checkpoint_io()

__all__ = ['PoolFormer', '__version__']
