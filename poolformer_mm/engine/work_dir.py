"""A training's work dir: one job at a time, and the checkpoint to resume from."""
import errno
import fcntl
import glob
import logging
import os
import os.path as osp
import re
from typing import List, Optional

from mmengine.logging import print_log

from .safe_checkpoints import load_from_local_weights_only

LOCK_NAME = '.train.lock'
# The names CheckpointHook gives periodic checkpoints by default (filename_tmpl).
_PERIODIC = re.compile(r'^(epoch|iter)_(\d+)\.pth$')


class WorkDirLock:
    """An exclusive lock on ``<work_dir>/.train.lock`` for the life of the process.

    A POSIX record lock (``fcntl.lockf``): the kernel drops it when its process exits, however it
    exits (``kill -9`` included), and forked children such as data loader workers do not inherit
    it, so neither a dead job nor its orphaned workers block the next one. A second job on the
    same work dir stops at once instead of writing into the same ``iter_*.pth`` files.
    """

    def __init__(self, work_dir: str):
        os.makedirs(work_dir, exist_ok=True)
        self.path = osp.join(work_dir, LOCK_NAME)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(self._fd, 64, 0).decode(errors='replace').strip() or 'unknown'
            os.close(self._fd)
            raise RuntimeError(
                f"work dir '{work_dir}' is in use by another training (process {holder}); two "
                'jobs there would overwrite each other\'s checkpoints. Wait for it to finish or '
                'stop it, or pass another --work-dir.') from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def _global_rank() -> int:
    for name in ('RANK', 'SLURM_PROCID', 'OMPI_COMM_WORLD_RANK'):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def lock_work_dir(work_dir: str) -> Optional[WorkDirLock]:
    """Lock ``work_dir`` for this training; in a distributed job only the first process does."""
    return WorkDirLock(work_dir) if _global_rank() == 0 else None


def _candidates(work_dir: str) -> List[str]:
    """Checkpoints of ``work_dir``, newest first: the periodic ``epoch_N.pth`` / ``iter_N.pth``
    files by decreasing N, after the file ``last_checkpoint`` names if that is not one of them
    (a custom ``filename_tmpl`` or ``out_dir``)."""
    periodic = []
    for path in glob.glob(osp.join(glob.escape(work_dir), '*.pth')):
        match = _PERIODIC.match(osp.basename(path))
        if match:
            periodic.append((int(match[2]), osp.abspath(path)))
    found = [path for _, path in sorted(periodic, reverse=True)]
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        moved_here = osp.join(osp.abspath(work_dir), osp.basename(named))
        if named and osp.isfile(moved_here):
            named = moved_here  # the work dir was moved or copied since the pointer was written
        if named and osp.isfile(named) and osp.abspath(named) not in found:
            found.insert(0, osp.abspath(named))
    return found


def find_resumable_checkpoint(work_dir: str) -> Optional[str]:
    """The newest checkpoint of ``work_dir`` that loads, or None when there is none.

    mmengine reads only ``last_checkpoint``; when that file is missing or empty it starts again
    from iteration 1 and overwrites the checkpoints there. Here a missing or empty pointer falls
    back to the periodic checkpoints, and an unreadable (e.g. truncated) newest file falls back
    to the next one, with a warning naming both.
    """
    unreadable = []
    for path in _candidates(work_dir):
        try:
            load_from_local_weights_only(path, map_location='cpu')
        except ValueError as err:
            unreadable.append((path, err))
            continue
        if unreadable:
            reasons = '; '.join(str(err) for _, err in unreadable)
            print_log(f"{reasons}. Resuming from the newest readable checkpoint '{path}' instead.",
                      logger='current', level=logging.WARNING)
        return path
    if unreadable:
        names = ', '.join(f"'{p}'" for p, _ in unreadable)
        raise ValueError(f'no readable checkpoint to resume from in {work_dir}: {names} cannot '
                         'be loaded. Remove them to start from scratch, or resume from another '
                         'file with --resume PATH.')
    return None
