"""Many processes and hard days: CPU DDP through the launch scripts, kill -9 and resume.

Marked slow (each starts several training processes); CI runs them.
"""
import glob
import json
import os
import os.path as osp
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from poolformer_mm.datasets import make_toy_coco

REPO = Path(__file__).resolve().parents[1]
TOY_RETINANET = 'configs/detection/toy/retinanet_poolformer_s12_toy.py'

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def run(cmd, **kwargs):
    env = dict(os.environ, PYTHON=sys.executable, PORT=free_port())
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def logged_losses(work_dir):
    (path, ) = glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))
    with open(path) as f:
        return [json.loads(line)['loss'] for line in f if '"loss"' in line]


def metrics_line(output):
    return json.loads(output.rsplit('Test metrics: ', 1)[1].splitlines()[0])


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    return make_toy_coco(str(tmp_path_factory.mktemp('data') / 'coco'), num_train=16, num_val=4)


def test_two_cpu_processes_match_one_process_with_the_same_total_batch(tmp_path, coco):
    common = ['--data-root', coco, '--cfg-options', 'train_cfg.max_epochs=3',
              'train_cfg.val_interval=100', 'default_hooks.logger.interval=1',
              'default_hooks.checkpoint.interval=3']
    single, double = tmp_path / 'one', tmp_path / 'two'
    run([sys.executable, 'tools/train.py', TOY_RETINANET, '--work-dir', str(single), *common,
         'train_dataloader.batch_size=4'])
    run(['bash', 'tools/dist_train.sh', TOY_RETINANET, '2', '--work-dir', str(double), *common,
         'train_dataloader.batch_size=2'])
    # one set of checkpoints, written once (by rank 0)
    assert sorted(p.name for p in double.glob('*.pth')) == ['epoch_3.pth']
    assert torch.load(double / 'epoch_3.pth', weights_only=True)['meta']['iter'] == 12
    one, two = logged_losses(single), logged_losses(double)
    assert len(one) == len(two) == 12  # 16 images, total batch 4, 3 epochs
    # Rank 0 logs the loss of its half of each batch, so single steps differ by sampling noise;
    # the curves agree within 15 % on average and both go down.
    mean_one, mean_two = sum(one) / 12, sum(two) / 12
    assert abs(mean_two - mean_one) / mean_one < 0.15, (one, two)
    assert sum(two[-3:]) < sum(two[:3]) and sum(one[-3:]) < sum(one[:3])

    checkpoint = str(single / 'epoch_3.pth')
    test_args = ['--data-root', coco, '--eval', 'bbox']
    alone = metrics_line(run([sys.executable, 'tools/test.py', TOY_RETINANET, checkpoint,
                              '--work-dir', str(tmp_path / 't1'), *test_args]))
    shared = metrics_line(run(['bash', 'tools/dist_test.sh', TOY_RETINANET, checkpoint, '2',
                               '--work-dir', str(tmp_path / 't2'), *test_args]))
    assert shared == alone


DETERMINISTIC = ['randomness.deterministic=True', 'train_dataloader.num_workers=1',
                 'train_dataloader.persistent_workers=False', 'train_cfg.max_epochs=6',
                 'train_cfg.val_interval=100', 'default_hooks.checkpoint.interval=1']


def _train_cmd(work_dir, coco, *extra):
    return [sys.executable, 'tools/train.py', TOY_RETINANET, '--work-dir', str(work_dir),
            '--data-root', coco, *extra, '--cfg-options', *DETERMINISTIC]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, coco):
    work_dir = tmp_path_factory.mktemp('uninterrupted')
    run(_train_cmd(work_dir, coco))
    return torch.load(work_dir / 'epoch_6.pth', weights_only=True)['state_dict']


@pytest.mark.parametrize('seed', [1, 2])
def test_kill_9_at_a_random_moment_then_resume_gives_the_uninterrupted_weights(
        tmp_path, coco, uninterrupted, seed):
    work_dir = tmp_path / 'work'
    process = subprocess.Popen(_train_cmd(work_dir, coco), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    # wait until training is under way (a first checkpoint exists), then kill at a random time
    deadline = time.time() + 300
    while not (work_dir / 'epoch_1.pth').exists():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.2)
    time.sleep(random.Random(seed).uniform(0.0, 6.0))
    assert process.poll() is None, 'training ended before it could be killed'
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = sorted(work_dir.glob('epoch_*.pth'))
    assert (work_dir / 'epoch_6.pth') not in killed_at

    out = run(_train_cmd(work_dir, coco, '--resume'))
    assert 'resumed epoch:' in out
    resumed = torch.load(work_dir / 'epoch_6.pth', weights_only=True)['state_dict']
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
