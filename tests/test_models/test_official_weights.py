"""Every config names the official ImageNet weights by URL, and a URL loads as OpenMMLab users
expect: downloaded once into the torch hub cache, found without network in ``checkpoints/`` or in
that cache, and otherwise one error that names the URL and both places to put the file.

The configs' real URLs are redirected to a loopback HTTP server that each test starts and stops,
so the names the configs use are the ones under test.
"""
import contextlib
import glob
import hashlib
import http.server
import os
import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS
from mmengine.runner.checkpoint import CheckpointLoader
from safetensors.torch import save_file
from test_checkpoint_layouts import to_official, to_timm
from test_url_checkpoints import TINY_ARCH, closed_loopback_port, serve_folder

from poolformer_mm import checkpoint_io as safe_checkpoints
from poolformer_mm.models import PoolFormer
from poolformer_mm.utils.errors import CheckpointUnavailableError

REPO = Path(__file__).resolve().parents[2]

POOLFORMER_RELEASE = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/'
METAFORMER_RELEASE = 'https://huggingface.co/sail/dl/resolve/main/'
# configs/<task>/*.py; the toy/ configs below them train from scratch
CONFIGS = sorted(os.path.relpath(path, REPO) for path in glob.glob(f'{REPO}/configs/*/*.py'))
S12_URL = POOLFORMER_RELEASE + 'poolformer_s12.pth.tar'


def _official_url(backbone: dict) -> str:
    """The URL the sail-sg releases give for this backbone's ImageNet weights."""
    if backbone['type'] == 'MetaFormer':
        family = backbone['arch'].split('_')[0]
        return f"{METAFORMER_RELEASE}{family}/{backbone['arch']}.pth"
    if tuple(backbone.get('token_mixers', ())) == ('pool', 'pool', 'attn', 'attn'):
        return POOLFORMER_RELEASE + 'metaformer_ppaa_s12_224.pth.tar'
    return f"{POOLFORMER_RELEASE}poolformer_{backbone['arch']}.pth.tar"


def test_the_configs_are_found():
    assert len(CONFIGS) >= 21, CONFIGS


@pytest.mark.parametrize('path', CONFIGS)
def test_config_names_the_official_weights_of_its_arch_by_url(path):
    backbone = Config.fromfile(path).model.backbone
    assert backbone.init_cfg.type == 'Pretrained'
    assert backbone.init_cfg.checkpoint == _official_url(backbone)
    # each file's own start: for sail-sg/poolformer's, the paper's (the last output norm at its
    # initial weights; see _assert_backbone_holds)
    assert 'final_norm' not in backbone.init_cfg and 'use_ema' not in backbone.init_cfg


def _random_state(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    return model.state_dict()


@pytest.fixture
def release(tmp_path, monkeypatch):
    """A stand-in for the release servers: any http(s) URL is fetched from a loopback server
    that serves ``folder`` (by the URL's path), and the URLs asked for are recorded.

    The test runs in an empty working directory (no ``checkpoints/``) with TORCH_HOME in its own
    folder, so nothing of the user's is read or written.
    """
    folder = tmp_path / 'served'
    folder.mkdir()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    work = tmp_path / 'work'
    work.mkdir()
    monkeypatch.chdir(work)
    requested = []
    real_urlopen = urllib.request.urlopen

    with serve_folder(folder) as base:

        def to_loopback(request, *args, **kwargs):
            url = request.full_url if isinstance(request, urllib.request.Request) else request
            requested.append(url)
            local = urllib.request.Request(base + urlparse(url).path)
            return real_urlopen(local, *args, **kwargs)

        monkeypatch.setattr(urllib.request, 'urlopen', to_loopback)
        yield folder, requested


def _serve(folder, url, data_or_state):
    path = folder / urlparse(url).path.lstrip('/')
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data_or_state, bytes):
        path.write_bytes(data_or_state)
    else:
        torch.save(data_or_state, path)
    return path


def _hub_cache(tmp_path):
    return tmp_path / 'torch_home' / 'hub' / 'checkpoints'


def _hashed(url, name):
    """The name a download of ``url`` gets in the cache: the URL's hash, then its file name."""
    return f'{hashlib.sha256(url.encode()).hexdigest()[:8]}-{name}'


def _build_backbone(cfg_path):
    import poolformer_mm  # noqa: F401  (registers the backbones)
    backbone = MODELS.build(Config.fromfile(str(REPO / cfg_path)).model.backbone)
    backbone.init_weights()
    return backbone


def _assert_backbone_holds(backbone, state, papers_start=True):
    """The backbone holds ``state`` (our names), apart from the output norms of stages 0-2 that
    an ImageNet classifier does not have. From an official file (``papers_start``) the last
    output norm starts where the paper's code started fine-tuning: at its initial weights, as
    the classifier's final norm has no place in the official poolformer_*_feat; from timm's,
    the classifier's final norm initialises it."""
    for key, value in state.items():
        if key.startswith('output_norms.') and not key.startswith('output_norms.3.'):
            continue
        if papers_start and key.startswith('output_norms.3.'):
            initial = torch.ones_like(value) if key.endswith('weight') else torch.zeros_like(value)
            assert torch.equal(backbone.state_dict()[key], initial), key
            continue
        assert torch.equal(backbone.state_dict()[key], value), key


def test_config_url_is_downloaded_once_into_the_torch_hub_cache(release, tmp_path):
    folder, requested = release
    source = _random_state(PoolFormer('s12'), seed=0)
    _serve(folder, S12_URL, to_official(source))

    first = _build_backbone('configs/detection/retinanet_poolformer_s12.py')
    assert requested == [S12_URL]
    assert (_hub_cache(tmp_path) / _hashed(S12_URL, 'poolformer_s12.pth.tar')).is_file()
    _assert_backbone_holds(first, source)

    second = _build_backbone('configs/segmentation/fpn_poolformer_s12.py')
    assert requested == [S12_URL]  # the cached copy answered
    _assert_backbone_holds(second, source)


def _forbid_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError('the network was used although a local copy exists')
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)


def _tiny_url_checkpoint(name, seed):
    source = _random_state(PoolFormer(TINY_ARCH), seed)
    return source, {k: v for k, v in to_official(source).items() if not k.startswith('head.')}


def _load_tiny(url):
    model = PoolFormer(TINY_ARCH, init_cfg=dict(type='Pretrained', checkpoint=url))
    model.init_weights()
    return model


def test_offline_the_file_in_checkpoints_is_used_and_said_so(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.chdir(tmp_path)
    logged = []
    monkeypatch.setattr(safe_checkpoints, 'print_log', lambda msg, **kwargs: logged.append(msg))
    _forbid_network(monkeypatch)
    local, local_file = _tiny_url_checkpoint('tiny', seed=1)
    (tmp_path / 'checkpoints').mkdir()
    torch.save(local_file, tmp_path / 'checkpoints' / 'tiny.pth.tar')
    # a different copy in the hub cache: checkpoints/ comes first
    _, cached_file = _tiny_url_checkpoint('tiny', seed=2)
    _hub_cache(tmp_path).mkdir(parents=True)
    torch.save(cached_file, _hub_cache(tmp_path) / 'tiny.pth.tar')

    url = 'https://example.org/releases/tiny.pth.tar'
    _assert_backbone_holds(_load_tiny(url), local)
    assert logged == [f"Using the local copy 'checkpoints/tiny.pth.tar' of {url}"]


def test_offline_the_file_in_the_torch_hub_cache_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.chdir(tmp_path)
    _forbid_network(monkeypatch)
    cached, cached_file = _tiny_url_checkpoint('tiny', seed=3)
    _hub_cache(tmp_path).mkdir(parents=True)
    torch.save(cached_file, _hub_cache(tmp_path) / 'tiny.pth.tar')
    _assert_backbone_holds(_load_tiny('https://example.org/releases/tiny.pth.tar'), cached)


def test_offline_without_a_copy_one_error_names_the_url_and_both_places(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.chdir(tmp_path)
    with closed_loopback_port() as port:
        url = f'http://127.0.0.1:{port}/v1.0/poolformer_s12.pth.tar'
        model = PoolFormer('s12', init_cfg=dict(type='Pretrained', checkpoint=url))
        with pytest.raises(CheckpointUnavailableError) as err:
            model.init_weights()
    message = str(err.value)
    assert url in message
    assert str(tmp_path / 'checkpoints' / 'poolformer_s12.pth.tar') in message
    assert str(_hub_cache(tmp_path) / 'poolformer_s12.pth.tar') in message
    assert isinstance(err.value, FileNotFoundError)  # as a missing local file


def test_a_url_the_server_does_not_have_names_the_http_error(release, tmp_path):
    with pytest.raises(CheckpointUnavailableError, match=r'HTTP Error 404: File not found.*'
                                                         r'checkpoints/poolformer_s12\.pth\.tar'):
        CheckpointLoader.load_checkpoint(S12_URL)
    assert os.listdir(_hub_cache(tmp_path)) == []


@contextlib.contextmanager
def silent_server():
    """A loopback port that accepts connections and never answers: a network that hangs."""
    with socket.socket() as listener:
        listener.bind(('127.0.0.1', 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def test_a_server_that_never_answers_fails_after_the_timeout_and_leaves_no_file(
        tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(safe_checkpoints, 'DOWNLOAD_TIMEOUT_S', 0.5)
    with silent_server() as port:
        url = f'http://127.0.0.1:{port}/poolformer_s12.pth.tar'
        with pytest.raises(CheckpointUnavailableError, match='timed out'):
            CheckpointLoader.load_checkpoint(url)
    assert os.listdir(_hub_cache(tmp_path)) == []


class _ShortBodyHandler(http.server.BaseHTTPRequestHandler):
    """Promises 1000 bytes, sends 100, closes: a connection that drops mid-download."""

    def do_GET(self):
        self.send_response(200)
        self.send_header('Content-Length', '1000')
        self.end_headers()
        self.wfile.write(b'x' * 100)
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_a_download_cut_short_leaves_no_file_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.chdir(tmp_path)
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _ShortBodyHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05),
                              daemon=True)
    thread.start()
    try:
        url = f'http://127.0.0.1:{server.server_address[1]}/poolformer_s12.pth.tar'
        with pytest.raises(CheckpointUnavailableError, match='after 100 of 1000 bytes'):
            CheckpointLoader.load_checkpoint(url)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert os.listdir(_hub_cache(tmp_path)) == []


# ------------------------------------------------------------------ the Hugging Face Hub
TIMM_HUB_URL = 'https://huggingface.co/timm/poolformer_s12.sail_in1k/resolve/main/model.safetensors'


@pytest.mark.parametrize('url, name', [
    (TIMM_HUB_URL, 'poolformer_s12.sail_in1k.safetensors'),
    ('https://huggingface.co/timm/caformer_s18.sail_in1k/resolve/main/pytorch_model.bin',
     'caformer_s18.sail_in1k.bin'),
    (METAFORMER_RELEASE + 'caformer/caformer_s18.pth', 'caformer_s18.pth'),
    (S12_URL, 'poolformer_s12.pth.tar'),
])
def test_hub_files_are_kept_under_their_model_name(url, name):
    assert safe_checkpoints.checkpoint_file_name(url) == name


def test_timm_safetensors_from_the_hugging_face_hub_load_by_url(release, tmp_path):
    folder, requested = release
    source = _random_state(PoolFormer('s12'), seed=4)
    timm_state = {k: v.contiguous() for k, v in to_timm(source).items()}
    path = folder / urlparse(TIMM_HUB_URL).path.lstrip('/')
    path.parent.mkdir(parents=True)
    save_file(timm_state, str(path), metadata={'format': 'pt'})

    model = PoolFormer('s12', init_cfg=dict(type='Pretrained', checkpoint=TIMM_HUB_URL))
    model.init_weights()
    assert requested == [TIMM_HUB_URL]
    assert (_hub_cache(tmp_path) / _hashed(TIMM_HUB_URL,
                                           'poolformer_s12.sail_in1k.safetensors')).is_file()
    _assert_backbone_holds(model, source, papers_start=False)
