"""Checkpoints named by URL (and mmengine's other schemes) load through the same weights-only
loader as local files, from a loopback HTTP server that each test starts and stops."""
import contextlib
import functools
import http.server
import os
import socket
import threading

import pytest
import torch
from mmengine.runner import checkpoint as mm_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader

from poolformer_mm.cli.train_test import run_training
from poolformer_mm.datasets import make_toy_ade
from poolformer_mm.models import PoolFormer
from poolformer_mm.utils.errors import CheckpointUnavailableError

TOY_FPN = 'configs/segmentation/toy/fpn_poolformer_s12_toy.py'
TINY_ARCH = dict(layers=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32], mlp_ratios=[2, 2, 2, 2],
                 layer_scale_init_value=1e-5)


class _WritesMarker:
    """Unpickling it runs ``touch marker``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_folder(folder):
    """Serve the files in ``folder`` on 127.0.0.1; yields the base URL. Stopped on exit, after
    which the URL is refused as it would be without network."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05),
                              daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """(folder, base URL): files put in the folder are served on 127.0.0.1 until the test ends.

    TORCH_HOME points into the test's folder, so downloads never touch the user's cache.
    """
    folder = tmp_path / 'served'
    folder.mkdir()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    with serve_folder(folder) as base:
        yield folder, base


def _save_payload(path, marker, legacy=False):
    torch.save({'state_dict': {'w': torch.ones(1)}, 'payload': _WritesMarker(marker)}, path,
               _use_new_zipfile_serialization=not legacy)


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_payload_served_over_http_is_refused_and_never_runs(served, tmp_path, legacy):
    folder, base = served
    marker = tmp_path / 'marker'
    _save_payload(folder / 'evil.pth', marker, legacy)
    with pytest.raises(ValueError, match=r"refused to load 'http://127\.0\.0\.1:\d+/evil\.pth'"):
        CheckpointLoader.load_checkpoint(f'{base}/evil.pth')
    assert not marker.exists()


@pytest.mark.parametrize('scheme', ['torchvision', 'modelzoo', 'open-mmlab', 'openmmlab', 'mmcls'])
def test_payload_behind_every_named_model_scheme_is_refused(served, tmp_path, monkeypatch,
                                                            scheme):
    folder, base = served
    marker = tmp_path / 'marker'
    _save_payload(folder / 'evil.pth', marker)
    url = f'{base}/evil.pth'
    monkeypatch.setattr(mm_checkpoint, 'get_torchvision_models', lambda: {'evil': url})
    monkeypatch.setattr(mm_checkpoint, 'get_external_models', lambda: {'evil': url})
    monkeypatch.setattr(mm_checkpoint, 'get_mmcls_models', lambda: {'evil': url})
    with pytest.raises(ValueError, match='refused to load'):
        CheckpointLoader.load_checkpoint(f'{scheme}://evil')
    assert not marker.exists()


def test_payload_in_an_s3_object_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / 'marker'
    _save_payload(tmp_path / 'evil.pth', marker)

    class FakeS3:

        def get(self, filename):
            return (tmp_path / 'evil.pth').read_bytes()

    monkeypatch.setattr(mm_checkpoint, 'get_file_backend', lambda *args, **kwargs: FakeS3())
    with pytest.raises(ValueError, match=r"refused to load 's3://bucket/evil\.pth'"):
        CheckpointLoader.load_checkpoint('s3://bucket/evil.pth')
    assert not marker.exists()


def test_url_checkpoint_is_downloaded_once_into_torch_home_and_then_works_offline(
        served, tmp_path):
    folder, base = served
    torch.save({'state_dict': {'w': torch.arange(3.)}}, folder / 'good-1234.pth')
    first = CheckpointLoader.load_checkpoint(f'{base}/good-1234.pth')
    (cached, ) = (tmp_path / 'torch_home' / 'hub' / 'checkpoints').glob('*-good-1234.pth')
    assert cached.is_file()
    (folder / 'good-1234.pth').unlink()  # the server no longer has it: the cache answers
    second = CheckpointLoader.load_checkpoint(f'{base}/good-1234.pth')
    assert torch.equal(first['state_dict']['w'], torch.arange(3.))
    assert torch.equal(second['state_dict']['w'], torch.arange(3.))


@contextlib.contextmanager
def closed_loopback_port():
    """A loopback port that nothing listens on."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    yield port


def test_unreachable_url_without_cache_names_the_url_and_both_places_for_the_file(
        tmp_path, monkeypatch):
    from poolformer_mm.utils.errors import CheckpointUnavailableError
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.chdir(tmp_path)  # checkpoints/ is looked for in the working directory
    with closed_loopback_port() as port:
        url = f'http://127.0.0.1:{port}/poolformer_s12.pth.tar'
        with pytest.raises(CheckpointUnavailableError) as err:
            CheckpointLoader.load_checkpoint(url)
    message = str(err.value)
    assert url in message
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    assert str(cache / 'poolformer_s12.pth.tar') in message
    assert str(tmp_path / 'checkpoints' / 'poolformer_s12.pth.tar') in message
    assert not cache.exists() or not any(cache.iterdir())  # no partial file left behind


def _random_tiny_backbone(seed):
    torch.manual_seed(seed)
    model = PoolFormer(TINY_ARCH)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    return model


@pytest.mark.parametrize('layout', ['poolformer_mm', 'official', 'mmpretrain', 'timm'])
def test_backbone_init_cfg_url_loads_every_layout_exactly(served, layout):
    from test_checkpoint_layouts import to_mmpretrain, to_official, to_timm
    convert = dict(poolformer_mm=lambda state: state, official=to_official,
                   mmpretrain=to_mmpretrain, timm=to_timm)[layout]
    folder, base = served
    source = _random_tiny_backbone(0)
    checkpoint = convert(source.state_dict())
    if layout != 'mmpretrain':  # the converters add a 512-wide ImageNet head; ours is 32 wide
        checkpoint = {k: v for k, v in checkpoint.items()
                      if not k.startswith('head.') or k.startswith('head.norm.')}
    torch.save(checkpoint, folder / f'{layout}.pth')
    target = PoolFormer(TINY_ARCH, init_cfg=dict(type='Pretrained',
                                                 checkpoint=f'{base}/{layout}.pth'))
    target.init_weights()
    for key, value in source.state_dict().items():
        if key.startswith('output_norms.') and not key.startswith('output_norms.3.'):
            continue  # ImageNet layouts hold only the final norm
        if layout == 'official' and key.startswith('output_norms.3.'):
            continue  # not loaded from the official file: the paper's start
        assert torch.equal(target.state_dict()[key], value), key


def test_backbone_init_cfg_url_with_payload_is_refused(served, tmp_path):
    folder, base = served
    marker = tmp_path / 'marker'
    _save_payload(folder / 'evil.pth', marker)
    model = PoolFormer(TINY_ARCH, init_cfg=dict(type='Pretrained', checkpoint=f'{base}/evil.pth'))
    with pytest.raises(ValueError, match='refused to load'):
        model.init_weights()
    assert not marker.exists()


def test_neck_init_cfg_url_with_payload_is_refused(served, tmp_path):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    folder, base = served
    marker = tmp_path / 'marker'
    _save_payload(folder / 'evil.pth', marker)
    neck = MODELS.build(dict(type='FPN', in_channels=[8, 16], out_channels=8, num_outs=2,
                             init_cfg=dict(type='Pretrained', checkpoint=f'{base}/evil.pth')))
    with pytest.raises(ValueError, match='refused to load'):
        neck.init_weights()
    assert not marker.exists()


@pytest.fixture(scope='module')
def toy_ade(tmp_path_factory):
    return make_toy_ade(str(tmp_path_factory.mktemp('data') / 'ade'), num_train=4, num_val=2)


def _toy_fpn_training(work_dir, toy_ade, max_iters, *options):
    return [TOY_FPN, '--work-dir', str(work_dir), '--data-root', toy_ade, '--cfg-options',
            f'train_cfg.max_iters={max_iters}', f'train_cfg.val_interval={max_iters + 1}',
            'default_hooks.checkpoint.interval=2', 'param_scheduler=[]',
            'train_dataloader.batch_size=2', *options]


@pytest.mark.slow
def test_load_from_url_with_payload_stops_training_before_the_code_runs(served, tmp_path,
                                                                      toy_ade):
    folder, base = served
    marker = tmp_path / 'marker'
    _save_payload(folder / 'evil.pth', marker)
    with pytest.raises(ValueError, match='refused to load'):
        run_training(_toy_fpn_training(tmp_path / 'work', toy_ade, 1,
                                       f'load_from={base}/evil.pth'))
    assert not marker.exists()


@pytest.mark.slow
def test_resume_and_test_from_a_url_equal_the_local_file(served, tmp_path, toy_ade):
    from poolformer_mm.cli.train_test import run_testing
    folder, base = served
    run_training(_toy_fpn_training(tmp_path / 'first', toy_ade, 2))
    local = tmp_path / 'first' / 'iter_2.pth'
    (folder / 'iter_2.pth').write_bytes(local.read_bytes())

    test_args = ['--data-root', toy_ade, '--eval', 'mIoU']
    from_file = run_testing([TOY_FPN, str(local), '--work-dir', str(tmp_path / 't1'), *test_args])
    from_url = run_testing([TOY_FPN, f'{base}/iter_2.pth', '--work-dir', str(tmp_path / 't2'),
                            *test_args])
    assert from_url == from_file

    for name, source in (('resumed_file', str(local)), ('resumed_url', f'{base}/iter_2.pth')):
        runner = run_training(_toy_fpn_training(tmp_path / name, toy_ade, 4, 'randomness.seed=1')
                              + ['--resume', source])
        assert runner.iter == 4
    resumed_file = torch.load(tmp_path / 'resumed_file' / 'iter_4.pth', weights_only=True)
    resumed_url = torch.load(tmp_path / 'resumed_url' / 'iter_4.pth', weights_only=True)
    assert resumed_url['meta']['iter'] == 4
    for key, value in resumed_file['state_dict'].items():
        assert torch.equal(resumed_url['state_dict'][key], value), key


def test_a_pavi_checkpoint_is_refused_with_what_to_do():
    with pytest.raises(CheckpointUnavailableError, match=r"'pavi://model/1': pavi:// checkpoints "
                       'are not read here; download the file'):
        CheckpointLoader.load_checkpoint('pavi://model/1')
