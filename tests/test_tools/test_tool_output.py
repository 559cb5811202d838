"""What the command-line tools print: pictures where --show-dir says, rounded metrics, errors
without tracebacks, and no start-up warnings nobody can act on."""
import os.path as osp
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from poolformer_mm.cli.train_test import config_for_testing, format_metrics, test_parser

REPO = Path(__file__).resolve().parents[2]
TOY_FPN = 'configs/segmentation/toy/fpn_poolformer_s12_toy.py'


@pytest.fixture
def toy_ade(tmp_path):
    from poolformer_mm.datasets import make_toy_ade
    return make_toy_ade(str(tmp_path / 'ade'), num_train=1, num_val=2)


def test_seg_show_dir_uses_the_pictures_hook_with_that_folder(toy_ade, tmp_path):
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'')  # only the path is checked when building the config
    args = test_parser().parse_args([TOY_FPN, str(checkpoint), '--data-root', toy_ade,
                                     '--show-dir', 'pics'])
    cfg = config_for_testing(args)
    assert dict(type='SegPicturesHook', out_dir=osp.abspath('pics')) in cfg.custom_hooks
    # mmseg's own hook would write a second, nested copy of every picture
    assert cfg.default_hooks.visualization.draw is False
    assert 'save_dir' not in cfg.visualizer


def test_seg_pictures_hook_writes_one_png_per_image_directly_in_the_folder(toy_ade, tmp_path):
    import cv2
    import torch
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    from mmseg.visualization import SegLocalVisualizer

    from poolformer_mm.engine import SegPicturesHook

    visualizer = SegLocalVisualizer.get_instance('test_seg_pictures_hook', vis_backends=[
        dict(type='LocalVisBackend')], save_dir=str(tmp_path / 'backend'))
    visualizer.dataset_meta = dict(classes=('a', 'b', 'c'), palette=[[255, 0, 0], [0, 255, 0],
                                                                    [0, 0, 255]])
    samples = []
    for name in ('ADE_validation_00000001.jpg', 'ADE_validation_00000002.jpg'):
        path = osp.join(toy_ade, 'images', 'validation', name)
        height, width = cv2.imread(path).shape[:2]
        sample = SegDataSample(metainfo=dict(img_path=path))
        sample.pred_sem_seg = PixelData(data=torch.randint(0, 3, (1, height, width)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 3, (1, height, width)))
        samples.append(sample)

    class Runner:
        pass

    runner = Runner()
    runner.visualizer = visualizer
    out_dir = tmp_path / 'pictures'
    hook = SegPicturesHook(out_dir=str(out_dir))
    hook.before_test(runner)
    hook.after_test_iter(runner, 0, None, samples)
    assert sorted(p.name for p in out_dir.iterdir()) == [
        'ADE_validation_00000001.png', 'ADE_validation_00000002.png']
    picture = cv2.imread(str(out_dir / 'ADE_validation_00000001.png'))
    # ground truth | prediction, side by side
    assert picture.shape[0] == height and picture.shape[1] >= 2 * width
    assert not (tmp_path / 'backend').exists()


def test_metrics_are_printed_rounded_as_the_upstream_tables():
    seg = {'mIoU': 98.33000183105469, 'aAcc': 99.1, 'mAcc': 98.99999237060547}
    assert format_metrics(seg, 'mmseg') == 'aAcc 99.10, mAcc 99.00, mIoU 98.33'
    det = {'coco/bbox_mAP': 0.5123000144958496, 'coco/bbox_mAP_50': 0.9}
    assert format_metrics(det, 'mmdet') == 'coco/bbox_mAP 0.512, coco/bbox_mAP_50 0.900'


def test_known_warnings_are_ignored_only_from_their_library():
    from poolformer_mm.utils.known_warnings import ignore_known_warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ignore_known_warnings()
        for module in ('mmseg.models.builder', 'my_project.losses'):
            warnings.warn_explicit('``build_loss`` would be deprecated soon', UserWarning,
                                   'builder.py', 1, module=module)
        warnings.warn_explicit('something new from mmseg', UserWarning, 'builder.py', 2,
                               module='mmseg.models.builder')
    assert [(str(w.message), w.lineno) for w in caught] == [
        ('``build_loss`` would be deprecated soon', 1), ('something new from mmseg', 2)]


def test_the_data_error_points_to_a_readme_section_that_exists():
    from mmengine.config import Config

    from poolformer_mm.datasets.checks import check_data_roots, override_data_root
    cfg = Config.fromfile(TOY_FPN)
    override_data_root(cfg, '/nonexistent/ade')
    with pytest.raises(FileNotFoundError) as error:
        check_data_roots(cfg)
    section = re.search(r'see the README, "([^"]+)"', str(error.value))[1]
    headings = re.findall(r'^#+ (.+)$', (REPO / 'README.md').read_text(), re.M)
    assert section in headings


@pytest.mark.slow
def test_a_tool_error_is_one_message_without_traceback_or_startup_warnings(tmp_path):
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'0')
    result = subprocess.run(
        [sys.executable, 'tools/test.py', TOY_FPN, str(checkpoint), '--data-root',
         str(tmp_path / 'missing')], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: data root '{tmp_path / 'missing'}/' not found")
    assert 'Traceback' not in result.stderr
    assert 'pkg_resources' not in result.stdout + result.stderr


TOY_RETINANET = 'configs/detection/toy/retinanet_poolformer_s12_toy.py'


@pytest.mark.parametrize('config, out, message', [
    (TOY_RETINANET, 'dets.txt', '--out dets.txt: detection writes a .pkl or .pickle file'),
    (TOY_RETINANET, '{tmp}/model.pth/dets.pkl', '--out {tmp}/model.pth/dets.pkl: '
                                                '{tmp}/model.pth is a file, not a folder'),
    (TOY_RETINANET, '', "--out '': give a path, or leave --out out"),
    (TOY_FPN, '{tmp}/maps.pkl', '--out {tmp}/maps.pkl: segmentation writes a folder of class '
                                'maps (PNG), not a .pkl file; give a folder'),
    (TOY_RETINANET, '{tmp}/dets.pkl', '--out {tmp}/dets.pkl is a folder; detection writes '
                                      'one .pkl file'),
    (TOY_RETINANET, '/proc/nope/dets.pkl', '--out /proc/nope/dets.pkl: cannot write in '
                                           '/proc/nope ('),
    (TOY_FPN, '{tmp}/model.pth', '--out {tmp}/model.pth is a file; segmentation writes a '
                                 'folder of class maps there'),
    (TOY_FPN, '/proc/nope/maps', '--out /proc/nope/maps: cannot write in /proc/nope/maps (')])
def test_an_out_that_cannot_be_written_is_refused_before_the_test_runs(tmp_path, config, out,
                                                                       message):
    from poolformer_mm.utils.errors import InvalidInputError
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'')  # only the path is checked when building the config
    out, message = out.format(tmp=tmp_path), message.format(tmp=tmp_path)
    (tmp_path / 'dets.pkl').mkdir()
    args = test_parser().parse_args([config, str(checkpoint), '--out', out])
    with pytest.raises(InvalidInputError) as error:
        config_for_testing(args)
    assert str(error.value).startswith(message), str(error.value)


@pytest.mark.parametrize('config, out', [(TOY_FPN, 'new/maps'), (TOY_RETINANET, 'new/d.pkl')])
def test_the_out_check_leaves_nothing_behind(tmp_path, config, out):
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'')
    args = test_parser().parse_args([config, str(checkpoint), '--out', str(tmp_path / out),
                                     '--data-root', str(tmp_path / 'no_data')])
    with pytest.raises(FileNotFoundError, match='data root'):  # checked after --out
        config_for_testing(args)
    # the folders made to probe --out are gone again; the writers make them when they write
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.pth']


def test_only_the_first_process_probes_where_out_is_written(tmp_path, monkeypatch):
    """In a distributed run the probe's folders would race between processes; rank 0 probes,
    and it is the one that writes the detection dump."""
    from poolformer_mm.cli.train_test import check_test_out
    monkeypatch.setenv('RANK', '1')
    check_test_out('/proc/nope/dets.pkl', 'mmdet', 'pytorch')  # rank 0 reports it
    with pytest.raises(Exception, match='detection writes a .pkl'):  # checks of the name stay
        check_test_out(str(tmp_path / 'dets.txt'), 'mmdet', 'pytorch')
    # without a launcher the process is rank 0 of 1, whatever RANK says
    with pytest.raises(Exception, match='cannot write in /proc/nope'):
        check_test_out('/proc/nope/dets.pkl', 'mmdet')
    monkeypatch.setenv('RANK', '0')
    with pytest.raises(Exception, match='cannot write in /proc/nope'):
        check_test_out('/proc/nope/dets.pkl', 'mmdet', 'pytorch')
