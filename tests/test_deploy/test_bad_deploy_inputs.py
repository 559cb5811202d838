"""User mistakes with the deployment tools and the checkpoint converter: a damaged, foreign or
missing file, or an export whose metadata was edited, ends with exit code 1 and one line
``error: ...`` that names the file (and the metadata key), never a traceback."""
import json
import os
import pickle
import subprocess
import sys
from importlib.util import find_spec

import cv2
import numpy as np
import pytest
import torch

SEG_CONFIG = 'configs/segmentation/toy/fpn_poolformer_s12_toy.py'
DET_CONFIG = 'configs/detection/toy/retinanet_poolformer_s12_toy.py'
KEY = 'poolformer_mm.deploy'
CHANGED = ('it was changed after export; export the model again with '
           'tools/deployment/pytorch2onnx.py')

needs_onnx = pytest.mark.skipif(
    find_spec('onnx') is None or find_spec('onnxruntime') is None,
    reason='onnx / onnxruntime (the deploy extra: pip install -e .[deploy]) not installed')


def _run(*argv):
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True,
                          timeout=300)


def _error_line(result, *names):
    """The one ``error:`` line of a tool that exited 1; it names each of ``names``."""
    assert result.returncode == 1, result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[-1]
    assert line.startswith('error: '), result.stderr
    for name in names:
        assert str(name) in line, line
    return line


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
    """Small exports of the toy segmentor (dynamic) and RetinaNet (static), an image, and
    :func:`edited`'s folder."""
    from poolformer_mm.deploy.onnx import build_model, export_onnx
    folder = tmp_path_factory.mktemp('exports')
    paths = dict(folder=folder, image=folder / 'image.png')
    for task, config, dynamic in (('seg', SEG_CONFIG, True), ('det', DET_CONFIG, False)):
        torch.manual_seed(0)
        model, cfg = build_model(config)
        paths[task] = folder / f'{task}.onnx'
        export_onnx(model, cfg, str(paths[task]), (32, 32), dynamic=dynamic)
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    cv2.imwrite(str(paths['image']), pixels)
    return paths


def edited(exports, export, name, changes):
    """A copy of an export with its deploy metadata changed (a value of None removes the key)."""
    import onnx
    model = onnx.load(str(exports[export]))
    entry = next(p for p in model.metadata_props if p.key == KEY)
    info = json.loads(entry.value)
    for key, value in changes.items():
        if value is None:
            del info[key]
        else:
            info[key] = value
    entry.value = json.dumps(info)
    path = exports['folder'] / f'{name}.onnx'
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------- ort_infer.py
@needs_onnx
@pytest.mark.parametrize('task, changes, message', [
    ('seg', dict(dynamic=None), 'has no dynamic entry'),
    ('seg', dict(classes=['sky']), 'has 1 class names and 5 palette colours'),
    ('seg', dict(classes=['sky'], palette=None), 'the model outputs class'),
    ('det', dict(classes=['circle']), "has 1 class names, and the model's detection.num_classes "
                                      'is 3'),
    ('seg', dict(task='detection'), 'has task "detection" and outputs ["output"]'),
    ('det', dict(task='segmentation'), 'has task "segmentation" and outputs ["dets", "labels"]'),
    ('seg', dict(task='classification'), 'has task "classification", neither'),
    ('seg', dict(input_size=[0, 0]), 'has input_size [0, 0], not two positive integers'),
    ('det', dict(input_size=[-32, 32]), 'has input_size [-32, 32], not two positive integers'),
    ('seg', dict(input_size='32x32'), 'has input_size "32x32", not two positive integers'),
    ('det', dict(input_size=[64, 64]), 'has input_size [64, 64], and the model takes 32x32'),
], ids=['key-removed', 'classes-shortened', 'classes-shortened-no-palette',
        'detection-classes-shortened', 'task-other', 'task-other-detection', 'task-garbage',
        'size-0', 'size-negative', 'size-not-numbers', 'size-other'])
def test_ort_infer_refuses_edited_metadata_in_one_line(exports, task, changes, message):
    path = edited(exports, task, 'edited', changes)
    result = _run('tools/deployment/ort_infer.py', path, exports['image'], '--out',
                  exports['folder'] / 'out.png')
    line = _error_line(result, path, message)
    assert line.endswith(CHANGED)


@needs_onnx
@pytest.mark.parametrize('image, message', [
    ('missing.png', 'not found'), ('damaged.png', 'cannot be read'), ('.', 'is a folder')])
def test_ort_infer_names_an_image_it_cannot_read(exports, image, message):
    path = exports['folder'] / image
    (exports['folder'] / 'damaged.png').write_bytes(b'\x89PNG\r\n\x1a\n not an image')
    result = _run('tools/deployment/ort_infer.py', exports['seg'], path, '--out',
                  exports['folder'] / 'out.png')
    _error_line(result, f"image '{path}", message)


# --------------------------------------------------------------------------- quantize_onnx.py
@needs_onnx
@pytest.mark.parametrize('name, content, message', [
    ('truncated.onnx', 'half', 'it is truncated or not an ONNX model'),
    ('empty.onnx', b'', 'is empty'),
    ('text.onnx', b'name,score\nsky,1\n', 'it is truncated or not an ONNX model'),
    ('folder.onnx', 'folder', 'is a folder'),
    ('missing.onnx', None, 'not found'),
])
def test_quantize_names_a_model_file_it_cannot_use(exports, name, content, message):
    path = exports['folder'] / name
    if content == 'half':
        data = exports['seg'].read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif content == 'folder':
        path.mkdir(exist_ok=True)
    elif content is not None:
        path.write_bytes(content)
    result = _run('tools/deployment/quantize_onnx.py', path, exports['image'], '--out',
                  exports['folder'] / 'int8.onnx')
    _error_line(result, path, message)
    assert not (exports['folder'] / 'int8.onnx').exists()


# --------------------------------------------------------------------------- benchmark.py
@pytest.mark.slow
@needs_onnx
def test_benchmark_refuses_an_export_with_metadata_removed(exports):
    path = edited(exports, 'seg', 'no_dynamic', dict(dynamic=None))
    result = _run('tools/analysis/benchmark.py', '--repeat', '1', '--warmup', '0', '--config',
                  SEG_CONFIG, '--onnx', path)
    line = _error_line(result, path, f"{KEY!r} metadata has no dynamic entry")
    assert line.endswith(CHANGED)
    assert 'median' not in result.stdout


# --------------------------------------------------------------------------- convert_poolformer.py
class NotATensor:
    pass


class RunsCode:

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}', )


@pytest.mark.parametrize('kind, message', [
    ('class', 'refused to load'), ('reduce', 'refused to load'),
    ('truncated', 'is not a readable PyTorch checkpoint'), ('empty', 'not a readable'),
    ('folder', 'is a folder'), ('missing', 'not found')])
@pytest.mark.slow
def test_convert_names_a_checkpoint_it_cannot_use(tmp_path, kind, message):
    path, marker = tmp_path / f'{kind}.pth', tmp_path / 'code_ran'
    if kind == 'class':
        torch.save({'x': NotATensor()}, path)
    elif kind == 'reduce':
        path.write_bytes(pickle.dumps(RunsCode(marker)))
    elif kind == 'truncated':
        torch.save({'state_dict': {'w': torch.zeros(4096)}}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'folder':
        path.mkdir()
    result = _run('tools/model_converters/convert_poolformer.py', path, tmp_path / 'out.pth')
    _error_line(result, path, message)
    assert not marker.exists() and not (tmp_path / 'out.pth').exists()


@needs_onnx
def test_ort_infer_runs_the_unedited_export(exports):
    """The cases above edit copies; the static export itself passes the checks and runs."""
    out = exports['folder'] / 'fine.png'
    result = _run('tools/deployment/ort_infer.py', exports['det'], exports['image'], '--out', out)
    assert result.returncode == 0, result.stderr
    assert out.exists()


# ------------------------------------------------------------- outputs never replace inputs
@needs_onnx
def test_ort_infer_and_quantize_refuse_to_write_over_an_input_or_through_a_link(exports):
    image_bytes, model_bytes = exports['image'].read_bytes(), exports['seg'].read_bytes()
    result = _run('tools/deployment/ort_infer.py', exports['seg'], exports['image'], '--out',
                  exports['image'])
    _error_line(result, exports['image'], 'is one of the inputs')
    link = exports['folder'] / 'link.png'
    victim = exports['folder'] / 'victim.txt'
    victim.write_text('precious\n')
    link.symlink_to(victim)
    result = _run('tools/deployment/ort_infer.py', exports['seg'], exports['image'], '--out', link)
    _error_line(result, link, 'is a symbolic link')
    result = _run('tools/deployment/quantize_onnx.py', exports['seg'], exports['image'], '--out',
                  exports['seg'])
    _error_line(result, exports['seg'], 'is one of the inputs')
    assert exports['image'].read_bytes() == image_bytes
    assert exports['seg'].read_bytes() == model_bytes and victim.read_text() == 'precious\n'
