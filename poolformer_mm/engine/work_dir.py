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
from typing import Iterable, List, Optional, Sequence

from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader

from ..checkpoint_io import is_remote_checkpoint
from ..errors import InvalidInputError, WorkDirInUseError

LOCK_NAME = '.train.lock'


class WorkDirLock:
    """An exclusive lock on ``<work_dir>/.train.lock`` for the life of the process.

    A POSIX record lock (``fcntl.lockf``): the kernel drops it when its process exits, however it
    exits (``kill -9`` included), and forked children such as data loader workers do not inherit
    it, so neither a dead job nor its orphaned workers block the next one. A second job on the
    same work dir stops at once instead of writing into the same ``iter_*.pth`` files.
    """

    def __init__(self, work_dir: str):
        self._fd = None
        self.path = osp.join(work_dir, LOCK_NAME)
        refuse_symlinks([self.path], "the work dir's lock")
        try:
            os.makedirs(work_dir, exist_ok=True)
            # O_NOFOLLOW: a link put there after the check above fails here instead of being
            # followed and its target truncated
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        except OSError as err:
            raise InvalidInputError(f"cannot write in the work dir '{work_dir}' ({err.strerror}): "
                                    'pass a writable --work-dir') from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            os.close(fd)
            raise InvalidInputError(
                f"'{self.path}' is not a plain file of its own (another kind of file, or a hard "
                "link to another file): training would overwrite it. Remove it and start again.")
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
        os.ftruncate(fd, 0)  # a file of our own (checked above), holding the last holder's PID
        os.pwrite(fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


# The variable each launcher sets to a process's global rank.
_RANK_VARIABLES = {'pytorch': 'RANK', 'slurm': 'SLURM_PROCID', 'mpi': 'OMPI_COMM_WORLD_RANK'}


def process_rank(launcher: str = 'none') -> int:
    """This process's global rank under ``launcher`` (the tools' ``--launcher``). Without a
    launcher a process is rank 0 of 1, whatever ``RANK`` or ``SLURM_PROCID`` say: those may be
    left over from a shell inside a job."""
    name = _RANK_VARIABLES.get(launcher)
    return int(os.environ.get(name, 0)) if name else 0


def lock_work_dir(work_dir: str, launcher: str = 'none',
                  checkpoint_dir: Optional[str] = None) -> List[WorkDirLock]:
    """Lock ``work_dir`` for this training, and ``checkpoint_dir`` (the checkpoint hook's
    ``<out_dir>/<work dir name>``) too when it is another folder: two trainings that would
    write the same checkpoints stop at the second. In a distributed job only rank 0 locks."""
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
    """Refuse to write at ``paths`` when one is a symbolic link: a folder received from someone
    else could point it at any file of the user's, which the write would replace."""
    for path in paths:
        if osp.islink(path):
            raise InvalidInputError(
                f"{what} '{path}' is a symbolic link (to '{os.readlink(path)}'): writing there "
                'would overwrite the file it points to. Remove the link, or write elsewhere.')


def refuse_symlinks_in(folder: str, what: str) -> None:
    """:func:`refuse_symlinks` for every entry of ``folder`` (the files a run may write there)."""
    if osp.isdir(folder):
        refuse_symlinks(sorted(osp.join(folder, n) for n in os.listdir(folder)), f'{what}:')


def refuse_links_in_work_dir(work_dir: str, config_file: Optional[str] = None) -> None:
    """Refuse a work dir where the runner would write through a link: mmengine writes its copy
    of the config, its logs and ``vis_data/`` in place (a checkpoint is written to a temporary
    file and renamed over its name, which replaces a link instead of following it). So no
    symbolic link down to ``<work_dir>/<timestamp>/vis_data/``, no hard-linked file but a
    checkpoint, and not the config itself where its copy goes."""
    if config_file is not None:
        copy = osp.join(work_dir, osp.basename(config_file))
        if osp.exists(copy) and osp.samefile(copy, config_file):
            raise InvalidInputError(
                f"the config '{config_file}' is in its own work dir, where the runner saves its "
                'copy of the config over it: move the config, or pass another --work-dir')
    stack = [(work_dir, 0)] if osp.isdir(work_dir) else []
    while stack:
        folder, depth = stack.pop()
        for entry in os.scandir(folder):
            if entry.is_symlink():
                refuse_symlinks([entry.path], '--work-dir:')
            elif entry.is_dir() and depth < 2:
                stack.append((entry.path, depth + 1))
            elif (entry.is_file() and not entry.name.endswith('.pth')
                  and entry.stat().st_nlink > 1):
                raise InvalidInputError(
                    f"--work-dir: '{entry.path}' is a hard link to another file: the run "
                    'writes there in place and would change that file too. Remove it, or '
                    'pass another --work-dir.')


def check_writable(folder: str, flag: str) -> None:
    """Say why files cannot be written in ``folder`` (or the folders that would hold it): a
    temporary file is made in its nearest existing ancestor; nothing is created for good."""
    existing = osp.abspath(folder)
    while not osp.lexists(existing):
        existing = osp.dirname(existing)
    try:
        if not osp.isdir(existing):
            raise NotADirectoryError(errno.ENOTDIR, f"'{existing}' is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise InvalidInputError(f"{flag} '{folder}': cannot write there ({err.strerror}); give "
                                'a folder you can write in') from None


def refuse_output_over_inputs(output: str, inputs: Iterable[str], flag: str) -> None:
    """Refuse an output path that is, or contains, one of ``inputs`` (files or folders): the
    tool would write its pictures or predictions over them."""
    out = osp.realpath(output)
    for path in inputs:
        if not path:
            continue
        inp = osp.realpath(path)
        if inp == out or inp.startswith(out.rstrip(os.sep) + os.sep):
            raise InvalidInputError(
                f"{flag} '{output}' is or contains the input '{path}': what is written there "
                f'could replace it. Give {flag} another path, apart from the inputs.')


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
