"""Where runs write: one training at a time in a work dir, never through a symbolic link,
never over an input; and the checkpoint to resume from."""
import errno
import fcntl
import glob
import logging
import os
import os.path as osp
import re
import stat
import tempfile
import time
from typing import Iterable, List, Optional

from mmengine.dist import master_only
from mmengine.logging import print_log
from mmengine.runner import Runner
from mmengine.runner.checkpoint import CheckpointLoader

from ..checkpoint_io import AtomicLocalBackend, is_remote_checkpoint
from ..utils.errors import InvalidInputError, WorkDirInUseError

LOCK_NAME = '.train.lock'


class WorkDirLock:
    """An exclusive POSIX record lock (``fcntl.lockf``) on ``<work_dir>/.train.lock``: the
    kernel drops it when its process exits (``kill -9`` included), and forked data loader
    workers do not inherit it."""

    def __init__(self, work_dir: str):
        self._fd = None
        self.path = osp.join(work_dir, LOCK_NAME)
        refuse_symlinks([self.path], "the work dir's lock")
        try:
            os.makedirs(work_dir, exist_ok=True)
            # O_NOFOLLOW: a link put there after the check above fails instead of being followed
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        except OSError as err:
            raise InvalidInputError(f"--work-dir '{work_dir}': cannot write there "
                                    f'({err.strerror}); give a folder you can write in') from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                # some network file systems (NFS without lockd, Lustre without flock) have none
                os.close(fd)
                print_log(f"cannot lock the work dir '{work_dir}' ({err.strerror}): nothing "
                          'stops a second training from writing into it at the same time',
                          logger='current', level=logging.WARNING)
                return
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 64, 0).decode(errors='replace').strip() or 'unknown'
            os.close(fd)
            raise WorkDirInUseError(
                f"work dir '{work_dir}' is in use by another training (process {holder}); two "
                'jobs there would overwrite each other\'s checkpoints. Wait for it to finish or '
                'stop it, or pass another --work-dir.') from None
        self._fd = fd
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:  # never into a hard link's twin
            os.ftruncate(fd, 0)  # the PID of the holder, for the message of a second job
            os.pwrite(fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def process_rank(launcher: str = 'none') -> int:
    """This process's global rank under ``launcher``; without one it is 0, whatever ``RANK``
    or ``SLURM_PROCID`` (left over from a shell inside a job) say."""
    name = {'pytorch': 'RANK', 'slurm': 'SLURM_PROCID', 'mpi': 'OMPI_COMM_WORLD_RANK'}.get(launcher)
    return int(os.environ.get(name, 0)) if name else 0


def lock_work_dir(work_dir: str, launcher: str = 'none',
                  checkpoint_dir: Optional[str] = None) -> List[WorkDirLock]:
    """On rank 0, lock ``work_dir`` and ``checkpoint_dir`` (when another folder) for this
    training: a second one that would write the same checkpoints stops."""
    if process_rank(launcher) != 0:
        return []
    folders = [work_dir] + ([checkpoint_dir] if checkpoint_dir else [])
    locks = []
    try:
        for folder in {osp.realpath(f): f for f in folders}.values():
            locks.append(WorkDirLock(folder))
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks


def refuse_symlinks(paths: Iterable[str], what: str) -> None:
    """Refuse to write at ``paths`` when one is a symbolic link (to any file of the user's)."""
    for path in paths:
        if osp.islink(path):
            raise InvalidInputError(
                f"{what} '{path}' is a symbolic link (to '{os.readlink(path)}'): writing there "
                'would overwrite the file it points to. Remove the link, or write elsewhere.')


def refuse_links_in(folder: str, what: str) -> None:
    """Refuse a folder holding symbolic or hard links that an in-place writer would write
    through."""
    if not osp.isdir(folder):
        return
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        refuse_symlinks([entry.path], f'{what}:')
        if entry.is_file() and entry.stat().st_nlink > 1:
            raise InvalidInputError(
                f"{what}: '{entry.path}' is a hard link to another file, which writing there "
                'would change too. Remove it, or write elsewhere.')


def refuse_premade_run_folders(work_dir: str) -> None:
    """Refuse a ``<work_dir>/<timestamp>/`` log folder named for a time to come: made by hand,
    maybe holding links for mmengine's in-place log writes to go through."""
    now = time.strftime('%Y%m%d_%H%M%S')
    for name in sorted(os.listdir(work_dir)) if osp.isdir(work_dir) else []:
        if re.fullmatch(r'\d{8}_\d{6}', name) and name >= now:
            raise InvalidInputError(
                f"--work-dir: '{osp.join(work_dir, name)}' is named for a time to come, so no "
                'run made it, and this run would log into it. Remove it.')


class ConfigCopyRunner(Runner):
    """mmengine's Runner, whose copy of the config in the work dir replaces the file of that name
    instead of writing into it (a link's target, or the config run itself, stays as it was)."""

    @master_only
    def dump_config(self) -> None:
        source = self.cfg.filename
        path = osp.join(self.work_dir, osp.basename(source) if source else
                        f'{self.timestamp}.py')
        if source and osp.isfile(path) and osp.samefile(path, source):
            return
        AtomicLocalBackend().put_text(self.cfg.pretty_text, path)


def checkpoint_dir(work_dir: str, out_dir: Optional[str]) -> Optional[str]:
    """``<out_dir>/<work dir name>`` (where the checkpoint hook writes) for a local ``out_dir``."""
    if not out_dir or is_remote_checkpoint(out_dir):
        return None
    return osp.join(out_dir, osp.basename(osp.abspath(work_dir)))


def nearest_existing(path: str) -> str:
    """``path`` made absolute, or its nearest ancestor that exists."""
    existing = osp.abspath(path)
    while not osp.lexists(existing):
        existing = osp.dirname(existing)
    return existing


def check_writable(folder: str, flag: str) -> None:
    """Say why files cannot be written in ``folder`` (or the folders that would hold it): a
    temporary file is made in its nearest existing ancestor; nothing is created for good."""
    existing = nearest_existing(folder)
    try:
        if not osp.isdir(existing):
            raise NotADirectoryError(errno.ENOTDIR, f"'{existing}' is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise InvalidInputError(f"{flag} '{folder}': cannot write there ({err.strerror}); give "
                                'a folder you can write in') from None


def refuse_output_over_inputs(output: str, inputs: Iterable[str], flag: str) -> None:
    """Refuse an output path that is, or contains, one of ``inputs`` (files or folders)."""
    out = osp.realpath(output)
    for path in inputs:
        if not path:
            continue
        inp = osp.realpath(path)
        if inp == out or inp.startswith(out.rstrip(os.sep) + os.sep):
            raise InvalidInputError(
                f"{flag} '{output}' is or contains the input '{path}': what is written there "
                f'could replace it. Give {flag} another path, apart from the inputs.')


def has_training_state(checkpoint) -> bool:
    """Whether ``checkpoint`` holds what mmengine's resume reads (meta, message hub)."""
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    return isinstance(meta, dict) and {'epoch', 'iter'} <= set(meta) and 'message_hub' in checkpoint


def find_resumable_checkpoint(work_dir: str, out_dir: Optional[str] = None,
                              filename_tmpl: Optional[str] = None) -> Optional[str]:
    """The newest checkpoint of a training that loads, or None when there is none.

    Unlike mmengine (``last_checkpoint`` only), the periodic checkpoints (``filename_tmpl``, in
    the work dir and ``out_dir``) count too, and an unreadable newest file falls back to the next
    one, with a warning naming both.
    """
    # newest first: the file last_checkpoint names, then the periodic ones by decreasing step
    name = re.compile('^' + re.escape(filename_tmpl).replace(r'\{\}', r'(\d+)') + '$'
                      if filename_tmpl else r'^(?:epoch|iter)_(\d+)\.pth$')
    periodic = []
    for folder in dict.fromkeys([work_dir, checkpoint_dir(work_dir, out_dir) or work_dir]):
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
    unreadable = []  # why each newer one cannot be resumed from
    for path in found:
        try:
            state = CheckpointLoader.load_checkpoint(path, map_location='cpu', logger='silent')
        except ValueError as err:
            unreadable.append(str(err))
            continue
        if not has_training_state(state):
            unreadable.append(f"'{path}' holds weights but no training state")
            continue
        if unreadable:
            print_log(f"{'; '.join(unreadable)}. Resuming from the newest readable checkpoint "
                      f"'{path}' instead.", logger='current', level=logging.WARNING)
        return path
    if unreadable:
        raise InvalidInputError(
            f'no checkpoint to resume from in {work_dir}: {"; ".join(unreadable)}. Remove them '
            'to start from scratch, or resume from another file with --resume PATH.')
    return None
