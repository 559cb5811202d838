"""Nothing of the user's is destroyed: no write through a symbolic link the run did not make,
no output over an input, a work-dir lock that holds whatever the environment says, downloads
that are all or nothing with one cache file per URL; and one line for each mistake below."""
import contextlib
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.runner.checkpoint import CheckpointLoader
from safetensors.torch import save_file

from poolformer_mm.apis.inference import draw_predictions
from poolformer_mm.cli.train_test import run_testing, run_training
from poolformer_mm.datasets import make_toy_ade
from poolformer_mm.engine import process_rank
from poolformer_mm.utils.errors import InvalidInputError, UserInputError, WorkDirInUseError

REPO = Path(__file__).resolve().parents[2]
TOY_FPN = 'configs/segmentation/toy/fpn_poolformer_s12_toy.py'


@pytest.fixture(scope='module')
def toy_ade(tmp_path_factory):
    return make_toy_ade(str(tmp_path_factory.mktemp('data') / 'ade'), num_train=2, num_val=2)


def _train_argv(work_dir, toy_ade, *options):
    return [TOY_FPN, '--work-dir', str(work_dir), '--data-root', str(toy_ade), '--cfg-options',
            'train_cfg.max_iters=1', 'train_cfg.val_interval=2', 'param_scheduler=[]',
            'train_dataloader.batch_size=2', *options]


def _victim(tmp_path):
    victim = tmp_path / 'victim.txt'
    victim.write_text('precious\n')
    return victim


def _run_tool(*args, **env):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def _one_line_error(result, *fragments):
    """The tool failed with one line on stderr, ``error: ...``, holding every fragment."""
    assert result.returncode == 1, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ')
    for fragment in fragments:
        assert fragment in last
    return last


# ------------------------------------------------------------------------ the work-dir lock
def test_a_symlinked_lock_is_refused_and_the_file_it_points_to_is_kept(tmp_path, toy_ade):
    victim = _victim(tmp_path)
    work_dir = tmp_path / 'wd'
    work_dir.mkdir()
    (work_dir / '.train.lock').symlink_to('../victim.txt')
    with pytest.raises(InvalidInputError, match=r"lock '.*wd/\.train\.lock' is a symbolic link "
                       r"\(to '\.\./victim\.txt'\).*Remove the link"):
        run_training(_train_argv(work_dir, toy_ade))
    assert victim.read_text() == 'precious\n'
    assert not list(work_dir.glob('*.pth'))


def test_a_lock_that_is_a_hard_link_is_locked_without_writing_through_it(tmp_path):
    from poolformer_mm.engine import WorkDirLock
    victim = _victim(tmp_path)
    work_dir = tmp_path / 'wd'
    work_dir.mkdir()
    os.link(victim, work_dir / '.train.lock')  # e.g. a `cp -al` backup of the work dir
    WorkDirLock(str(work_dir)).release()
    assert victim.read_text() == 'precious\n'


@pytest.mark.parametrize('tool', ['train', 'test'])
@pytest.mark.parametrize('link', ['symbolic', 'hard'])
def test_a_link_where_the_runner_copies_its_config_is_replaced_not_written_through(
        tmp_path, toy_ade, tool, link):
    victim = _victim(tmp_path)
    work_dir = tmp_path / 'wd'
    work_dir.mkdir()
    copy = work_dir / Path(TOY_FPN).name
    copy.symlink_to(victim) if link == 'symbolic' else os.link(victim, copy)
    if tool == 'train':
        run_training(_train_argv(work_dir, toy_ade))
    else:
        checkpoint = tmp_path / 'model.pth'
        checkpoint.write_bytes(b'not a checkpoint')  # refused after the runner copied the config
        with pytest.raises(UserInputError, match="refused to load '.*model.pth'"):
            run_testing([TOY_FPN, str(checkpoint), '--work-dir', str(work_dir),
                         '--data-root', str(toy_ade)])
    assert victim.read_text() == 'precious\n'
    assert not copy.is_symlink() and 'model = dict(' in copy.read_text()


def test_a_run_folder_named_for_a_time_to_come_is_refused(tmp_path, toy_ade):
    # made in advance with links for mmengine's log files, which it opens in place
    victim = _victim(tmp_path)
    run_folder = tmp_path / 'wd' / '20991231_235959' / 'vis_data'
    run_folder.mkdir(parents=True)
    (run_folder / 'scalars.json').symlink_to(victim)
    with pytest.raises(InvalidInputError, match=r"--work-dir: '.*wd/20991231_235959' is named for "
                       'a time to come'):
        run_training(_train_argv(tmp_path / 'wd', toy_ade))
    assert victim.read_text() == 'precious\n'


def test_a_config_run_from_its_own_work_dir_is_kept_as_written(tmp_path, toy_ade):
    work_dir = tmp_path / 'my_experiment'
    work_dir.mkdir()
    config = work_dir / 'mine.py'
    text = f"# my notes\n_base_ = '{REPO / TOY_FPN}'\n"
    config.write_text(text)
    argv = _train_argv(work_dir, toy_ade)
    argv[0] = str(config)
    run_training(argv)
    assert config.read_text() == text
    assert (work_dir / 'iter_1.pth').is_file()


def test_resume_without_a_path_refuses_a_newest_checkpoint_of_weights_only(tmp_path, toy_ade):
    work_dir = tmp_path / 'wd'
    work_dir.mkdir()
    torch.save({'state_dict': {'w': torch.zeros(1)}}, work_dir / 'iter_5.pth')
    with pytest.raises(InvalidInputError, match=r"no checkpoint to resume from .*iter_5\.pth' "
                       'holds weights but no training state'):
        run_training(_train_argv(work_dir, toy_ade) + ['--resume'])


@pytest.mark.parametrize('variable', ['RANK', 'SLURM_PROCID', 'OMPI_COMM_WORLD_RANK'])
def test_rank_variables_without_a_launcher_do_not_bypass_the_lock(tmp_path, toy_ade,
                                                                  monkeypatch, variable,
                                                                  lock_held_elsewhere):
    work_dir = tmp_path / 'wd'
    with lock_held_elsewhere(work_dir) as pid:
        monkeypatch.setenv(variable, '1')
        with pytest.raises(WorkDirInUseError, match=rf'in use by another training \(process '
                           rf'{pid}\)'):
            run_training(_train_argv(work_dir, toy_ade))
    assert not list(work_dir.glob('*.pth'))
    assert (work_dir / '.train.lock').read_text() == str(pid)


def test_the_rank_is_read_from_the_launchers_own_variable(monkeypatch):
    monkeypatch.setenv('RANK', '3')
    monkeypatch.setenv('SLURM_PROCID', '5')
    assert process_rank('none') == 0
    assert process_rank('pytorch') == 3
    assert process_rank('slurm') == 5


def test_two_trainings_writing_to_one_checkpoint_folder_stop_at_the_second(tmp_path, toy_ade,
                                                                           lock_held_elsewhere):
    # both work dirs are called 'run': with out_dir=shared, both would write shared/run/iter_1.pth
    with lock_held_elsewhere(tmp_path / 'shared' / 'run') as pid:
        with pytest.raises(WorkDirInUseError, match=rf"work dir '.*shared/run' is in use by "
                           rf'another training \(process {pid}\)'):
            run_training(_train_argv(tmp_path / 'b' / 'run', toy_ade,
                                     f'default_hooks.checkpoint.out_dir={tmp_path / "shared"}'))
    assert not list((tmp_path / 'shared' / 'run').glob('*.pth'))
    # the lock of the work dir taken before the checkpoint folder's was given back
    assert (tmp_path / 'b' / 'run' / '.train.lock').exists()
    from poolformer_mm.engine import WorkDirLock
    WorkDirLock(str(tmp_path / 'b' / 'run')).release()


def test_a_work_dir_that_cannot_be_written_is_one_line(toy_ade):
    # /sys refuses new files even to root, as a read-only mount would
    for run in (run_training, run_testing):
        argv = _train_argv('/sys/kernel/poolformer-mm-work', toy_ade)
        if run is run_testing:
            argv = [TOY_FPN, __file__, '--work-dir', '/sys/kernel/poolformer-mm-work',
                    '--data-root', toy_ade]
        with pytest.raises(InvalidInputError, match=r"--work-dir '/sys/kernel/poolformer-mm-work"
                           r"': cannot write there \(.+\); give a folder"):
            run(argv)


# ------------------------------------------------------------------- outputs never over inputs
def _photos(folder, count=2):
    import cv2
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        cv2.imwrite(str(folder / f'photo{i}.png'), rng.integers(0, 255, (64, 80, 3), np.uint8))
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize('inputs, out_dir', [
    (['photos'], 'photos'),                 # the input folder itself
    (['photos/photo0.png'], 'photos'),      # the folder of an input picture
    (['photos'], '.'),                      # a folder that holds the input folder
])
def test_infer_refuses_an_out_dir_that_is_or_holds_its_inputs(tmp_path, monkeypatch, inputs,
                                                             out_dir):
    monkeypatch.chdir(tmp_path)
    before = _photos(tmp_path / 'photos')
    with pytest.raises(InvalidInputError, match=rf"--out-dir '{out_dir}' is or contains the input"):
        draw_predictions(str(REPO / TOY_FPN), 'model.pth', inputs, out_dir)
    assert {p.name: p.read_bytes() for p in (tmp_path / 'photos').iterdir()} == before


def test_pictures_replace_a_link_in_the_out_dir_instead_of_writing_through_it(tmp_path):
    # tools/infer.py and --show-dir write through mmcv.imwrite, i.e. the atomic file backend
    import mmcv
    victim = _victim(tmp_path)
    (tmp_path / 'photo1.png').symlink_to(victim)
    mmcv.imwrite(np.zeros((4, 4, 3), np.uint8), str(tmp_path / 'photo1.png'))
    assert victim.read_text() == 'precious\n'
    assert not (tmp_path / 'photo1.png').is_symlink()


def test_infer_refuses_an_input_picture_that_links_into_the_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kept = _photos(tmp_path / 'out')
    (tmp_path / 'photos').mkdir()
    (tmp_path / 'photos' / 'photo0.png').symlink_to(tmp_path / 'out' / 'photo0.png')
    with pytest.raises(InvalidInputError, match="--out-dir 'out' is or contains the input"):
        draw_predictions(str(REPO / TOY_FPN), 'model.pth', ['photos'], 'out')
    assert {p.name: p.read_bytes() for p in (tmp_path / 'out').iterdir()} == kept


def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, toy_ade):
    with pytest.raises(InvalidInputError, match=r"--out-dir '/sys/kernel/poolformer-mm-out': "
                       'cannot write there'):
        draw_predictions(TOY_FPN, 'model.pth', [str(REPO / 'README.md')], '/sys/kernel/'
                         'poolformer-mm-out')
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'never read')
    with pytest.raises(InvalidInputError, match=r"--show-dir '/sys/kernel/poolformer-mm-out': "
                       'cannot write there'):
        run_testing([TOY_FPN, str(checkpoint), '--data-root', str(toy_ade), '--show-dir',
                     '/sys/kernel/poolformer-mm-out', '--work-dir', str(tmp_path / 'wd')])


def test_infer_tool_says_so_in_one_line(tmp_path):
    _photos(tmp_path / 'photos')
    result = _run_tool('tools/infer.py', TOY_FPN, 'model.pth', str(tmp_path / 'photos'),
                       '--out-dir', str(tmp_path / 'photos'))
    _one_line_error(result, '--out-dir', 'is or contains the input')


@pytest.mark.parametrize('flag, folder', [('--show-dir', 'images/validation'),
                                          ('--out', 'annotations/validation'),
                                          ('--show-dir', '.'),
                                          ('--show-dir', 'images/training')])
def test_test_outputs_never_go_over_the_data_set(tmp_path, toy_ade, flag, folder):
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'never read')
    output = os.path.normpath(os.path.join(toy_ade, folder))
    before = sorted(Path(toy_ade).rglob('*'))
    with pytest.raises(InvalidInputError, match=rf"{flag} '{output}' is or contains the input"):
        run_testing([TOY_FPN, str(checkpoint), '--data-root', str(toy_ade), flag, output,
                     '--work-dir', str(tmp_path / 'wd')])
    assert sorted(Path(toy_ade).rglob('*')) == before


@pytest.mark.parametrize('link', ['symbolic', 'hard'])
def test_segmentation_out_refuses_a_link_among_its_class_maps(tmp_path, toy_ade, link):
    # mmseg saves the class maps with Pillow, in place
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'never read')
    victim = _victim(tmp_path)
    (tmp_path / 'maps').mkdir()
    entry = tmp_path / 'maps' / 'ADE_validation_00000000.png'
    entry.symlink_to(victim) if link == 'symbolic' else os.link(victim, entry)
    with pytest.raises(InvalidInputError, match=f"--out: '.*ADE_validation_00000000.png' is a "
                       f'{link} link'):
        run_testing([TOY_FPN, str(checkpoint), '--data-root', str(toy_ade), '--out',
                     str(tmp_path / 'maps'), '--work-dir', str(tmp_path / 'wd')])
    assert victim.read_text() == 'precious\n'


# ------------------------------------------------------------------------------- downloads
def _checkpoint_bytes(tmp_path, seed=0):
    path = tmp_path / f'weights{seed}.pth'
    torch.manual_seed(seed)
    torch.save({'state_dict': {'w': torch.randn(64, 64)}}, path)
    return path.read_bytes()


@contextlib.contextmanager
def _serving(reply):
    """A loopback server whose every GET is answered by ``reply(handler)``; yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            reply(self)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05),
                              daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _cut_replies(body):
    half = body[:len(body) // 2]

    def no_length(handler):
        handler.send_response(200)
        handler.end_headers()
        handler.wfile.write(half)

    def understated_length(handler):
        handler.send_response(200)
        handler.send_header('Content-Length', str(len(half)))
        handler.end_headers()
        handler.wfile.write(body)

    def chunked_cut_off(handler):
        handler.protocol_version = 'HTTP/1.1'
        handler.send_response(200)
        handler.send_header('Transfer-Encoding', 'chunked')
        handler.end_headers()
        handler.wfile.write(b'%x\r\n' % len(half) + half + b'\r\n')  # then no last chunk

    def garbage_status_line(handler):
        handler.wfile.write(b'this is not HTTP\r\n\r\n')

    return dict(no_length=(no_length, 'not a readable PyTorch checkpoint'),
                understated_length=(understated_length, 'not a readable PyTorch checkpoint'),
                chunked_cut_off=(chunked_cut_off, 'IncompleteRead'),
                garbage_status_line=(garbage_status_line, 'BadStatusLine'))


@pytest.mark.parametrize('case', ['no_length', 'understated_length', 'chunked_cut_off',
                                  'garbage_status_line'])
def test_a_cut_or_broken_download_leaves_nothing_in_the_cache(tmp_path, monkeypatch, case):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.chdir(tmp_path)
    reply, said = _cut_replies(_checkpoint_bytes(tmp_path))[case]
    with _serving(reply) as base:
        url = f'{base}/poolformer_s12.pth.tar'
        with pytest.raises(UserInputError, match=rf"'{url}'.*{said}") as error:
            CheckpointLoader.load_checkpoint(url)
    assert '\n' not in str(error.value)
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    assert not cache.exists() or os.listdir(cache) == []


def test_a_web_page_instead_of_a_checkpoint_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.chdir(tmp_path)
    page = b'<!DOCTYPE html><html><body>Sign in to download</body></html>'
    with _serve_files({'/x.pth': page}) as base:
        with pytest.raises(UserInputError, match=r"refused to load .*or it is not a checkpoint"
                           r'.*nothing was kept'):
            CheckpointLoader.load_checkpoint(f'{base}/x.pth')
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    assert not cache.exists() or os.listdir(cache) == []


def test_a_local_rank_left_in_the_shell_does_not_stop_a_download(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.setenv('LOCAL_RANK', '1')  # without a distributed job: one process
    monkeypatch.chdir(tmp_path)
    with _serve_files({'/x.pth': _checkpoint_bytes(tmp_path, 3)}) as base:
        state = CheckpointLoader.load_checkpoint(f'{base}/x.pth')['state_dict']
    torch.manual_seed(3)
    assert torch.equal(state['w'], torch.randn(64, 64))


def _serve_files(files):
    """Serve ``{url path: bytes}``; a request for another path gets a 404."""
    def reply(handler):
        body = files.get(handler.path)
        handler.send_response(200 if body else 404)
        handler.send_header('Content-Length', str(len(body or b'')))
        handler.end_headers()
        handler.wfile.write(body or b'')
    return _serving(reply)


def _safetensors_bytes(tmp_path, value):
    path = tmp_path / f'{value}.safetensors'
    save_file({'w': torch.full((4, ), float(value))}, str(path))
    return path.read_bytes()


def test_hub_urls_of_another_owner_or_revision_are_other_cache_files(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.chdir(tmp_path)
    paths = {f'/{owner}/poolformer_s12.sail_in1k/resolve/{revision}/model.safetensors': value
             for value, (owner, revision) in enumerate([('timm', 'main'), ('owner2', 'main'),
                                                        ('timm', 'v2')], start=1)}
    with _serve_files({p: _safetensors_bytes(tmp_path, v) for p, v in paths.items()}) as base:
        for path, value in paths.items():
            assert CheckpointLoader.load_checkpoint(base + path)['w'][0] == value
        # and again from the cache, each its own
        for path, value in paths.items():
            assert CheckpointLoader.load_checkpoint(base + path)['w'][0] == value
    names = sorted(name.split('-', 1)[1] for name in
                   os.listdir(tmp_path / 'torch_home' / 'hub' / 'checkpoints'))
    assert names == ['owner2--poolformer_s12.sail_in1k--main.safetensors',
                     'poolformer_s12.sail_in1k.safetensors',
                     'timm--poolformer_s12.sail_in1k--v2.safetensors']


def test_two_urls_of_one_file_name_are_two_cache_files(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.chdir(tmp_path)
    first, second = _checkpoint_bytes(tmp_path, 1), _checkpoint_bytes(tmp_path, 2)
    with _serve_files({'/a/model.pth': first, '/b/model.pth': second}) as base:
        a = CheckpointLoader.load_checkpoint(f'{base}/a/model.pth')['state_dict']['w']
        b = CheckpointLoader.load_checkpoint(f'{base}/b/model.pth')['state_dict']['w']
        assert not torch.equal(a, b)
    # and each again, offline, from its own file
    assert torch.equal(CheckpointLoader.load_checkpoint(f'{base}/b/model.pth')['state_dict']['w'],
                       b)
    assert torch.equal(CheckpointLoader.load_checkpoint(f'{base}/a/model.pth')['state_dict']['w'],
                       a)
    names = os.listdir(tmp_path / 'torch_home' / 'hub' / 'checkpoints')
    assert len(names) == 2 and all(re.fullmatch(r'[0-9a-f]{8}-model\.pth', n) for n in names)


def test_a_cache_file_kept_before_urls_were_recorded_is_still_used(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    cache.mkdir(parents=True)
    (cache / 'poolformer_s12.sail_in1k.safetensors').write_bytes(_safetensors_bytes(tmp_path, 7))
    url = ('http://127.0.0.1:9/timm/poolformer_s12.sail_in1k/resolve/main/'
           'model.safetensors')  # port 9: nothing answers, the cached file must do
    assert CheckpointLoader.load_checkpoint(url)['w'][0] == 7


# -------------------------------------------------------------- one line per user mistake
@pytest.mark.parametrize('tool', ['tools/train.py', 'tools/test.py', 'tools/infer.py'])
def test_a_missing_config_file_is_one_line(tool):
    args = {'tools/train.py': [], 'tools/test.py': ['model.pth'],
            'tools/infer.py': ['model.pth', 'photo.png']}[tool]
    _one_line_error(_run_tool(tool, 'configs/no_such_config.py', *args),
                    "config file 'configs/no_such_config.py' not found")


def test_a_checkpoint_path_that_is_a_folder_is_one_line(tmp_path):
    _one_line_error(_run_tool('tools/test.py', TOY_FPN, str(tmp_path)),
                    f"checkpoint '{tmp_path}' is a folder")


def test_resume_from_weights_without_training_state_is_one_line(tmp_path, toy_ade):
    weights = tmp_path / 'weights.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}}, weights)
    with pytest.raises(InvalidInputError, match=rf"--resume '{weights}' holds no training state"
                       r'.*--cfg-options load_from=.* without --resume'):
        run_training(_train_argv(tmp_path / 'wd', toy_ade) + ['--resume', str(weights)])


def test_the_converter_never_writes_over_its_source_a_folder_or_through_a_link(tmp_path):
    source = tmp_path / 'weights.pth'
    torch.save({'w': torch.zeros(1)}, source)
    kept = source.read_bytes()
    victim = _victim(tmp_path)
    (tmp_path / 'link.pth').symlink_to(victim)
    for destination, said in ((source, 'is or contains the input'),
                              (tmp_path / 'link.pth', 'is a symbolic link'),
                              (tmp_path, 'is a folder')):
        result = _run_tool('tools/model_converters/convert_poolformer.py', str(source),
                           str(destination))
        _one_line_error(result, said)
    assert source.read_bytes() == kept and victim.read_text() == 'precious\n'


def test_a_port_that_is_not_a_number_is_one_line():
    result = subprocess.run(['bash', 'tools/dist_train.sh', TOY_FPN, '1'], cwd=REPO, text=True,
                            capture_output=True, timeout=60,
                            env={**os.environ, 'PORT': 'abc', 'PYTHON': sys.executable})
    assert result.returncode == 2
    assert result.stderr.strip() == 'dist_train.sh: PORT=abc is not a port number (1 .. 65535)'


@pytest.mark.parametrize('script, args', [('dist_train.sh', [TOY_FPN, '1']),
                                          ('dist_test.sh', [TOY_FPN, 'model.pth', '1'])])
def test_a_port_in_use_is_one_line_naming_it_and_how_to_choose_another(script, args):
    with socket.socket() as taken:
        taken.bind(('', 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(['bash', f'tools/{script}', *args], cwd=REPO, text=True,
                                capture_output=True, timeout=60,
                                env={**os.environ, 'PORT': str(port), 'PYTHON': sys.executable})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f'{script}: port {port} is in use on this machine (another distributed job?): choose '
        f'a free one, e.g. PORT={port + 1} {script} ...')
