"""The CUDA paths: mixed-precision training, the backbone's forms in fp16/bf16, gradient
checkpointing's memory, --deploy --amp testing, NCCL training with resume, ONNX export from a GPU.

Marked ``cuda``: skipped without a GPU, run by ``make test-gpu``, which prints each check's
figure at the end (docs/gpu.md). ``POOLFORMER_MM_TEST_DEVICE=cpu`` runs them on the CPU, where
the test allows it, to check that each assertion can fail; fp16 training and CUDA memory are
GPU-only and skip there.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from poolformer_mm.datasets import make_toy_ade, make_toy_coco
from poolformer_mm.models import MetaFormer, PoolFormer

REPO = Path(__file__).resolve().parents[2]
TOY = {'retinanet': 'configs/detection/toy/retinanet_poolformer_s12_toy.py',
       'mask_rcnn': 'configs/detection/toy/mask_rcnn_poolformer_s12_toy.py',
       'fpn': 'configs/segmentation/toy/fpn_poolformer_s12_toy.py'}
# One iteration of batch 2, no validation, a log line per iteration.
ONE_STEP = {'det': ['train_cfg.max_epochs=1', 'train_dataloader.dataset.indices=2',
                    'train_dataloader.batch_size=2', 'train_cfg.val_interval=100',
                    'default_hooks.logger.interval=1'],
            'seg': ['train_cfg.max_iters=1', 'train_cfg.val_interval=100',
                    'train_dataloader.batch_size=2', 'default_hooks.logger.interval=1']}
# TF32 convolutions (PyTorch's default for cuDNN) keep about 3 decimal digits
LOSS_TOLERANCE = {'fp32': 0.01, 'fp16': 0.05, 'bf16': 0.05}

pytestmark = pytest.mark.cuda


def run_tool(args, on_cpu=False, **env):
    """``python tool args`` (a shell script: ``tool args``) in the repository; on the CPU
    with no GPU visible."""
    environment = dict(os.environ, PYTHON=sys.executable, **env)
    if on_cpu:
        environment['CUDA_VISIBLE_DEVICES'] = ''
    command = [] if str(args[0]).endswith('.sh') else [sys.executable]
    result = subprocess.run([*command, *map(str, args)], cwd=REPO, capture_output=True,
                            text=True, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def first_losses(work_dir):
    line = next(Path(work_dir).glob('*/vis_data/scalars.json')).read_text().splitlines()[0]
    return {key: value for key, value in json.loads(line).items() if key.startswith('loss')}


def test_metrics(output):
    return json.loads(output.rsplit('Test metrics: ', 1)[1].splitlines()[0])


test_metrics.__test__ = False  # a helper, not a test


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp('toy')
    return {'det': make_toy_coco(str(root / 'coco'), num_train=64, num_val=8),
            'seg': make_toy_ade(str(root / 'ade'), num_train=16, num_val=8)}


def _task(model):
    return 'seg' if model == 'fpn' else 'det'


@pytest.mark.parametrize('amp', ['fp32', 'fp16', 'bf16'])
@pytest.mark.parametrize('model', sorted(TOY))
def test_training_step_matches_the_cpu_fp32_step(model, amp, toy, tmp_path, test_device,
                                                 gpu_report):
    if amp == 'fp16' and test_device == 'cpu':
        pytest.skip('fp16 training (with loss scaling) runs only on a GPU')
    task = _task(model)
    common = [TOY[model], '--data-root', toy[task], '--cfg-options', *ONE_STEP[task]]
    run_tool(['tools/train.py', '--work-dir', tmp_path / 'cpu', *common], on_cpu=True)
    amp_flag = [] if amp == 'fp32' else ['--amp', amp]
    out = run_tool(['tools/train.py', '--work-dir', tmp_path / 'device', *amp_flag, *common],
                   on_cpu=test_device == 'cpu')
    if amp == 'fp16':
        assert 'AmpOptimWrapper' in out
    reference, losses = first_losses(tmp_path / 'cpu'), first_losses(tmp_path / 'device')
    assert losses.keys() == reference.keys()
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    # Mask R-CNN's R-CNN losses depend on which proposals are sampled, which rounding changes:
    # its RPN losses are compared
    compared = [k for k in reference if model != 'mask_rcnn' or k.startswith('loss_rpn')]
    worst = max(abs(losses[k] - reference[k]) / max(abs(reference[k]), 1e-3) for k in compared)
    gpu_report(f"first-step losses within {worst:.2%} of the CPU's fp32 step "
               f'(need <= {LOSS_TOLERANCE[amp]:.0%})')
    assert worst <= LOSS_TOLERANCE[amp], (losses, reference)


def _randomised(backbone):
    """Weights of trained size: layer scales at 1e-5 would hide every block's error."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in backbone.named_parameters():
            if 'layer_scale' in name or name.endswith('scale'):
                param.uniform_(0.05, 0.2)
    return backbone.eval()


def _outputs(backbone, images, dtype):
    with torch.no_grad(), torch.autocast(images.device.type, dtype,
                                         enabled=dtype != torch.float32):
        return [out.float() for out in backbone(images)]


def _rel_diff(outputs, expected):
    """The largest over the stages of |difference| / |expected| (Frobenius norms)."""
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(outputs, expected))


@pytest.mark.parametrize('dtype', ['fp32', 'fp16', 'bf16'])
@pytest.mark.parametrize('backbone', ['PoolFormer s12', 'MetaFormer caformer_s18'])
def test_backbone_forms_agree(backbone, dtype, test_device, gpu_report):
    cls, arch = backbone.split()
    plain = _randomised({'PoolFormer': PoolFormer, 'MetaFormer': MetaFormer}[cls](arch))
    plain.to(test_device)
    images = torch.randn(2, 3, 224, 288, generator=torch.Generator().manual_seed(1))
    images = images.to(test_device)
    expected = _outputs(plain, images, torch.float32)
    forms = {'plain': plain, 'fast': _copy(plain).set_fast_path(True)}
    if hasattr(plain, 'switch_to_deploy'):
        forms['deploy'] = _copy(plain).switch_to_deploy()
    precision = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}[dtype]
    tolerance = 1e-4 if dtype == 'fp32' else 2e-2
    differences = {name: _rel_diff(_outputs(form, images, precision), expected)
                   for name, form in forms.items()}
    gpu_report(', '.join(f'{name} {diff:.1e}' for name, diff in differences.items()) +
               f' of the fp32 outputs (need <= {tolerance:.0e})')
    assert max(differences.values()) <= tolerance, differences


def _copy(model):
    import copy
    return copy.deepcopy(model)


def test_gradient_checkpointing_needs_at_most_0_6_of_the_training_memory(test_device,
                                                                         build_model,
                                                                         gpu_report):
    if test_device == 'cpu':
        pytest.skip('peak memory is measured with torch.cuda')
    peaks = {}
    for with_cp in (False, True):
        cfg = Config.fromfile(str(REPO / 'configs/segmentation/fpn_poolformer_s12.py'))
        cfg.model.backbone.init_cfg = None
        cfg.model.backbone.with_cp = with_cp
        cfg.model.decode_head.norm_cfg = dict(type='BN', requires_grad=True)  # one process
        model = build_model(cfg).to(test_device).train()
        images = torch.randn(2, 3, 512, 512, device=test_device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        features = model.extract_feat(images)
        logits = model.decode_head(features)
        logits.float().square().mean().backward()
        torch.cuda.synchronize()
        peaks[with_cp] = torch.cuda.max_memory_allocated() - start
        del model, features, logits
        torch.cuda.empty_cache()
    ratio = peaks[True] / peaks[False]
    gpu_report(f'with_cp peak {peaks[True] / 2**20:.0f} MiB against {peaks[False] / 2**20:.0f} '
               f'MiB: {ratio:.2f}x (need <= 0.6)')
    assert ratio <= 0.6, peaks


@pytest.mark.parametrize('model', ['retinanet', 'fpn'])
def test_deploy_amp_testing_keeps_the_metrics(model, toy, tmp_path, test_device, gpu_report):
    task = _task(model)
    on_cpu = test_device == 'cpu'
    short = (['train_cfg.max_epochs=4', 'train_cfg.val_interval=100'] if task == 'det' else
             ['train_cfg.max_iters=120', 'train_cfg.val_interval=1000'])
    run_tool(['tools/train.py', TOY[model], '--work-dir', tmp_path, '--data-root', toy[task],
              '--cfg-options', *short], on_cpu=on_cpu)
    checkpoint = sorted(tmp_path.glob('*.pth'), key=os.path.getmtime)[-1]
    metric = 'bbox' if task == 'det' else 'mIoU'
    test = ['tools/test.py', TOY[model], checkpoint, '--work-dir', tmp_path, '--data-root',
            toy[task], '--eval', metric]
    reference = test_metrics(run_tool(test, on_cpu=on_cpu))
    amp = 'bf16' if on_cpu else 'fp16'
    fast = test_metrics(run_tool([*test, '--deploy', '--amp', amp], on_cpu=on_cpu))
    # mIoU is in points, mAP in [0, 1]: within 0.5 points either way
    key, points = ('coco/bbox_mAP', 0.005) if task == 'det' else ('mIoU', 0.5)
    gpu_report(f'{key} {fast[key]:.3f} with --deploy --amp {amp}, {reference[key]:.3f} in fp32 '
               f'(need within {points})')
    assert abs(fast[key] - reference[key]) <= points, (fast, reference)


def _weights(checkpoint):
    return torch.load(checkpoint, map_location='cpu', weights_only=True)['state_dict']


def test_dist_train_resumes_to_the_uninterrupted_weights(toy, tmp_path, test_device,
                                                         gpu_report):
    """tools/dist_train.sh with one process (NCCL on a GPU, gloo on the CPU), deterministic:
    resuming from the iteration-4 checkpoint gives the weights of the run that went on."""
    options = ['train_cfg.max_epochs=2', 'train_dataloader.dataset.indices=8',
               'train_dataloader.batch_size=2', 'train_cfg.val_interval=100',
               'default_hooks.checkpoint.interval=1', 'randomness.deterministic=True']
    env = dict(CUBLAS_WORKSPACE_CONFIG=':4096:8', PORT='29541')
    first = tmp_path / 'uninterrupted'
    run_tool(['tools/dist_train.sh', TOY['retinanet'], 1, '--work-dir', first, '--data-root',
              toy['det'], '--cfg-options', *options], on_cpu=test_device == 'cpu', **env)
    resumed = tmp_path / 'resumed'
    resumed.mkdir()
    shutil.copy(first / 'epoch_1.pth', resumed / 'epoch_1.pth')
    out = run_tool(['tools/dist_train.sh', TOY['retinanet'], 1, '--work-dir', resumed,
                    '--data-root', toy['det'], '--resume', resumed / 'epoch_1.pth',
                    '--cfg-options', *options], on_cpu=test_device == 'cpu', **env)
    assert 'resumed epoch: 1, iter: 4' in out
    expected, actual = _weights(first / 'epoch_2.pth'), _weights(resumed / 'epoch_2.pth')
    assert expected.keys() == actual.keys()
    differing = [name for name in expected if not torch.equal(expected[name], actual[name])]
    backend = re.findall(r"backend[=:' ]+(nccl|gloo)", out)
    gpu_report(f'{len(expected) - len(differing)} of {len(expected)} tensors equal after resume '
               f'({backend[0] if backend else "backend not logged"})')
    assert not differing, differing[:5]


@pytest.mark.parametrize('model', ['fpn', 'retinanet'])
def test_onnx_export_of_a_model_on_the_device_verifies_in_onnxruntime(model, tmp_path, test_device,
                                                                      build_model, gpu_report):
    """Exported from a model loaded on the device, run in ONNX Runtime on the CPU against the
    model on the CPU: Semantic FPN's class map and logits; the untrained RetinaNet's (few or no)
    detections."""
    pytest.importorskip('onnxruntime')
    cfg = Config.fromfile(str(REPO / TOY[model]))
    torch.manual_seed(0)
    built = build_model(cfg)
    built.init_weights()
    checkpoint = tmp_path / f'{model}.pth'
    torch.save({'state_dict': built.state_dict(), 'meta': {}}, checkpoint)
    logits = ['--logits'] if model == 'fpn' else []
    out = run_tool(['tools/deployment/pytorch2onnx.py', TOY[model], checkpoint, '--out',
                    tmp_path / f'{model}.onnx', '--device', test_device, *logits, '--verify'],
                   on_cpu=test_device == 'cpu')
    report = next(line for line in out.splitlines() if line.startswith('verify at'))
    gpu_report(report)
    assert report.endswith(': OK'), out[-3000:]
    if model == 'fpn':
        assert 'logits max diff' in report
