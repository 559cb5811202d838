"""No checkpoint is lost around a kill: deletion after the new file is in place, resume from the
newest readable file, stale temporaries removed, one training per work dir, ordinary file modes."""
import contextlib
import glob
import logging
import os
import os.path as osp
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.logging import MMLogger

from poolformer_mm.checkpoint_io import AtomicLocalBackend
from poolformer_mm.cli.train_test import run_training
from poolformer_mm.datasets import make_toy_ade
from poolformer_mm.engine import WorkDirLock, find_resumable_checkpoint

REPO = Path(__file__).resolve().parents[2]
TOY_FPN = 'configs/segmentation/toy/fpn_poolformer_s12_toy.py'


@pytest.fixture(scope='module')
def toy_ade(tmp_path_factory):
    return make_toy_ade(str(tmp_path_factory.mktemp('data') / 'ade'), num_train=4, num_val=2)


def _argv(work_dir, toy_ade, max_iters, *options, interval=4):
    return [TOY_FPN, '--work-dir', str(work_dir), '--data-root', str(toy_ade), '--cfg-options',
            f'train_cfg.max_iters={max_iters}', f'train_cfg.val_interval={max_iters + 1}',
            f'default_hooks.checkpoint.interval={interval}', 'param_scheduler=[]',
            'train_dataloader.batch_size=2',
            *options]


def _resumed_at(work_dir):
    """The iteration the newest run's log says it resumed at (None: it did not resume)."""
    log = sorted(glob.glob(osp.join(work_dir, '*', '*.log')))[-1]
    with open(log) as f:
        for line in f:
            if 'resumed epoch:' in line:
                return int(line.rsplit('iter:', 1)[1].split()[0].strip(','))
    return None


@pytest.fixture(scope='module')
def trained_to_8(tmp_path_factory, toy_ade):
    """A work dir with iter_4.pth, iter_8.pth and last_checkpoint, as a run leaves it."""
    work_dir = tmp_path_factory.mktemp('trained_to_8')
    run_training(_argv(work_dir, toy_ade, 8))
    return work_dir


def _copy_work_dir(source, target):
    target.mkdir()
    for name in ('iter_4.pth', 'iter_8.pth', 'last_checkpoint'):
        (target / name).write_bytes((source / name).read_bytes())
    return target


@contextlib.contextmanager
def logged_warnings():
    """The warnings logged through mmengine's current logger inside the block."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


@pytest.mark.slow
@pytest.mark.parametrize('pointer', ['missing', 'empty'])
def test_resume_without_a_usable_last_checkpoint_file_takes_the_newest_checkpoint(
        tmp_path, toy_ade, trained_to_8, pointer):
    work_dir = _copy_work_dir(trained_to_8, tmp_path / 'work')
    if pointer == 'missing':
        (work_dir / 'last_checkpoint').unlink()
    else:
        (work_dir / 'last_checkpoint').write_text('')
    iter_4 = (work_dir / 'iter_4.pth').read_bytes()
    run_training(_argv(work_dir, toy_ade, 10, interval=10) + ['--resume'])
    assert _resumed_at(work_dir) == 8
    assert (work_dir / 'iter_4.pth').read_bytes() == iter_4  # not overwritten by a restart
    assert torch.load(work_dir / 'iter_10.pth', weights_only=True)['meta']['iter'] == 10


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one_with_a_warning(
        tmp_path, trained_to_8):
    work_dir = _copy_work_dir(trained_to_8, tmp_path / 'work')
    data = (work_dir / 'iter_8.pth').read_bytes()
    (work_dir / 'iter_8.pth').write_bytes(data[:len(data) // 2])
    with logged_warnings() as warnings:
        assert find_resumable_checkpoint(str(work_dir)) == str(work_dir / 'iter_4.pth')
    (warning, ) = warnings
    assert f"'{work_dir / 'iter_8.pth'}' is not a readable PyTorch checkpoint" in warning
    assert f"Resuming from the newest readable checkpoint '{work_dir / 'iter_4.pth'}'" in warning


def test_no_readable_checkpoint_at_all_is_an_error_not_a_restart(tmp_path):
    (tmp_path / 'iter_4.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match=r'no checkpoint to resume from .*iter_4\.pth'):
        find_resumable_checkpoint(str(tmp_path))


def test_empty_work_dir_resumes_nothing(tmp_path):
    assert find_resumable_checkpoint(str(tmp_path)) is None


# Run in a child process: training that dies (os._exit, as kill -9: no cleanup, no finally)
# right before the rename that would put iter_4.pth in place.
_DIE_BEFORE_RENAME = '''
import os, sys
target = sys.argv[1]
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(str(dst)) == target:
        os._exit(137)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
from poolformer_mm.cli.train_test import run_training
run_training(sys.argv[2:])
'''


@pytest.mark.slow
def test_kill_while_writing_with_max_keep_ckpts_1_keeps_the_previous_checkpoint(
        tmp_path, toy_ade):
    work_dir = tmp_path / 'work'
    argv = _argv(work_dir, toy_ade, 6, 'default_hooks.checkpoint.max_keep_ckpts=1', interval=2)
    died = subprocess.run([sys.executable, '-c', _DIE_BEFORE_RENAME, 'iter_4.pth', *argv],
                          cwd=REPO, capture_output=True, text=True)
    assert died.returncode == 137, died.stderr[-2000:]
    # the complete iter_2.pth is still there, with the pointer at it; the half write is a temp
    assert sorted(p.name for p in work_dir.glob('*.pth')) == ['iter_2.pth']
    assert (work_dir / 'last_checkpoint').read_text().endswith('iter_2.pth')
    stale = list(work_dir.glob('.iter_4.pth.incomplete-*.tmp'))
    assert len(stale) == 1 and stale[0].stat().st_size > 1_000_000

    runner = run_training(argv + ['--resume'])
    assert runner.iter == 6 and _resumed_at(work_dir) == 2
    assert not list(work_dir.glob('.*.tmp'))  # removed at the start
    assert sorted(p.name for p in work_dir.glob('*.pth')) == ['iter_6.pth']  # max_keep_ckpts=1


@pytest.mark.slow
def test_max_keep_ckpts_still_deletes_outdated_checkpoints(tmp_path, toy_ade):
    work_dir = tmp_path / 'work'
    run_training(_argv(work_dir, toy_ade, 6, 'default_hooks.checkpoint.max_keep_ckpts=2',
                       interval=2))
    assert sorted(p.name for p in work_dir.glob('*.pth')) == ['iter_4.pth', 'iter_6.pth']


@pytest.mark.slow
def test_second_training_in_the_same_work_dir_stops_at_once(tmp_path, toy_ade,
                                                            lock_held_elsewhere):
    work_dir = tmp_path / 'work'
    with lock_held_elsewhere(work_dir) as pid:
        with pytest.raises(RuntimeError, match=rf"work dir '{work_dir}' is in use by another "
                           rf'training \(process {pid}\).*another --work-dir'):
            run_training(_argv(work_dir, toy_ade, 2))
        # stopped before the runner: no log folder, no config copy, no checkpoint
        assert sorted(p.name for p in work_dir.iterdir()) == ['.train.lock']
    # the holder died without releasing anything: the lock went with it
    WorkDirLock(str(work_dir)).release()


# Holds the lock, forks a child (as a data loader worker is forked) that outlives it, and dies.
_LOCK_FORK_DIE = '''
import os, sys, time
from poolformer_mm.engine import WorkDirLock
lock = WorkDirLock(sys.argv[1])
if os.fork() == 0:
    time.sleep(60)
    os._exit(0)
print("locked", flush=True)
time.sleep(60)
'''


@pytest.mark.slow
def test_a_killed_trainings_orphaned_workers_do_not_hold_the_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, '-c', _LOCK_FORK_DIE, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(RuntimeError, match='in use by another training'):
            WorkDirLock(str(tmp_path))
        holder.send_signal(signal.SIGKILL)  # the trainer only: its forked child lives on
        holder.wait()
        WorkDirLock(str(tmp_path)).release()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)  # the orphaned child


@pytest.mark.slow
def test_checkpoints_get_the_mode_the_umask_gives(tmp_path, toy_ade):
    old = os.umask(0o022)
    try:
        work_dir = tmp_path / 'work'
        run_training(_argv(work_dir, toy_ade, 2, interval=2))
        assert (work_dir / 'iter_2.pth').stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        AtomicLocalBackend().put(b'x', str(tmp_path / 'other.pkl'))
        assert (tmp_path / 'other.pkl').stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


@pytest.mark.slow
def test_save_best_with_max_keep_ckpts_keeps_one_periodic_and_the_best_checkpoint(tmp_path,
                                                                                  toy_ade):
    work_dir = tmp_path / 'work'
    run_training(_argv(work_dir, toy_ade, 4, 'default_hooks.checkpoint.max_keep_ckpts=1',
                       'default_hooks.checkpoint.save_best=mIoU', 'train_cfg.val_interval=2',
                       interval=2))
    names = sorted(p.name for p in work_dir.glob('*.pth'))
    assert names[-1] == 'iter_4.pth' and len(names) == 2
    assert re.fullmatch(r'best_mIoU_iter_[24]\.pth', names[0])


@pytest.mark.slow
def test_resume_finds_checkpoints_of_a_custom_name_in_the_out_dir(tmp_path, toy_ade):
    work_dir, out_dir = tmp_path / 'work', tmp_path / 'out'
    options = [f'default_hooks.checkpoint.out_dir={out_dir}',
               'default_hooks.checkpoint.filename_tmpl=step{}.pth']
    run_training(_argv(work_dir, toy_ade, 4, *options, interval=2))
    assert sorted(p.name for p in (out_dir / 'work').glob('*.pth')) == ['step2.pth',
                                                                         'step4.pth']
    (work_dir / 'last_checkpoint').unlink()
    run_training(_argv(work_dir, toy_ade, 6, *options, interval=2) + ['--resume'])
    assert _resumed_at(work_dir) == 4
