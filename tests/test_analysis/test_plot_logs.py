"""tools/analysis/plot_logs.py: loss and metric curves from mmengine's json logs."""
import importlib.util
import json
from pathlib import Path

import cv2
import pytest

from poolformer_mm.analysis.log_curves import (
    extract_curves,
    find_json_log,
    plot_work_dirs,
    read_json_log,
)
from poolformer_mm.utils.errors import InputNotFoundError, InvalidInputError

REPO = Path(__file__).resolve().parents[2]

# The lines mmengine's LoggerHook writes (shortened): an iteration-based mmseg run, logging every
# 5 iterations and validating every 10 (``log_metric_by_epoch=False``: ``step`` is the iteration)
SEG_LINES = [
    dict(lr=2e-4, data_time=0.04, loss=1.40, **{'decode.loss_ce': 1.40}, time=6.4, iter=5, step=5),
    dict(lr=5e-4, data_time=0.03, loss=1.22, **{'decode.loss_ce': 1.22}, time=5.1, iter=10,
         step=10),
    dict(aAcc=74.99, mIoU=56.93, mAcc=74.99, data_time=0.007, time=0.46, step=10),
    dict(lr=7e-4, data_time=0.03, loss=0.94, **{'decode.loss_ce': 0.94}, time=4.4, iter=15,
         step=15),
    dict(lr=1e-3, data_time=0.04, loss=0.80, **{'decode.loss_ce': 0.80}, time=5.0, iter=20,
         step=20),
    dict(aAcc=77.58, mIoU=65.93, mAcc=78.77, data_time=0.009, time=1.09, step=20),
]
# an epoch-based mmdet run of 4 iterations per epoch, logging every 2, validating every epoch
# (``step`` is the epoch)
DET_LINES = [
    dict(lr=1e-5, loss=6.48, loss_cls=1.20, loss_bbox=0.21, time=8.9, epoch=1, iter=2, step=2),
    dict(lr=2e-5, loss=6.56, loss_cls=1.01, loss_bbox=0.18, time=12.2, epoch=1, iter=4, step=4),
    {'coco/bbox_mAP': 0.011, 'coco/bbox_mAP_50': 0.05, 'coco/bbox_mAP_l': -1.0,
     'coco/bbox_mAP_copypaste': '0.011 0.050', 'time': 8.2, 'step': 1},
    dict(lr=3e-5, loss=5.53, loss_cls=0.82, loss_bbox=0.19, time=14.7, epoch=2, iter=6, step=6),
    dict(lr=5e-5, loss=5.00, loss_cls=0.74, loss_bbox=0.19, time=14.6, epoch=2, iter=8, step=8),
    {'coco/bbox_mAP': 0.113, 'coco/bbox_mAP_50': 0.31, 'coco/bbox_mAP_l': -1.0,
     'coco/bbox_mAP_copypaste': '0.113 0.310', 'time': 5.5, 'step': 2},
]


def _write_run(work_dir, timestamp, lines, name=None, tail=''):
    log = work_dir / timestamp / 'vis_data' / (name or f'{timestamp}.json')
    log.parent.mkdir(parents=True)
    log.write_text(''.join(json.dumps(line) + '\n' for line in lines) + tail)
    return log


@pytest.fixture
def seg_dir(tmp_path):
    _write_run(tmp_path / 'seg', '20250101_120000', SEG_LINES)
    return tmp_path / 'seg'


@pytest.fixture
def det_dir(tmp_path):
    _write_run(tmp_path / 'det', '20250102_080000', DET_LINES)
    return tmp_path / 'det'


def _series(curves):
    return {curve.key: (curve.phase, curve.x_label, curve.x, curve.y) for curve in curves}


def test_seg_log_gives_loss_and_metrics_against_the_iteration(seg_dir):
    curves = extract_curves(read_json_log(find_json_log(str(seg_dir))))
    assert _series(curves) == {
        'loss': ('train', 'iteration', [5, 10, 15, 20], [1.40, 1.22, 0.94, 0.80]),
        'mIoU': ('val', 'iteration', [10, 20], [56.93, 65.93]),
        'aAcc': ('val', 'iteration', [10, 20], [74.99, 77.58]),
    }


def test_det_log_gives_loss_by_iteration_and_map_by_epoch(det_dir):
    curves = extract_curves(read_json_log(find_json_log(str(det_dir))))
    assert _series(curves) == {
        'loss': ('train', 'iteration', [2, 4, 6, 8], [6.48, 6.56, 5.53, 5.00]),
        'coco/bbox_mAP': ('val', 'epoch', [1, 2], [0.011, 0.113]),
        'coco/bbox_mAP_50': ('val', 'epoch', [1, 2], [0.05, 0.31]),
    }


def test_validation_by_iteration_in_an_epoch_based_run_is_drawn_by_iteration(tmp_path):
    # log_metric_by_epoch=False in an epoch-based run: step counts iterations
    lines = [{**line, 'step': 4 * line['step']} if 'iter' not in line else line
             for line in DET_LINES]
    _write_run(tmp_path, '20250102_080000', lines)
    (curve, ) = extract_curves(read_json_log(find_json_log(str(tmp_path))), ['bbox_mAP'])
    assert (curve.x_label, curve.x) == ('iteration', [4, 8])


def test_keys_are_found_without_their_prefix_as_in_mmdet_tools(det_dir, seg_dir):
    det = extract_curves(read_json_log(find_json_log(str(det_dir))), ['bbox_mAP', 'loss_cls'])
    assert [(c.key, c.y) for c in det] == [('coco/bbox_mAP', [0.011, 0.113]),
                                          ('loss_cls', [1.20, 1.01, 0.82, 0.74])]
    (seg, ) = extract_curves(read_json_log(find_json_log(str(seg_dir))), ['loss_ce'])
    assert (seg.key, seg.y) == ('decode.loss_ce', [1.40, 1.22, 0.94, 0.80])


def test_newest_training_run_is_read_and_a_later_test_run_passed_over(tmp_path):
    _write_run(tmp_path, '20250101_090000', SEG_LINES[:2])
    newest = _write_run(tmp_path, '20250101_100000', SEG_LINES[:4], name='scalars.json')
    # tools/test.py in the same work dir: a newer run folder without training lines
    _write_run(tmp_path, '20250101_110000', [dict(aAcc=70.0, mIoU=50.0, step=0)])
    (tmp_path / '20250101_120000').mkdir()  # a run that failed before writing any log
    assert find_json_log(str(tmp_path)) == str(newest)
    assert find_json_log(str(newest)) == str(newest)


def test_a_last_line_cut_short_is_left_out_and_a_bad_line_named(tmp_path):
    log = _write_run(tmp_path, '20250101_090000', SEG_LINES, tail='{"lr": 0.001, "lo')
    assert len(read_json_log(str(log)).train) == 4
    log.write_text('{"lr": 1}\nnot json\n{"lr": 2}\n')
    with pytest.raises(InvalidInputError, match=rf"line 2 of '{log}' is not json"):
        read_json_log(str(log))


def test_unknown_key_is_refused_listing_the_keys_of_the_log(seg_dir):
    log = read_json_log(find_json_log(str(seg_dir)))
    with pytest.raises(InvalidInputError) as error:
        extract_curves(log, ['loss', 'bbox_mAP'])
    assert str(error.value) == (
        f"key 'bbox_mAP' is not in the log '{log.path}'. Its keys are: training: lr, data_time, "
        'loss, decode.loss_ce, time; validation: aAcc, mIoU, mAcc, data_time, time')


def test_work_dir_without_json_log_is_refused_saying_what_is_expected(tmp_path):
    (tmp_path / '20250101_090000' / 'vis_data').mkdir(parents=True)
    with pytest.raises(InputNotFoundError, match=rf"no json log in work dir '{tmp_path}': "
                       r'expected <timestamp>/vis_data/<timestamp>.json \(or scalars.json\)'):
        find_json_log(str(tmp_path))
    with pytest.raises(InputNotFoundError, match=f"work dir '{tmp_path / 'nothing'}' not found"):
        find_json_log(str(tmp_path / 'nothing'))


def test_png_of_two_runs_goes_to_the_first_work_dir_by_default(det_dir, seg_dir):
    out, curves = plot_work_dirs([str(det_dir), str(seg_dir)])
    assert out == str(det_dir / 'curves.png')
    image = cv2.imread(out)
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
    # three panels: training by iteration, mmdet validation by epoch, mmseg's by iteration
    assert image.shape[1] > 2.5 * image.shape[0]
    assert [(c.run, c.key) for c in curves] == [
        ('det', 'loss'), ('det', 'coco/bbox_mAP'), ('det', 'coco/bbox_mAP_50'),
        ('seg', 'loss'), ('seg', 'mIoU'), ('seg', 'aAcc')]


def test_legend_needs_one_name_per_work_dir(det_dir, seg_dir):
    with pytest.raises(InvalidInputError, match='--legend needs one name per work dir: got 1 '
                       'names for 2 work dirs'):
        plot_work_dirs([str(det_dir), str(seg_dir)], legend=['only'])


def _tool():
    spec = importlib.util.spec_from_file_location('plot_logs',
                                                  REPO / 'tools/analysis/plot_logs.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_writes_the_png_it_prints(seg_dir, tmp_path, capsys):
    out = tmp_path / 'plots' / 'seg.png'
    _tool().main([str(seg_dir), '--keys', 'loss', 'mIoU', '--out', str(out), '--title', 'toy'])
    assert capsys.readouterr().out == f'wrote curves of loss, mIoU to {out}\n'
    assert cv2.imread(str(out)).size > 0


def test_tool_reports_a_bad_key_without_traceback(seg_dir):
    with pytest.raises(SystemExit) as exit_info:
        _tool().main([str(seg_dir), '--keys', 'mAP'])
    assert str(exit_info.value).startswith("error: key 'mAP' is not in the log")
