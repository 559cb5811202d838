"""Many processes and hard days: CPU DDP through the launch scripts, kill -9 and resume.

Marked slow (each starts several training processes); CI runs them.
"""
import contextlib
import glob
import json
import os
import os.path as osp
import random
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from poolformer_mm.datasets import make_toy_ade, make_toy_coco

REPO = Path(__file__).resolve().parents[2]
TOY_RETINANET = 'configs/detection/toy/retinanet_poolformer_s12_toy.py'
TOY_FPN = 'configs/segmentation/toy/fpn_poolformer_s12_toy.py'

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def port_taken(output):
    """Whether torchrun failed because the port ``free_port`` found was taken before it bound
    it (another process's connection may pick it in between): worth another port."""
    return 'EADDRINUSE' in output


def run(cmd, **env):
    for _ in range(3):
        env = dict(os.environ, PYTHON=sys.executable, PORT=free_port(), **env)
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        if result.returncode == 0 or not port_taken(result.stderr):
            break
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def logged_losses(work_dir):
    (path, ) = glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))
    with open(path) as f:
        return [json.loads(line)['loss'] for line in f if '"loss"' in line]


def metrics_line(output):
    return json.loads(output.rsplit('Test metrics: ', 1)[1].splitlines()[0])


def weights(checkpoint):
    return torch.load(checkpoint, weights_only=True)['state_dict']


def assert_same_weights(actual, expected):
    assert actual.keys() == expected.keys()
    differ = [key for key, value in expected.items() if not torch.equal(actual[key], value)]
    assert not differ, f'{len(differ)} of {len(expected)} tensors differ, e.g. {differ[:3]}'


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    return make_toy_coco(str(tmp_path_factory.mktemp('data') / 'coco'), num_train=16, num_val=4)


@pytest.fixture(scope='module')
def ade(tmp_path_factory):
    return make_toy_ade(str(tmp_path_factory.mktemp('data') / 'ade'), num_train=8, num_val=2)


# --- CPU DDP --------------------------------------------------------------------------------

DDP_RETINANET = ['train_cfg.max_epochs=3', 'train_cfg.val_interval=100',
                 'default_hooks.logger.interval=1', 'default_hooks.checkpoint.interval=3',
                 'randomness.deterministic=True']


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory, coco):
    """Toy RetinaNet, 2 CPU processes on one node, 2 images each (total batch 4)."""
    work_dir = tmp_path_factory.mktemp('two_processes')
    run(['bash', 'tools/dist_train.sh', TOY_RETINANET, '2', '--work-dir', str(work_dir),
         '--data-root', coco, '--cfg-options', *DDP_RETINANET, 'train_dataloader.batch_size=2'])
    return work_dir


def test_two_cpu_processes_match_one_process_with_the_same_total_batch(
        tmp_path, coco, two_processes):
    single, double = tmp_path / 'one', two_processes
    run([sys.executable, 'tools/train.py', TOY_RETINANET, '--work-dir', str(single),
         '--data-root', coco, '--cfg-options', *DDP_RETINANET, 'train_dataloader.batch_size=4'])
    # one set of checkpoints, written once (by rank 0)
    assert sorted(p.name for p in double.glob('*.pth')) == ['epoch_3.pth']
    checkpoint = torch.load(double / 'epoch_3.pth', weights_only=True)
    assert checkpoint['meta']['iter'] == 12
    # the random state of both ranks (gathered before rank 0 writes), for an exact resume
    assert checkpoint['random_state']['world_size'] == 2
    assert len(checkpoint['random_state']['ranks']) == 2
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


def test_two_nodes_of_one_process_train_like_one_node_of_two(tmp_path, coco, two_processes):
    """Two launchers as two machines (NNODES=2, NODE_RANK 0 and 1) on the loopback address."""
    def launch_two_nodes():
        port, launchers = free_port(), []
        for node_rank in (0, 1):
            # torchrun gives each process one intra-op thread when it starts several on a node,
            # not for one process per node; CPU kernels sum in another order with another
            # thread count, so the comparison with the one-node run needs the same count (and
            # two "nodes" sharing this machine's cores should not oversubscribe them anyway).
            env = dict(os.environ, PYTHON=sys.executable, NNODES='2', NODE_RANK=str(node_rank),
                       MASTER_ADDR='127.0.0.1', PORT=port, OMP_NUM_THREADS='1')
            # each node its own work dir, as on machines without a shared file system
            cmd = ['bash', 'tools/dist_train.sh', TOY_RETINANET, '1', '--work-dir',
                   str(tmp_path / f'node{node_rank}'), '--data-root', coco, '--cfg-options',
                   *DDP_RETINANET, 'train_dataloader.batch_size=2']
            launchers.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True))
        results = []
        for launcher in launchers:
            if results and results[0][0]:  # node 0 failed: node 1 would wait for it in vain
                launcher.terminate()
            output = launcher.communicate(timeout=600)[0]
            results.append((launcher.returncode, output))
        return results

    for _ in range(3):
        results = launch_two_nodes()
        if not any(code and port_taken(output) for code, output in results):
            break
    for code, output in results:
        assert code == 0, output[-3000:]

    assert sorted(p.name for p in (tmp_path / 'node0').glob('*.pth')) == ['epoch_3.pth']
    assert not list((tmp_path / 'node1').glob('*.pth'))  # rank 1 writes no checkpoint
    assert not (tmp_path / 'node1' / 'last_checkpoint').exists()
    # Same ranks, same data shards, same seeds, a two-term all-reduce: the same weights bit for
    # bit (and the same optimizer state) as two processes on one node.
    multi = torch.load(tmp_path / 'node0' / 'epoch_3.pth', weights_only=True)
    single = torch.load(two_processes / 'epoch_3.pth', weights_only=True)
    assert multi['meta']['iter'] == single['meta']['iter'] == 12
    assert_same_weights(multi['state_dict'], single['state_dict'])
    assert_same_weights(multi['optimizer']['state'][0], single['optimizer']['state'][0])


@pytest.mark.parametrize('script,args', [('dist_train.sh', [TOY_RETINANET, '1']),
                                         ('dist_test.sh', [TOY_RETINANET, 'ckpt.pth', '1'])])
def test_several_nodes_need_each_nodes_rank(script, args):
    # without it, every launcher would act as node 0
    env = dict(os.environ, NNODES='2', MASTER_ADDR='127.0.0.1')
    env.pop('NODE_RANK', None)
    result = subprocess.run(['bash', f'tools/{script}', *args], cwd=REPO, text=True,
                            capture_output=True, env=env)
    assert result.returncode == 2
    assert 'NNODES=2 needs NODE_RANK (0 on the first node' in result.stderr


@pytest.mark.parametrize('script,args', [('dist_train.sh', [TOY_RETINANET, '1']),
                                         ('dist_test.sh', [TOY_RETINANET, 'ckpt.pth', '1'])])
def test_several_nodes_need_the_address_of_node_0(script, args):
    # without it, node 1 would wait for a rendezvous on its own loopback address until timeout
    env = {k: v for k, v in os.environ.items() if k != 'MASTER_ADDR'}
    result = subprocess.run(['bash', f'tools/{script}', *args], cwd=REPO, text=True,
                            capture_output=True, env=dict(env, NNODES='2', NODE_RANK='1'))
    assert result.returncode == 2
    assert 'NNODES=2 needs MASTER_ADDR, the address of the node started with NODE_RANK=0' \
        in result.stderr


def test_segmentation_trains_resumes_and_tests_with_two_cpu_processes(tmp_path, ade):
    """mmseg's heads use SyncBN, which torch's DDP refuses on CPU: converted to BN, and said.

    Also a distributed resume: each rank gets its own random state back (the ranks' pipelines
    draw differently), so the resumed run ends with the uninterrupted one's weights.
    """
    def train(work_dir, *extra):
        return run(['bash', 'tools/dist_train.sh', TOY_FPN, '2', '--work-dir', str(work_dir),
                    '--data-root', ade, *extra, '--cfg-options', 'train_cfg.max_iters=4',
                    'train_cfg.val_interval=4', 'default_hooks.checkpoint.interval=2',
                    'randomness.deterministic=True'])

    work_dir = tmp_path / 'work'
    out = train(work_dir)
    # FPNHead: scale heads of 1, 1, 2 and 3 conv modules, each with a SyncBN
    converted = re.findall(r'CPU distributed run: converted (\d+) SyncBN layers \((.*?)\) to BN',
                           out)
    assert converted == [('7', 'decode_head: 7')], converted  # logged once, by rank 0
    assert sorted(p.name for p in work_dir.glob('*.pth')) == ['iter_2.pth', 'iter_4.pth']
    assert re.search(r'Iter\(val\) \[1/1\]\s+aAcc: [\d.]+\s+mIoU: [\d.]+', out)
    state = weights(work_dir / 'iter_4.pth')  # BN keeps SyncBN's state-dict keys
    assert 'decode_head.scale_heads.3.0.bn.running_var' in state

    resumed = tmp_path / 'resumed'
    out = train(resumed, '--resume', str(work_dir / 'iter_2.pth'))
    assert ('restored the random state (torch, numpy, python random) of 2 process(es) as it '
            'was after iteration 2') in out
    assert_same_weights(weights(resumed / 'iter_4.pth'), state)

    out = run(['bash', 'tools/dist_test.sh', TOY_FPN, str(work_dir / 'iter_4.pth'), '2',
               '--work-dir', str(tmp_path / 'test'), '--data-root', ade, '--eval', 'mIoU'])
    assert 'CPU distributed run: converted 7 SyncBN layers' in out
    assert out.count('Test metrics: ') == 1  # printed by rank 0 alone
    # the wrapper's setting under the name this torch takes, without a deprecation notice
    assert 'is deprecated' not in out, out
    metrics = metrics_line(out)
    assert set(metrics) == {'aAcc', 'mIoU', 'mAcc'} and 0 <= metrics['mIoU'] <= 100


def test_random_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import numpy as np

    from poolformer_mm.engine import get_random_state, set_random_state

    def draw():
        return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(),
                random.random(), random.gauss(0, 1))

    np.random.randn()  # leaves a cached Gaussian in numpy's state
    random.gauss(0, 1)  # and in python's
    torch.save(dict(random_state=get_random_state()), tmp_path / 'state.pth')
    expected = draw()
    # plain tensors, lists and numbers: no global outside torch's default allow-list
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / 'state.pth') == []
    set_random_state(torch.load(tmp_path / 'state.pth', weights_only=True)['random_state'])
    assert draw() == expected


# --- kill -9 and resume ---------------------------------------------------------------------
# Dropout (Semantic FPN's head), random resize/crop/flip (toy FPN), random flip (toy RetinaNet):
# the resumed run must draw exactly what the uninterrupted one drew after the checkpoint.

DETERMINISTIC = ['randomness.deterministic=True', 'train_dataloader.persistent_workers=False',
                 'default_hooks.logger.interval=1']
# Iteration-based: 12 iterations, checkpoints at 3, 6, 9 and 12, 8 images (2 per pass).
FPN_RESUME = [*DETERMINISTIC, 'train_cfg.max_iters=12', 'default_hooks.checkpoint.interval=3']
# Epoch-based: 3 epochs of 8 iterations (16 images, 2 per pass), a checkpoint after each.
RETINANET_RESUME = [*DETERMINISTIC, 'train_cfg.max_epochs=3', 'train_cfg.val_interval=100',
                    'default_hooks.checkpoint.interval=1', 'train_dataloader.batch_size=2']

RESUME_CASES = {
    # name: (config, options, number of checkpoints, iterations from one to the next)
    # data pipeline in the main process; validation only at the end
    'iter-workers0': (TOY_FPN, [*FPN_RESUME, 'train_dataloader.num_workers=0',
                                'train_cfg.val_interval=100'], 4, 3),
    # pipeline in 2 worker processes; a validation right after every checkpoint
    'iter-workers2-val': (TOY_FPN, [*FPN_RESUME, 'train_dataloader.num_workers=2',
                                    'train_cfg.val_interval=3'], 4, 3),
    'epoch-workers0': (TOY_RETINANET, [*RETINANET_RESUME, 'train_dataloader.num_workers=0'],
                       3, 8),
    'epoch-workers1': (TOY_RETINANET, [*RETINANET_RESUME, 'train_dataloader.num_workers=1'],
                       3, 8),
}


def _by_epoch(case):
    return RESUME_CASES[case][0] == TOY_RETINANET


def _resume_train_cmd(case, work_dir, data, *extra):
    config, options = RESUME_CASES[case][:2]
    return [sys.executable, 'tools/train.py', config, '--work-dir', str(work_dir),
            '--data-root', data, *extra, '--cfg-options', *options]


def _checkpoint_name(case, iteration):
    every = RESUME_CASES[case][3]
    return f'epoch_{iteration // every}.pth' if _by_epoch(case) else f'iter_{iteration}.pth'


def _final_checkpoint(case):
    _, _, num_checkpoints, every = RESUME_CASES[case]
    return _checkpoint_name(case, num_checkpoints * every)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, coco, ade):
    """Final weights of the uninterrupted run of a case, trained once per module."""
    done = {}

    def final_weights(case):
        if case not in done:
            work_dir = tmp_path_factory.mktemp(f'uninterrupted-{case}')
            run(_resume_train_cmd(case, work_dir, coco if _by_epoch(case) else ade))
            done[case] = weights(work_dir / _final_checkpoint(case))
        return done[case]

    return final_weights


def _kill_point(case, during_write, seed):
    """A line of the run's log to kill it at, drawn with ``seed``, and the iteration of the
    checkpoint the resumed run must start from."""
    _, _, num_checkpoints, every = RESUME_CASES[case]
    rng = random.Random(seed)
    if during_write:
        # a write after the first (so that one checkpoint is complete) and before the last
        k = rng.randrange(2, num_checkpoints)
        if _by_epoch(case):
            return rf'Saving checkpoint at {k} epochs', (k - 1) * every
        return rf'Saving checkpoint at {k * every} iterations', (k - 1) * every
    # After the log of an iteration that writes no checkpoint: the kill lands in the next one.
    total = num_checkpoints * every
    it = rng.choice([i for i in range(every + 1, total) if i % every])
    if _by_epoch(case):
        epoch, step = divmod(it - 1, every)
        return rf'Epoch\(train\) \[{epoch + 1}\]\[\s*{step + 1}/{every}\]', it // every * every
    return rf'Iter\(train\) \[\s*{it}/{total}\]', it // every * every


def train_until(cmd, pattern, work_dir):
    """Run ``cmd`` and kill -9 it at its first output line that matches ``pattern``.

    The whole job is killed, data loader workers included, as a scheduler or a crashed machine
    does: a worker that outlived the trainer would hold on to its open files for a few seconds.

    Returns:
        list[str]: the checkpoints in ``work_dir`` right after the kill.
    """
    process = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED='1'),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if re.search(pattern, line):
                break
        else:
            pytest.fail(f'training ended before the kill point {pattern!r}:\n'
                        + ''.join(seen[-30:]))
    finally:
        with contextlib.suppress(ProcessLookupError):  # (it ended before the kill point)
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()
    return sorted(p.name for p in work_dir.glob('*.pth'))


@pytest.mark.parametrize('case,during_write,seed', [
    ('iter-workers0', True, 5),
    ('iter-workers2-val', False, 2),
    ('epoch-workers0', False, 5),
    ('epoch-workers1', True, 1),
])
def test_kill_9_then_resume_gives_the_uninterrupted_weights(
        tmp_path, coco, ade, uninterrupted, case, during_write, seed):
    work_dir, data = tmp_path / 'work', coco if _by_epoch(case) else ade
    pattern, resume_at = _kill_point(case, during_write, seed)
    left = train_until(_resume_train_cmd(case, work_dir, data), pattern, work_dir)
    # Killed during the write of the next checkpoint (188 MB for the toy FPN: it takes a good
    # part of a second) or between two: the latest complete one is that of resume_at; the
    # atomic write leaves nothing under the name of the one being written.
    expected = [_checkpoint_name(case, i) for i in range(RESUME_CASES[case][3], resume_at + 1,
                                                            RESUME_CASES[case][3])]
    assert left == sorted(expected), (pattern, left)

    out = run(_resume_train_cmd(case, work_dir, data, '--resume'))
    assert_same_weights(weights(work_dir / _final_checkpoint(case)), uninterrupted(case))
    epoch = resume_at // RESUME_CASES[case][3] if _by_epoch(case) else 0
    assert f'resumed epoch: {epoch}, iter: {resume_at}' in out, pattern
    where = f'epoch {epoch}' if _by_epoch(case) else f'iteration {resume_at}'
    assert (f'restored the random state (torch, numpy, python random) of 1 process(es) as it '
            f'was after {where}') in out



def test_a_run_destroys_the_process_group_it_started_and_only_that(tmp_path):
    """Left to interpreter exit, gloo's threads can abort a process whose run succeeded."""
    import torch.distributed as dist

    from poolformer_mm.engine.distributed import closing_process_group

    def start(name):
        dist.init_process_group('gloo', init_method=f'file://{tmp_path / name}', rank=0,
                                world_size=1)
    try:
        with closing_process_group():  # as a launched run: the Runner starts the group
            start('store1')
        assert not dist.is_initialized()

        start('store2')  # the caller's own group outlives the run
        with closing_process_group():
            pass
        assert dist.is_initialized()
        dist.destroy_process_group()

        with pytest.raises(RuntimeError):  # after an error, no barrier other ranks may miss
            with closing_process_group():
                start('store3')
                raise RuntimeError('the run failed')
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with closing_process_group():  # no group at all: nothing to do
        pass
