"""PoolFormer and MetaFormer backbones for OpenMMLab 2.x (mmdet 3.x, mmseg 1.x).

Importing the package registers the backbones in MMEngine's root ``MODELS`` registry, so
``custom_imports=dict(imports=['poolformer_mm'], allow_failed_imports=False)`` in any mmdet or
mmseg config makes ``dict(type='PoolFormer', arch='s12')`` available. It also makes checkpoint
loading safe (weights only, for every scheme mmengine knows) and checkpoint writing atomic, for the
whole process; :mod:`poolformer_mm.checkpoint_io` says what it changes and why.
"""
# Before mmengine is first imported, which warns about pkg_resources at import time.
from .utils.known_warnings import ignore_known_warnings

ignore_known_warnings(run_time=False)

from .checkpoint_io import register_safe_checkpoint_io  # noqa: E402
from .models import PoolFormer  # noqa: E402
from .version import __version__  # noqa: E402

register_safe_checkpoint_io()

__all__ = ['PoolFormer', '__version__']
