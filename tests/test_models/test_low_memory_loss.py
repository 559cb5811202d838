"""The low-memory segmentation loss computes mmseg's cross-entropy exactly, without keeping
full-resolution tensors for the backward pass. Memory is measured by
tools/analysis/benchmark.py, not asserted here."""
import copy
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.models.losses import CrossEntropyLoss, accuracy
from mmseg.registry import MODELS as MODELS_MMSEG

from poolformer_mm.models.losses import upsampled_cross_entropy

REPO = Path(__file__).resolve().parents[2]


def _mmseg_loss(low, labels, **loss_kwargs):
    full = F.interpolate(low, size=labels.shape[-2:], mode='bilinear', align_corners=False)
    loss = CrossEntropyLoss(**loss_kwargs)(full, labels, ignore_index=255)
    return loss, accuracy(full, labels, ignore_index=255)


@pytest.mark.parametrize('avg_non_ignore', [False, True])
def test_loss_gradient_and_accuracy_equal_mmseg_cross_entropy(avg_non_ignore):
    torch.manual_seed(0)
    low = torch.randn(3, 7, 9, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (3, 35, 45))
    labels[0, :5] = 255
    labels[2] = 255  # an image without any label
    expected, expected_accuracy = _mmseg_loss(low, labels, avg_non_ignore=avg_non_ignore,
                                              loss_weight=0.7)
    expected_grad, = torch.autograd.grad(expected, low)
    loss, acc = upsampled_cross_entropy(low, labels, ignore_index=255,
                                        avg_non_ignore=avg_non_ignore, loss_weight=0.7)
    grad, = torch.autograd.grad(loss, low)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-15)
    assert acc.item() == pytest.approx(expected_accuracy.item(), abs=1e-4)
    assert grad[2].abs().max() == 0  # no label, no gradient


@pytest.mark.parametrize('rows_per_band', [1, 3, 8, 1000])
@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('label_size', [(35, 45), (6, 7), (9, 11), (1, 13)])
def test_every_band_split_gives_mmseg_loss_and_gradient(monkeypatch, rows_per_band,
                                                        align_corners, label_size):
    """Bands of one row, of a few rows whose input rows overlap the next band's, and one band
    for the whole image; upsampling, the same size, downsampling and a one-row image."""
    module = importlib.import_module('poolformer_mm.models.losses.upsampled_cross_entropy')
    monkeypatch.setitem(module.BAND_ELEMENTS, 'cpu', rows_per_band * 7 * label_size[1])
    torch.manual_seed(0)
    low = torch.randn(2, 7, 9, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, *label_size))
    labels[1, 0] = 255
    full = F.interpolate(low, size=label_size, mode='bilinear', align_corners=align_corners)
    expected = CrossEntropyLoss()(full, labels, ignore_index=255)
    expected_grad, = torch.autograd.grad(expected, low)
    loss, _ = upsampled_cross_entropy(low, labels, align_corners=align_corners)
    grad, = torch.autograd.grad(loss, low)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-15)


def test_a_batch_without_labels_gives_zero_loss_and_gradient():
    low = torch.randn(2, 4, 5, 5, requires_grad=True)
    labels = torch.full((2, 20, 20), 255)
    loss, acc = upsampled_cross_entropy(low, labels, avg_non_ignore=True)
    loss.backward()
    assert loss.item() == 0 and acc.item() == 0
    assert torch.count_nonzero(low.grad) == 0


def test_loss_is_fp32_for_bf16_logits_and_a_zero_weight_gives_zero():
    low = torch.randn(2, 5, 6, 6, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 5, (2, 24, 24))
    loss, acc = upsampled_cross_entropy(low, labels)
    assert loss.dtype == acc.dtype == torch.float32
    expected, _ = _mmseg_loss(low.detach().float(), labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-2)
    loss.backward()
    assert low.grad.dtype == torch.bfloat16
    zero, _ = upsampled_cross_entropy(low.detach().requires_grad_(), labels, loss_weight=0.0)
    assert zero.item() == 0


def _saved_elements(fn):
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(saved)


def test_nothing_of_full_resolution_is_kept_for_backward():
    low = torch.randn(2, 150, 16, 16, requires_grad=True)
    labels = torch.randint(0, 150, (2, 64, 64))
    full_logits = 2 * 150 * 64 * 64
    ours = _saved_elements(lambda: upsampled_cross_entropy(low, labels))
    theirs = _saved_elements(lambda: _mmseg_loss(low, labels))
    # the inputs and one log-sum-exp per pixel: nothing per class at full resolution
    assert ours == low.numel() + 2 * labels.numel()
    assert theirs >= full_logits  # mmseg's path keeps at least the log-softmax


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r'\(N, K, h, w\) logits and \(N, H, W\) labels'):
        upsampled_cross_entropy(torch.randn(2, 3, 4, 4), torch.zeros(2, 1, 8, 8).long())


def _build(cfg):
    init_default_scope('mmseg')
    from mmseg.registry import MODELS
    return MODELS.build(cfg)


def test_low_memory_head_gives_fpn_head_loss_and_gradients():
    from poolformer_mm.analysis.benchmark import model_variants, training_batch
    config = 'configs/segmentation/toy/fpn_poolformer_s12_toy.py'
    # the benchmark's 'reference' is the paper's model: mmseg's heads, the same weights
    ours, mmseg_head = model_variants(config, ['fast', 'reference']).values()
    mmseg_head.backbone = copy.deepcopy(ours.backbone)  # only the heads differ
    assert type(ours.decode_head).__name__ == 'LowMemoryFPNHead'
    assert type(mmseg_head.decode_head).__name__ == 'FPNHead'
    data = training_batch(ours, 80, 96, batch=2)
    grads, losses = [], []
    for model in (mmseg_head, ours):
        model.train()
        torch.manual_seed(0)  # same dropout mask in the head
        losses.append(model.parse_losses(
            model(data['inputs'], data['data_samples'], mode='loss')))
        losses[-1][0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    (mmseg_loss, mmseg_log), (our_loss, our_log) = losses
    torch.testing.assert_close(our_loss, mmseg_loss, rtol=1e-6, atol=0)
    accuracies = [float(log['decode.acc_seg']) for log in (mmseg_log, our_log)]
    assert accuracies[1] == pytest.approx(accuracies[0], abs=1e-3)
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-4, atol=1e-7, msg=name)


def test_under_bf16_autocast_the_loss_is_as_close_to_the_exact_one_as_mmseg_s():
    """Under ``--amp`` both losses resize bf16 logits: each must be as near to the exact (fp64)
    loss and gradient as the other."""
    torch.manual_seed(0)
    low = torch.randn(2, 150, 32, 32)
    labels = torch.randint(0, 150, (2, 128, 128))
    labels[0, :20] = 255
    exact_input = low.double().requires_grad_()
    exact, _ = _mmseg_loss(exact_input, labels)
    exact_grad, = torch.autograd.grad(exact, exact_input)
    errors = {}
    for name in ('mmseg', 'ours'):
        bf16 = low.bfloat16().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss, _ = (_mmseg_loss(bf16, labels) if name == 'mmseg'
                       else upsampled_cross_entropy(bf16, labels))
        loss.backward()
        assert loss.dtype == torch.float32 and bf16.grad.dtype == torch.bfloat16
        errors[name] = (abs(loss.item() - exact.item()) / exact.item(),
                        float((bf16.grad.double() - exact_grad).norm() / exact_grad.norm()))
    assert errors['ours'][0] < 1e-3 and errors['ours'][1] < 2e-2, errors
    # no worse than mmseg's own bf16 path (with a margin for rounding luck)
    assert errors['ours'][1] <= 1.5 * errors['mmseg'][1], errors


def test_fpn_configs_train_with_the_low_memory_head():
    for name in ('fpn_poolformer_s12.py', 'fpn_poolformer_s12_with_cp.py', 'fpn_caformer_s18.py',
                 'toy/fpn_poolformer_s12_toy.py'):
        cfg = Config.fromfile(REPO / 'configs/segmentation' / name)
        assert cfg.model.decode_head.type == 'LowMemoryFPNHead', name
        assert 'poolformer_mm.models.decode_heads' in cfg.custom_imports.imports


def test_with_cp_config_is_the_plain_model_with_less_memory():
    plain = Config.fromfile(REPO / 'configs/segmentation/fpn_poolformer_s12.py')
    saving = Config.fromfile(REPO / 'configs/segmentation/fpn_poolformer_s12_with_cp.py')
    assert saving.model.backbone.with_cp and not plain.model.backbone.get('with_cp', False)
    for cfg in (plain, saving):
        cfg.model.backbone.init_cfg = None
    plain_model, saving_model = _build(plain.model), _build(saving.model)
    # checkpoints of either load into the other, and into mmseg's FPNHead
    saving_model.load_state_dict(plain_model.state_dict())
    assert plain_model.state_dict().keys() == saving_model.state_dict().keys()
    plain.model.decode_head.type = 'FPNHead'
    _build(plain.model).load_state_dict(saving_model.state_dict())


def test_low_memory_head_accepts_a_one_element_loss_list():
    import poolformer_mm.models.decode_heads  # noqa: F401 (registers the head)
    head = _build(dict(type='LowMemoryFPNHead', in_channels=[8, 8], in_index=[0, 1],
                       feature_strides=[4, 8], channels=8, num_classes=2,
                       loss_decode=[dict(type='CrossEntropyLoss', loss_weight=0.5)]))
    assert head._cross_entropy.loss_weight == 0.5


@pytest.mark.parametrize('loss_decode, sampler, problem', [
    (dict(type='CrossEntropyLoss', class_weight=[1.0, 2.0]), None, 'class_weight'),
    (dict(type='DiceLoss'), None, 'DiceLoss'),
    ([dict(type='CrossEntropyLoss'), dict(type='DiceLoss')], None, '2 losses'),
    (dict(type='CrossEntropyLoss'), dict(type='OHEMPixelSampler'), 'a pixel sampler'),
])
def test_low_memory_head_refuses_losses_it_cannot_compute_exactly(loss_decode, sampler,
                                                                   problem):
    import poolformer_mm.models.decode_heads  # noqa: F401 (registers the head)
    cfg = dict(type='LowMemoryFPNHead', in_channels=[8, 8], in_index=[0, 1],
               feature_strides=[4, 8], channels=8, num_classes=2, loss_decode=loss_decode,
               sampler=sampler)
    with pytest.raises(ValueError, match=re.escape(problem) + r".*Use type='FPNHead'"):
        _build(cfg)


@pytest.mark.slow
def test_benchmark_reports_the_whole_model_memory_saving(tmp_path):
    result = subprocess.run(
        [sys.executable, 'tools/analysis/benchmark.py', '--config',
         'configs/segmentation/toy/fpn_poolformer_s12_toy.py', '--whole-model', '--shape', '64',
         '--batch', '2', '--warmup', '0', '--repeat', '1', '--variants', 'fast', 'cp'],
        cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if re.match(r'(fast|cp) +[\d.]+ ', line)}
    assert set(rows) == {'fast', 'cp'}
    assert float(rows['cp'][7]) < 1e-5  # relative loss difference
    assert 'cp vs fast:' in result.stdout and 'peak memory' in result.stdout


@pytest.mark.parametrize('ours, theirs, head_cfg', [
    ('LowMemoryUPerHead', 'UPerHead', dict(in_channels=[8, 8, 8, 8], in_index=[0, 1, 2, 3],
                                           pool_scales=(1, 2))),
    ('LowMemoryFCNHead', 'FCNHead', dict(in_channels=8, in_index=2, num_convs=1,
                                         loss_decode=dict(type='CrossEntropyLoss',
                                                          loss_weight=0.4))),
])
def test_upernet_heads_give_mmseg_heads_loss_and_gradients(ours, theirs, head_cfg):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    import poolformer_mm.models.decode_heads  # noqa: F401 (registers the heads)
    torch.manual_seed(0)
    cfg = dict(channels=8, num_classes=5, dropout_ratio=0.0, **head_cfg)
    heads = [_build(dict(type=name, **cfg)) for name in (theirs, ours)]
    heads[1].load_state_dict(heads[0].state_dict())
    features = [torch.randn(2, 8, 32 // 2**i, 40 // 2**i) for i in range(4)]
    samples = []
    for _ in range(2):
        labels = torch.randint(0, 5, (1, 128, 160))
        labels[:, :10] = 255
        samples.append(SegDataSample(gt_sem_seg=PixelData(data=labels)))
    results = []
    for head in heads:
        head.train()
        losses = head.loss(features, samples, train_cfg=None)
        loss = sum(v for k, v in losses.items() if 'loss' in k)
        loss.backward()
        results.append((losses, {n: p.grad.clone() for n, p in head.named_parameters()}))
    (their_losses, their_grads), (our_losses, our_grads) = results
    assert our_losses.keys() == their_losses.keys()
    torch.testing.assert_close(our_losses['loss_ce'], their_losses['loss_ce'], rtol=1e-6, atol=0)
    assert float(our_losses['acc_seg']) == pytest.approx(float(their_losses['acc_seg']), abs=1e-3)
    for name, expected in their_grads.items():
        torch.testing.assert_close(our_grads[name], expected, rtol=1e-4, atol=1e-7, msg=name)


def test_upernet_config_trains_with_the_low_memory_heads_and_refuses_other_losses():
    cfg = Config.fromfile(REPO / 'configs/segmentation/upernet_poolformer_s12.py')
    assert cfg.model.decode_head.type == 'LowMemoryUPerHead'
    assert cfg.model.auxiliary_head.type == 'LowMemoryFCNHead'
    import poolformer_mm.models.decode_heads  # noqa: F401 (registers the heads)
    head = dict(cfg.model.auxiliary_head, loss_decode=dict(type='DiceLoss'))
    with pytest.raises(ValueError, match=r"LowMemoryFCNHead .* DiceLoss\. Use type='FCNHead'"):
        _build(head)


def test_double_backward_is_refused_not_silently_wrong():
    low = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (1, 8, 8))
    loss, _ = upsampled_cross_entropy(low, labels)
    with pytest.raises(RuntimeError, match=r"no second derivative.*type='FPNHead'"):
        torch.autograd.grad(loss, low, create_graph=True)
    grad, = torch.autograd.grad(upsampled_cross_entropy(low, labels)[0], low)  # once is fine
    assert grad.abs().sum() > 0


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_bf16_with_a_non_integer_scale_is_as_accurate_as_mmseg(seed):
    """Weights of a non-integer resize are not exact in bf16; rounding them would bias every
    logit (rows that do not sum to one), so that product runs in fp32."""
    torch.manual_seed(seed)
    low = torch.randn(2, 19, 40, 40) * 5
    labels = torch.randint(0, 19, (2, 13, 17))
    exact, _ = _mmseg_loss(low.double(), labels)
    errors = {}
    for name in ('mmseg', 'ours'):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            bf16 = low.bfloat16()
            loss, _ = (_mmseg_loss(bf16, labels) if name == 'mmseg'
                       else upsampled_cross_entropy(bf16, labels))
        errors[name] = abs(loss.item() - exact.item()) / exact.item()
    assert errors['ours'] < max(3 * errors['mmseg'], 2e-4), errors


def test_loss_subclasses_and_empty_labels_are_refused():
    import poolformer_mm.models.decode_heads  # noqa: F401 (registers the heads)

    @MODELS_MMSEG.register_module(force=True)
    class ScaledCrossEntropy(CrossEntropyLoss):

        def forward(self, *args, **kwargs):
            return 2 * super().forward(*args, **kwargs)

    cfg = dict(type='LowMemoryFPNHead', in_channels=[8, 8], in_index=[0, 1],
               feature_strides=[4, 8], channels=8, num_classes=2,
               loss_decode=dict(type='ScaledCrossEntropy'))
    with pytest.raises(ValueError, match=r"ScaledCrossEntropy\. Use type='FPNHead'"):
        _build(cfg)
    cfg['loss_decode'] = dict(type='CrossEntropyLoss', use_sigmoid=True)
    with pytest.raises(ValueError, match=r"has use_sigmoid\. Use"):
        _build(cfg)
    with pytest.raises(ValueError, match='non-zero sizes'):
        upsampled_cross_entropy(torch.randn(1, 3, 4, 4), torch.zeros(1, 0, 8).long())
