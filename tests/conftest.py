"""Shared test set-up: the repository as the working directory, and building models from configs.

Configs are named as users name them, relative to the repository (``configs/...``), and the tools
run with the repository as their working directory; anchoring the session there lets the suite
start from any folder (``pytest /path/to/poolformer-mm/tests``).
"""
import contextlib
import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# The device the tests marked cuda run on: 'cuda', or 'cpu' to check their assertions on a
# machine without a GPU (POOLFORMER_MM_TEST_DEVICE=cpu); they skip where it is 'cuda' and none is.
TEST_DEVICE = os.environ.get('POOLFORMER_MM_TEST_DEVICE', 'cuda')
GPU_REPORT = []  # (check, figure) lines that make test-gpu prints at the end


def pytest_runtest_setup(item):
    if item.get_closest_marker('cuda') and TEST_DEVICE == 'cuda':
        import torch
        if not torch.cuda.is_available():
            pytest.skip('needs a CUDA GPU: torch.cuda.is_available() is False')


@pytest.fixture(scope='session')
def test_device():
    """The device of the tests marked cuda (see TEST_DEVICE)."""
    return TEST_DEVICE


@pytest.fixture
def gpu_report(request):
    """``gpu_report(figure)``: one line of make test-gpu's report, under the test's name."""
    return lambda figure: GPU_REPORT.append((request.node.name, figure))


def pytest_terminal_summary(terminalreporter):
    if not GPU_REPORT:
        return
    import torch
    name = torch.cuda.get_device_name() if TEST_DEVICE.startswith('cuda') else 'CPU (forced)'
    terminalreporter.section(f'CUDA paths on {name}, torch {torch.__version__}')
    for check, figure in GPU_REPORT:
        terminalreporter.write_line(f'{check}: {figure}')


def pytest_collection_modifyitems(items):
    """Training runs first (those that learn, the longest, before the rest), then the other slow
    tests: under ``make test`` (two workers that steal each other's pending tests) the long ones
    then start early instead of running alone at the end."""
    def trains(item):
        return any(word in item.name for word in ('trains', 'learns', 'resume'))
    items.sort(key=lambda item: (not item.get_closest_marker('slow'), 'learns' not in item.name,
                                 not trains(item)))


@pytest.fixture(scope='session', autouse=True)
def repository_as_working_directory():
    previous = os.getcwd()
    os.chdir(REPO)
    try:
        yield REPO
    finally:
        os.chdir(previous)


def _build_model_of(cfg):
    """The model of an mmdet or mmseg config, built in the config's registry scope.

    The config is copied: building a detector writes train_cfg / test_cfg into its heads' configs.
    """
    from mmengine.registry import init_default_scope
    init_default_scope(cfg.default_scope)
    if cfg.default_scope == 'mmdet':
        from mmdet.registry import MODELS
    elif cfg.default_scope == 'mmseg':
        from mmseg.registry import MODELS
    else:
        raise ValueError(f'config scope {cfg.default_scope!r} is neither mmdet nor mmseg')
    return MODELS.build(copy.deepcopy(cfg.model))


def _tta_wrapped(model):
    """``model`` held as mmdet's and mmseg's test-time-augmentation models hold it
    (``wrapper.module``), without their registration."""
    import torch

    class TTAWrapper(torch.nn.Module):

        def __init__(self, module):
            super().__init__()
            self.module = module

    return TTAWrapper(model)


@pytest.fixture(scope='session')
def build_model():
    """:func:`_build_model_of`, for tests: ``build_model(Config.fromfile(...))``."""
    return _build_model_of


def _detection_samples(size, labels=(0, 2)):
    """Two mmdet training samples of ``size`` x ``size``, each with two boxes of ``labels`` and
    their box-shaped masks."""
    import torch
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    samples = []
    for shift in (0, size // 8):
        boxes = torch.tensor([[0.06, 0.1, 0.56, 0.62], [0.32, 0.25, 0.94, 0.88]]) * size + shift / 2
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            mask[y1:y2, x1:x2] = 1
        sample = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                             pad_shape=(size, size), scale_factor=(1., 1.)))
        sample.gt_instances = InstanceData(bboxes=boxes, labels=torch.tensor(labels),
                                           masks=BitmapMasks(masks.numpy(), size, size))
        samples.append(sample)
    return samples


@pytest.fixture(scope='session')
def detection_samples():
    """:func:`_detection_samples`, for tests: ``detection_samples(64, labels=(1, 5))``."""
    return _detection_samples


@pytest.fixture(scope='session')
def tta_wrapped():
    """:func:`_tta_wrapped`, for tests: ``tta_wrapped(model)``."""
    return _tta_wrapped


@contextlib.contextmanager
def _lock_held_elsewhere(folder):
    """Another process holding the work-dir lock on ``folder``; yields its PID. It is killed
    at the end, without releasing anything (the kernel drops its lock)."""
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import sys, time; from poolformer_mm.engine import WorkDirLock; '
         'WorkDirLock(sys.argv[1]); print("locked", flush=True); time.sleep(120)', str(folder)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        yield holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


@pytest.fixture(scope='session')
def lock_held_elsewhere():
    """:func:`_lock_held_elsewhere`, for tests: ``with lock_held_elsewhere(folder) as pid:``."""
    return _lock_held_elsewhere
