"""A training's work dir: one job at a time, and the checkpoint to resume from."""
import errno
import fcntl
import glob
import logging
import os
import os.path as osp
import re
from typing import List, Optional, Sequence

from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader

from ..errors import InvalidInputError, WorkDirInUseError
from .safe_checkpoints import is_remote_checkpoint

LOCK_NAME = '.train.lock'


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
            if err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                # some network file systems (NFS without lockd, Lustre without flock) have none
                os.close(self._fd)
                self._fd = None
                print_log(f"cannot lock the work dir '{work_dir}' ({err.strerror}): nothing "
                          'stops a second training from writing into it at the same time',
                          logger='current', level=logging.WARNING)
                return
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(self._fd, 64, 0).decode(errors='replace').strip() or 'unknown'
            os.close(self._fd)
            raise WorkDirInUseError(
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


def _periodic_name(filename_tmpl: Optional[str]) -> re.Pattern:
    """The names CheckpointHook gives periodic checkpoints: its ``filename_tmpl`` with the step
    as a number, by default ``epoch_N.pth`` or ``iter_N.pth``."""
    if not filename_tmpl:
        return re.compile(r'^(?:epoch|iter)_(\d+)\.pth$')
    return re.compile('^' + re.escape(filename_tmpl).replace(r'\{\}', r'(\d+)') + '$')


def _candidates(work_dir: str, folders: Sequence[str], filename_tmpl: Optional[str]) -> List[str]:
    """Checkpoints to resume from, newest first: the periodic files of ``folders`` by decreasing
    step, after the file ``last_checkpoint`` names if that is not one of them."""
    name = _periodic_name(filename_tmpl)
    periodic = []
    for folder in dict.fromkeys(folders):
        for path in glob.glob(osp.join(glob.escape(folder), '*')):
            match = name.match(osp.basename(path))
            if match and osp.isfile(path):
                periodic.append((int(match[1]), osp.abspath(path)))
    found = [path for _, path in sorted(periodic, reverse=True)]
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        moved_here = osp.join(osp.abspath(work_dir), osp.basename(named))
        if named and osp.isfile(moved_here):
            named = moved_here  # the work dir was moved or copied since the pointer was written
        if named and (is_remote_checkpoint(named) or osp.isfile(named)):
            named = named if is_remote_checkpoint(named) else osp.abspath(named)
            if named not in found:
                found.insert(0, named)
    return found


def find_resumable_checkpoint(work_dir: str, out_dir: Optional[str] = None,
                              filename_tmpl: Optional[str] = None) -> Optional[str]:
    """The newest checkpoint of a training that loads, or None when there is none.

    mmengine reads only ``last_checkpoint``; when that file is missing or empty it starts again
    from iteration 1 and overwrites the checkpoints there. Here a missing or empty pointer falls
    back to the periodic checkpoints (named by the checkpoint hook's ``filename_tmpl``, in the
    work dir and in its ``out_dir``), and an unreadable (e.g. truncated) newest file falls back
    to the next one, with a warning naming both.
    """
    folders = [work_dir]
    if out_dir and not is_remote_checkpoint(out_dir):
        # CheckpointHook writes to <out_dir>/<last folder of the work dir>
        folders.append(osp.join(out_dir, osp.basename(osp.abspath(work_dir))))
    candidates = _candidates(work_dir, folders, filename_tmpl)
    unreadable = []
    for path in candidates:
        try:
            CheckpointLoader.load_checkpoint(path, map_location='cpu', logger='silent')
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
        raise InvalidInputError(
            f'no readable checkpoint to resume from in {work_dir}: {names} cannot '
            'be loaded. Remove them to start from scratch, or resume from another '
            'file with --resume PATH.')
    return None
