"""Checkpoint files that are safe to load and never half-written.

Loading: mmengine 0.10.7 reads local checkpoints with a bare ``torch.load``, which unpickles
arbitrary code on torch < 2.6 (the weights-only default came with 2.6) and gives a raw pickle
error for a file that is not a checkpoint. We register a loader for local paths that always uses
``weights_only=True`` (with the allow-list from :mod:`poolformer_mm.compat`) and says what is
wrong with a refused file.

Writing: mmengine's local file backend writes checkpoints in place, so a job killed during the
write leaves a truncated ``epoch_N.pth``. Our backend writes to a temporary file in the same
folder and renames it over the target, which is atomic on POSIX file systems: a reader sees the
old file or the complete new one.
"""
import os
import os.path as osp
import pickle
import tempfile
from pathlib import Path
from typing import Union

import torch
from mmengine.fileio.backends import LocalBackend, register_backend
from mmengine.runner.checkpoint import CheckpointLoader


def load_from_local_weights_only(filename: str, map_location=None):
    # (mmengine logs "Loads checkpoint by <name minus 'load_from_'> backend")
    """``torch.load`` with ``weights_only=True`` and one clear error for a file it refuses."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"checkpoint '{filename}' not found")
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refused to load '{filename}': its pickle asks for something other than tensors and "
            'the allow-listed mmengine objects, so it could run code when loaded (or it is not a '
            'checkpoint). Only load it if you trust its source, and convert it to a plain '
            f'state dict. Loader said: {str(err).splitlines()[0]}') from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"'{filename}' is not a readable PyTorch checkpoint (truncated, or "
                         f'another kind of file): {str(err).splitlines()[0]}') from None


class AtomicLocalBackend(LocalBackend):
    """mmengine's local backend, but ``put``/``put_text`` replace the target atomically."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        self._replace(filepath, obj)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = 'utf-8') -> None:
        self._replace(filepath, obj.encode(encoding))

    @staticmethod
    def _replace(filepath: Union[str, Path], data: bytes) -> None:
        folder = osp.dirname(osp.abspath(filepath))
        os.makedirs(folder, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(dir=folder, prefix='.' + osp.basename(filepath),
                                        suffix='.tmp')
        try:
            with os.fdopen(fd, 'wb') as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_path, filepath)
        except BaseException:
            if osp.exists(tmp_path):
                os.remove(tmp_path)
            raise


def register_safe_checkpoint_io() -> None:
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local_weights_only, force=True)
    register_backend('local', AtomicLocalBackend, force=True, prefixes='')
