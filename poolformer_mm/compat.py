"""Small, explicit shims for the stack versions we support. Each names the problem it works around.

torch >= 2.6 loads checkpoints with ``weights_only=True`` by default (pytorch/pytorch#101453), and
mmengine 0.10.7's Runner checkpoints pickle more than tensors: the message hub's
``HistoryBuffer`` objects, numpy arrays, dtypes and scalars. Without an allow-list, ``--resume`` and
``tools/test.py`` fail with "Weights only load failed" (open-mmlab/mmengine#1597). We allow exactly
those globals instead of switching the safety check off, so a malicious checkpoint still cannot
run code.
"""
import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer


def _history_buffer_getattr(obj, name):
    """Stand-in for ``builtins.getattr`` while unpickling.

    ``HistoryBuffer`` keeps its statistics methods (``HistoryBuffer.min`` ...) in a dict, and pickle
    stores such a method as ``getattr(HistoryBuffer, 'min')``. Only that lookup is allowed here; a
    generic ``getattr`` would let a crafted pickle reach arbitrary attributes.
    """
    if obj is HistoryBuffer and callable(vars(HistoryBuffer).get(name)):
        return getattr(obj, name)
    raise AttributeError(f'checkpoint asks for attribute {name!r} of {obj!r}; only methods of '
                         'mmengine HistoryBuffer may be looked up while loading a checkpoint')


def _numpy_globals() -> list:
    core = getattr(np, '_core', None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    found = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    # Every concrete dtype class (Float64DType, Int64DType, BoolDType, ...): a message hub can hold
    # scalars of any of them, and they are plain type objects that run no code.
    dtype_classes = getattr(np, 'dtypes', None)
    if dtype_classes is not None:
        found += [getattr(dtype_classes, n) for n in dir(dtype_classes) if n.endswith('DType')]
    return found


def mmengine_checkpoint_globals() -> list:
    """The globals an mmengine 0.10.7 Runner checkpoint needs under ``weights_only=True``."""
    return [HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr')] + _numpy_globals()


def register_safe_checkpoint_globals() -> None:
    """Allow-list :func:`mmengine_checkpoint_globals` for every ``torch.load`` in the process.

    Process-wide because mmengine's own Runner calls ``torch.load`` (resume, ``load_from``) and we
    do not patch mmengine.
    """
    torch.serialization.add_safe_globals(mmengine_checkpoint_globals())
