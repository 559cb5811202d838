"""ONNX export of the toy Semantic FPN and the toy RetinaNet, checked in ONNX Runtime.

Random weights saved as mmengine checkpoints (no training), 64x64 exports with dynamic axes,
agreement with PyTorch at the export size and at a second one. Mask R-CNN: test_onnx_mask_rcnn.py.
"""
import glob
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from poolformer_mm.cli import export as cli
from poolformer_mm.datasets.synthetic import make_toy_ade, make_toy_coco
from poolformer_mm.deploy.onnx import build_model, export_onnx, verify_onnx
from poolformer_mm.deploy.onnx.export import ExportPoolFormerBlock, check_plain_ops
from poolformer_mm.deploy.onnx.postprocess import normalize, read_deploy_info
from poolformer_mm.deploy.onnx.verify import compare, load_input, ort_session, run_torch
from poolformer_mm.utils.errors import InvalidInputError

# poolformer_mm.deploy.onnx imports onnx and onnxruntime only when it uses them
pytestmark = pytest.mark.skipif(
    find_spec('onnx') is None or find_spec('onnxruntime') is None,
    reason='onnx / onnxruntime (the deploy extra: pip install -e .[deploy]) not installed')

SEG_CONFIG = 'configs/segmentation/toy/fpn_poolformer_s12_toy.py'
DET_CONFIG = 'configs/detection/toy/retinanet_poolformer_s12_toy.py'
SHAPE = (64, 64)
SECOND_SHAPE = (96, 128)


def _save_checkpoint(model, path):
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return str(path)


@pytest.fixture(scope='module')
def toy_images(tmp_path_factory):
    root = tmp_path_factory.mktemp('toy')
    make_toy_ade(str(root / 'ade'), num_train=0, num_val=1)
    make_toy_coco(str(root / 'coco'), num_train=0, num_val=1)
    return dict(segmentation=glob.glob(str(root / 'ade/images/validation/*.jpg'))[0],
                detection=glob.glob(str(root / 'coco/val2017/*.png'))[0])


@pytest.fixture(scope='module')
def segmentor(tmp_path_factory):
    """(PyTorch model loaded from a checkpoint, its config, the exported file)."""
    folder = tmp_path_factory.mktemp('seg')
    torch.manual_seed(0)
    checkpoint = _save_checkpoint(build_model(SEG_CONFIG)[0], folder / 'seg.pth')
    model, cfg = build_model(SEG_CONFIG, checkpoint)
    path = str(folder / 'seg.onnx')
    export_onnx(build_model(SEG_CONFIG, checkpoint)[0], cfg, path, SHAPE, dynamic=True,
                with_logits=True)
    return model, cfg, path, checkpoint


@pytest.fixture(scope='module')
def detector(tmp_path_factory):
    folder = tmp_path_factory.mktemp('det')
    torch.manual_seed(0)
    model = build_model(DET_CONFIG)[0]
    # A fresh head scores every anchor about 0.01 (its prior), below score_thr, and nearly
    # equal scores make the order of NMS arbitrary: spread them, around score_thr, so that an
    # image has some tens of detections at 64x64 (fewer than max_per_img, 100).
    with torch.no_grad():
        model.bbox_head.retina_cls.weight.normal_(0, 0.03)
        model.bbox_head.retina_cls.bias.fill_(-4.0)
    checkpoint = _save_checkpoint(model, folder / 'det.pth')
    model, cfg = build_model(DET_CONFIG, checkpoint)
    path = str(folder / 'det.onnx')
    export_onnx(build_model(DET_CONFIG, checkpoint)[0], cfg, path, SHAPE, dynamic=True)
    return model, cfg, path, checkpoint


def test_export_block_matches_the_folded_deploy_block():
    from poolformer_mm.models.layers.blocks import DeployPoolFormerBlock, MetaFormerBlock
    from poolformer_mm.models.layers.mixers import PoolingMixer
    torch.manual_seed(0)
    block = MetaFormerBlock(32, token_mixer=PoolingMixer(32), layer_scale_init_value=0.5).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        deploy = DeployPoolFormerBlock(block)
        tokens = torch.randn(2, 7, 9, 32) * 3 + 1
        expected = deploy.forward_tokens(tokens.clone())
        actual = ExportPoolFormerBlock(deploy).forward_tokens(tokens.clone())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_exported_graphs_use_standard_onnx_ops_only(segmentor, detector):
    import onnx
    for path in (segmentor[2], detector[2]):
        graph = onnx.load(path).graph
        assert {node.domain for node in graph.node} <= {'', 'ai.onnx'}
        assert [value.name for value in graph.input] == ['input']


def test_check_plain_ops_names_a_private_op():
    import onnx
    from onnx import helper
    node = helper.make_node('_linear_pointwise', ['x'], ['y'], domain='mkldnn')
    graph = helper.make_graph([node], 'g', [helper.make_tensor_value_info('x', 1, [1])],
                              [helper.make_tensor_value_info('y', 1, [1])])
    with pytest.raises(RuntimeError, match='mkldnn::_linear_pointwise'):
        check_plain_ops(onnx.helper.make_model(graph))


def test_metadata_holds_what_the_runtime_needs(segmentor, detector):
    seg = read_deploy_info(ort_session(segmentor[2]).get_modelmeta().custom_metadata_map)
    assert seg['task'] == 'segmentation' and seg['dynamic'] and seg['input_size'] == [64, 64]
    assert seg['classes'] == ['sky', 'tree', 'grass', 'water', 'road']
    assert seg['to_rgb'] and seg['mean'] == pytest.approx([123.675, 116.28, 103.53])
    assert seg['outputs'] == ['output', 'logits'] and seg['backbone_folded']
    det = read_deploy_info(ort_session(detector[2]).get_modelmeta().custom_metadata_map)
    assert det['classes'] == ['circle', 'square', 'triangle']
    assert det['detection']['test_cfg'] == dict(score_thr=0.05, nms_pre=1000, min_bbox_size=0,
                                                iou_threshold=0.5, class_agnostic=True,
                                                max_per_img=100)
    assert det['outputs'] == ['dets', 'labels']


def test_normalize_matches_the_data_preprocessor(segmentor, toy_images):
    import cv2
    model, _, path, _ = segmentor
    info = read_deploy_info(ort_session(path).get_modelmeta().custom_metadata_map)
    image = cv2.imread(toy_images['segmentation'])
    data = model.data_preprocessor(
        dict(inputs=[torch.from_numpy(image.transpose(2, 0, 1).copy())]), False)
    height, width = image.shape[:2]
    expected = data['inputs'][:, :, :height, :width].numpy()
    np.testing.assert_allclose(normalize(image, info), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [SHAPE, SECOND_SHAPE], ids=['export_size', 'second_size'])
def test_segmentor_agrees_with_pytorch_in_onnx_runtime(segmentor, toy_images, shape):
    model, _, path, _ = segmentor
    result = verify_onnx(path, model, toy_images['segmentation'], shape)
    assert result['shape'] == list(shape)
    assert result['pixel_agreement'] >= 0.999
    assert result['logits_rel'] <= 1e-4
    assert result['ok']


def test_segmentor_outputs_int64_class_indices_at_input_size(segmentor, toy_images):
    session = ort_session(segmentor[2])
    info = read_deploy_info(session.get_modelmeta().custom_metadata_map)
    inputs = np.concatenate([load_input(toy_images['segmentation'], info, SECOND_SHAPE)] * 2)
    output, logits = session.run(None, {'input': inputs})
    assert output.dtype == np.int64 and output.shape == (2, 1, *SECOND_SHAPE)
    assert logits.shape == (2, 5, *SECOND_SHAPE)
    np.testing.assert_array_equal(output[:, 0], logits.argmax(1))


@pytest.mark.parametrize('shape', [SHAPE, SECOND_SHAPE], ids=['export_size', 'second_size'])
def test_retinanet_agrees_with_pytorch_in_onnx_runtime(detector, toy_images, shape):
    model, _, path, _ = detector
    result = verify_onnx(path, model, toy_images['detection'], shape)
    assert result['detections_torch'] > 10  # the comparison covers real boxes
    assert result['detections_onnx'] == result['detections_torch']
    assert result['unmatched'] == 0
    assert result['box_rel'] <= 1e-3 and result['score_abs'] <= 1e-4
    assert result['ok']


def test_retinanet_outputs_padded_detections_for_each_image(detector, toy_images):
    """A batch of two images (the second flipped): each image's rows are its own detections,
    best first, then zeros with label -1 up to max_per_img."""
    model, _, path, _ = detector
    session = ort_session(path)
    info = read_deploy_info(session.get_modelmeta().custom_metadata_map)
    image = load_input(toy_images['detection'], info, SHAPE)
    inputs = np.concatenate([image, image[..., ::-1]])
    dets, labels = session.run(None, {'input': inputs})
    assert dets.shape == (2, 100, 5) and labels.shape == (2, 100) and labels.dtype == np.int64
    for i in range(2):
        expected = run_torch(model, np.ascontiguousarray(inputs[i:i + 1]), 'detection')
        count = len(expected['dets'])
        assert 10 < count < 100
        np.testing.assert_allclose(dets[i, :count], expected['dets'], rtol=1e-4, atol=1e-3)
        np.testing.assert_array_equal(labels[i, :count], expected['labels'])
        assert (dets[i, count:] == 0).all() and (labels[i, count:] == -1).all()
    assert np.all(np.diff(dets[0, :, 4]) <= 0)


def test_nms_is_in_the_graph(detector):
    import onnx
    ops = {node.op_type for node in onnx.load(detector[2]).graph.node}
    assert {'NonMaxSuppression', 'TopK'} <= ops


def test_compare_fails_over_tolerance():
    output = np.zeros((1, 1, 10, 100), np.int64)
    changed = output.copy()
    changed[0, 0, 0, :2] = 1  # 0.2% of the pixels
    assert not compare(dict(output=changed), dict(output=output), 'segmentation')['ok']
    dets = np.array([[0, 0, 10, 10, 0.9], [20, 20, 40, 40, 0.8]], np.float32)
    labels = np.array([0, 1])
    shifted = dets.copy()
    shifted[1, 2] += 0.1  # 0.1 px on a 40 px coordinate: 2.5e-3 relative
    result = compare(dict(dets=shifted, labels=labels), dict(dets=dets, labels=labels),
                     'detection')
    assert result['box_rel'] == pytest.approx(0.1 / 40, rel=1e-3) and not result['ok']
    fewer = compare(dict(dets=dets[:1], labels=labels[:1]), dict(dets=dets, labels=labels),
                    'detection')
    assert fewer['unmatched'] == 1 and not fewer['ok']
    none = compare(dict(dets=dets[:0], labels=labels[:0]), dict(dets=dets, labels=labels),
                   'detection')
    assert none['unmatched'] == 2 and not none['ok']


def test_two_stage_detector_with_soft_nms_is_refused_with_the_reason():
    model, cfg = build_model('configs/detection/toy/mask_rcnn_poolformer_s12_toy.py',
                             cfg_options={'model.test_cfg.rcnn.nms.type': 'soft_nms'})
    with pytest.raises(InvalidInputError, match=r'MaskRCNN is not supported: .*plain NMS'):
        export_onnx(model, cfg, 'unused.onnx', SHAPE)


def test_pytorch2onnx_verifies_a_static_export(segmentor, toy_images, tmp_path, capsys):
    out = tmp_path / 'seg_static.onnx'
    code = cli.main([SEG_CONFIG, segmentor[3], '--out', str(out), '--shape', '64', '64',
                     '--verify', '--image', toy_images['segmentation']])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert 'input 64x64, outputs output, backbone folded' in printed
    assert 'class maps agree on' in printed and ': OK' in printed


@pytest.mark.slow
@pytest.mark.parametrize('task', ['segmentation', 'detection'])
def test_ort_infer_draws_without_torch(segmentor, detector, toy_images, tmp_path, task):
    import cv2
    path = (segmentor if task == 'segmentation' else detector)[2]
    picture = tmp_path / 'picture.png'
    # run the tool's main in a fresh interpreter, then report whether torch got imported
    code = ('import runpy, sys\n'
            f'sys.argv = ["ort_infer.py", {path!r}, {toy_images[task]!r}, "--out", '
            f'{str(picture)!r}, "--score-thr", "0.05", "--threads", "1"]\n'
            'runpy.run_path("tools/deployment/ort_infer.py", run_name="__main__")\n'
            'print("torch imported:", "torch" in sys.modules)\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'torch imported: False' in result.stdout
    image, drawn = cv2.imread(toy_images[task]), cv2.imread(str(picture))
    assert drawn.shape == image.shape
    assert (drawn != image).any()  # an overlay or boxes were drawn
    expected = 'classes present:' if task == 'segmentation' else 'detections >= 0.05'
    assert expected in result.stdout


@pytest.mark.slow
def test_benchmark_times_onnx_runtime_against_pytorch(segmentor):
    import runpy

    from poolformer_mm.analysis import benchmark
    _, _, path, checkpoint = segmentor
    args = runpy.run_path('tools/analysis/benchmark.py')['parse_args'](
        ['--config', SEG_CONFIG, '--onnx', path, '--checkpoint', checkpoint, '--threads', '1'])
    variants, steps, compared, size = benchmark.build(args, [])
    assert list(variants) == ['eager', 'deploy', 'onnxruntime'] and size == SHAPE
    results = benchmark.measure(variants, steps, warmup=0, repeat=1)
    assert all(len(m.latency_ms) == 1 and m.latency_ms[0] > 0 for m in results.values())
    benchmark.compare(args, variants, compared, results)
    assert results['eager'].max_abs_diff == 0
    assert 0 < results['onnxruntime'].max_rel_diff < 1e-4  # the logits of another runtime


def test_benchmark_refuses_an_export_of_the_other_task(segmentor):
    from poolformer_mm.deploy.onnx.verify import onnx_variants
    path = segmentor[2]
    with pytest.raises(ValueError) as error:
        onnx_variants(DET_CONFIG, path, threads=1)
    assert str(error.value) == (
        f'--onnx {path} was exported from a segmentation model, and {DET_CONFIG} builds a '
        'detection model (RetinaNet); give the config it was exported from')


def test_benchmark_takes_the_exported_model_under_any_config_name_and_no_other(segmentor,
                                                                               tmp_path):
    """The export stores a digest of its layers' names and shapes: a renamed copy of the config
    is accepted, a config of the same name with another arch is not."""
    from poolformer_mm.deploy.onnx.verify import onnx_variants
    path, toy = segmentor[2], str(Path(SEG_CONFIG).resolve())
    renamed = tmp_path / 'my_segmentor.py'
    renamed.write_text(f'_base_ = [{toy!r}]\n')
    assert list(onnx_variants(str(renamed), path, threads=1)) == ['eager', 'deploy',
                                                                   'onnxruntime']
    same_name = tmp_path / 'other' / Path(SEG_CONFIG).name
    same_name.parent.mkdir()
    same_name.write_text(f"_base_ = [{toy!r}]\nmodel = dict(backbone=dict(arch='s24'))\n")
    with pytest.raises(ValueError) as error:
        onnx_variants(str(same_name), path, threads=1)
    assert str(error.value) == (
        f'--onnx {path} was exported from fpn_poolformer_s12_toy.py, and {same_name} builds a '
        'model with other layers (arch, classes or heads); give the config it was exported '
        'from (and --checkpoint, the weights it was exported with)')


@pytest.mark.parametrize('metadata, problem', [
    ('{task: 1}', 'is not valid JSON (Expecting property name'),
    ('[1, 2]', 'has no task'), ('{"format": 1}', 'has no task')])
def test_changed_deploy_metadata_is_named_as_such(metadata, problem):
    with pytest.raises(ValueError) as error:
        read_deploy_info({'poolformer_mm.deploy': metadata})
    assert f"the ONNX model's 'poolformer_mm.deploy' metadata {problem}" in str(error.value)
    assert str(error.value).endswith('it was changed after export; export the model again '
                                     'with tools/deployment/pytorch2onnx.py')


def _benchmark(*argv):
    return subprocess.run([sys.executable, 'tools/analysis/benchmark.py', '--repeat', '1',
                           '--warmup', '0', *argv], capture_output=True, text=True)


@pytest.mark.parametrize('argv, message', [
    (['--batch', '2'], 'takes batches of 1 (exported without a dynamic batch axis); use '
                       '--batch 1'),
    (['--shape', '96'], 'was exported for 64x64 inputs only; leave out --shape, or export '
                        'with --dynamic')])
@pytest.mark.slow
def test_benchmark_refuses_what_a_static_export_cannot_take(segmentor, tmp_path, argv, message):
    """A static export takes the batch and size it was exported with, and nothing is timed."""
    static = str(tmp_path / 'seg_static.onnx')
    export_onnx(build_model(SEG_CONFIG, segmentor[3])[0], segmentor[1], static, SHAPE)
    result = _benchmark('--config', SEG_CONFIG, '--onnx', static, *argv)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f'error: --onnx {static} {message}'
    assert 'median' not in result.stdout


@pytest.mark.slow
def test_benchmark_times_a_dynamic_export_at_its_size_and_compares_only_the_same_weights(
        segmentor):
    _, _, path, checkpoint = segmentor
    same = _benchmark('--config', SEG_CONFIG, '--onnx', path, '--checkpoint', checkpoint)
    assert same.returncode == 0, same.stderr
    assert (f'{SEG_CONFIG} as exported (outputs: output, logits), ONNX Runtime vs PyTorch, '
            '64x64, batch 1') in same.stdout
    row = next(line for line in same.stdout.splitlines() if line.startswith('onnxruntime '))
    assert 0 < float(row.split()[-1]) < 1e-4  # rel diff of the logits
    assert 'not compared' not in same.stdout

    random_weights = _benchmark('--config', SEG_CONFIG, '--onnx', path, '--shape', '96')
    assert random_weights.returncode == 0, random_weights.stderr
    assert '96x96, batch 1' in random_weights.stdout
    row = next(line for line in random_weights.stdout.splitlines()
               if line.startswith('onnxruntime '))
    assert row.split()[-2:] == ['-', '-']
    assert ('onnxruntime: outputs not compared: without --checkpoint (the weights it was '
            'exported with) the PyTorch variants have random weights') in random_weights.stdout
    # each variant's peak, ONNX Runtime's too, in a process of its own
    assert float(row.split()[5]) >= 0

    odd = _benchmark('--config', SEG_CONFIG, '--onnx', path, '--shape', '100', '70')
    assert odd.returncode == 1
    assert odd.stderr.strip().splitlines()[-1] == (
        f'error: --shape 100 70: --onnx {path} takes sides that are multiples of 32 (the size '
        'divisor of its config)')

@pytest.mark.parametrize('bins', [2, 3, 6, (4, 5)])
def test_static_adaptive_pool_has_adaptive_pooling_bins(bins):
    from poolformer_mm.deploy.onnx.export import StaticAdaptiveAvgPool2d
    pool = torch.nn.AdaptiveAvgPool2d(bins)
    x = torch.randn(2, 3, 7, 9)
    torch.testing.assert_close(StaticAdaptiveAvgPool2d(pool)(x), pool(x))


def test_dynamic_export_of_pyramid_pooling_is_refused():
    model, cfg = build_model('configs/segmentation/upernet_poolformer_s12.py')
    with pytest.raises(InvalidInputError, match='without --dynamic'):
        export_onnx(model, cfg, 'unused.onnx', SHAPE, dynamic=True)


@pytest.mark.slow
def test_pytorch2onnx_exits_1_over_tolerance(segmentor, toy_images, tmp_path, capsys,
                                             monkeypatch):
    from poolformer_mm.deploy.onnx.verify import TOLERANCES
    monkeypatch.setitem(TOLERANCES, 'logits_rel', 0.0)  # no two runtimes agree to the last bit
    code = cli.main([SEG_CONFIG, segmentor[3], '--out', str(tmp_path / 'seg.onnx'), '--shape',
                     '64', '64', '--logits', '--verify', '--image', toy_images['segmentation']])
    assert code == 1
    assert 'OVER TOLERANCE' in capsys.readouterr().out


@pytest.fixture(scope='module')
def quantize_tool():
    import runpy
    return runpy.run_path('tools/deployment/quantize_onnx.py')


@pytest.mark.slow
def test_int8_quantisation_keeps_metadata_and_most_pixels(segmentor, quantize_tool, tmp_path,
                                                          capsys):
    import onnx
    make_toy_ade(str(tmp_path / 'calib'), num_train=0, num_val=3)
    images = sorted(glob.glob(str(tmp_path / 'calib/images/validation/*.jpg')))
    tool = quantize_tool
    out = str(tmp_path / 'seg_int8.onnx')
    tool['main']([segmentor[2], str(tmp_path / 'calib/images/validation'), '--out', out])
    # this CPU's choice of weight width, said in the line written
    reduce_range, why = tool['reduce_range_choice']('auto')
    bits = '7-bit' if reduce_range else '8-bit'
    assert f'wrote {out}: int8 ({bits} weights: {why}), calibrated on 3 images' in (
        capsys.readouterr().out)
    ops = {node.op_type for node in onnx.load(out).graph.node}
    assert {'QuantizeLinear', 'DequantizeLinear'} <= ops
    fp32, int8 = ort_session(segmentor[2]), ort_session(out)
    info = read_deploy_info(int8.get_modelmeta().custom_metadata_map)
    assert info == read_deploy_info(fp32.get_modelmeta().custom_metadata_map)
    inputs = load_input(images[0], info, SECOND_SHAPE)
    agreement = (fp32.run(['output'], {'input': inputs})[0]
                 == int8.run(['output'], {'input': inputs})[0]).mean()
    assert agreement >= 0.9  # int8 changes a few pixels, no more


@pytest.mark.parametrize('flags, choice, expected', [
    ('fpu avx2 avx512f avx512_vnni', 'auto', False),
    ('fpu avx2 avx_vnni', 'auto', False),
    ('fpu avx2 fma', 'auto', True),  # AVX2 only: 8-bit weights saturate (86 % of pixels kept)
    ('fpu avx2 fma', 'no', False),
    ('fpu avx2 avx512_vnni', 'yes', True),
])
def test_int8_weights_are_7_bit_by_default_where_the_cpu_has_no_vnni(quantize_tool, tmp_path,
                                                                     flags, choice, expected):
    tool = quantize_tool
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text(f'processor\t: 0\nflags\t\t: {flags}\n')
    reduce_range, why = tool['reduce_range_choice'](choice, str(cpuinfo))
    assert reduce_range is expected
    assert ('no VNNI' in why) == (choice == 'auto' and expected)
    # a CPU that does not list its flags keeps 8-bit weights and says how to choose
    assert tool['reduce_range_choice']('auto', str(tmp_path / 'missing')) == (
        False, 'no x86 CPU flags to read (not Linux, or not x86); --reduce-range yes for an x86 '
        'CPU without VNNI')


@pytest.mark.parametrize('class_agnostic, kept', [(False, [0, 1]), (True, [0])])
def test_exported_nms_suppresses_across_classes_where_the_config_says_so(class_agnostic, kept):
    from mmcv.ops import batched_nms

    from poolformer_mm.deploy.onnx.ops import nms_by_class
    boxes = torch.tensor([[[10., 10., 50., 50.], [12., 11., 51., 52.], [80., 80., 120., 120.]]])
    scores, labels = torch.tensor([[0.9, 0.8, 0.1]]), torch.tensor([[0, 1, 1]])
    valid = scores > 0.3
    selected = nms_by_class(boxes, scores, labels, valid, 0.5, 10, class_agnostic)
    assert selected[:, 1].tolist() == kept
    # as mmcv's batched_nms, which the PyTorch model runs
    _, upstream = batched_nms(boxes[0][valid[0]], scores[0][valid[0]], labels[0][valid[0]],
                              dict(type='nms', iou_threshold=0.5, class_agnostic=class_agnostic))
    assert upstream.tolist() == kept
