"""Fast and mixed-precision inference: the same predictions, post-processing in fp32.

Covers the depthwise-convolution form of pooling, the folded blocks under bf16 autocast,
channels-last outputs and necks (``prepare_for_inference``, ``--deploy``), ``--amp`` at test
time (``enable_inference_autocast``, which CPUs get bf16), and the benchmark's peers. Speed is
measured by tools/analysis/benchmark.py, never asserted here.
"""
import copy
import logging
import pickle

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.model import revert_sync_batchnorm
from torch.nn.modules.batchnorm import _BatchNorm

from poolformer_mm.analysis.benchmark import flat_float_outputs
from poolformer_mm.analysis.complexity import build_model_without_pretrained, dummy_batch
from poolformer_mm.analysis.peers import copy_weights_by_value, peer_backbone
from poolformer_mm.analysis.reference import ReferencePoolFormer, why_no_reference
from poolformer_mm.cli.train_test import enable_test_amp
from poolformer_mm.deploy import precision as amp_choice
from poolformer_mm.deploy.fold import prepare_for_inference
from poolformer_mm.deploy.folded_fpn import FoldedFPN
from poolformer_mm.deploy.folded_fpn_head import FoldedFPNWithHeadConv
from poolformer_mm.deploy.onnx.verify import onnx_variants
from poolformer_mm.deploy.precision import amp_dtype, enable_inference_autocast
from poolformer_mm.models import MetaFormer, PoolFormer
from poolformer_mm.models.layers import PoolingMixer
from poolformer_mm.utils.errors import InvalidInputError

TOY_FPN = 'configs/segmentation/toy/fpn_poolformer_s12_toy.py'
TOY_RETINANET = 'configs/detection/toy/retinanet_poolformer_s12_toy.py'
TOY_MASK_RCNN = 'configs/detection/toy/mask_rcnn_poolformer_s12_toy.py'
UPERNET = 'configs/segmentation/upernet_poolformer_s12.py'


def _randomised(arch='s12', seed=0):
    torch.manual_seed(seed)
    model = PoolFormer(arch)
    model.init_weights()
    with torch.no_grad():  # norms and layer scales far from their initial values
        for name, param in model.named_parameters():
            if 'norm' in name or 'layer_scale' in name:
                param.add_(torch.randn_like(param) * 0.2)
    return model.eval()


def _rel_diff(expected, actual):
    """max |difference| / max |expected|, the worst output."""
    return max((a.float() - b.float()).abs().max().item() / a.abs().max().item()
               for a, b in zip(expected, actual))


def _model(config, seed=0):
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights' report
    torch.manual_seed(seed)
    model = revert_sync_batchnorm(build_model_without_pretrained(Config.fromfile(config)))
    model.init_weights()
    return model.eval()


# ---------------------------------------------------------------------------------- pooling
@pytest.mark.parametrize('pool_size', [1, 3, 5, 7])
@pytest.mark.parametrize('shape', [(2, 64, 64, 8), (1, 70, 90, 4), (1, 5, 900, 4),
                                   (1, 100, 41, 4)])
def test_pooling_by_convolution_equals_average_pooling_at_the_borders_too(pool_size, shape):
    mixer = PoolingMixer(shape[-1], pool_size)
    tokens = torch.randn(*shape)
    expected = F.avg_pool2d(tokens.permute(0, 3, 1, 2), pool_size, 1, pool_size // 2,
                            count_include_pad=False).permute(0, 2, 3, 1) - tokens
    with torch.no_grad():
        mixed = mixer.forward_tokens(tokens)
    torch.testing.assert_close(mixed, expected, rtol=0, atol=2e-6)
    # and with gradients (the pooling kernel: its backward is faster)
    tokens.requires_grad_()
    mixer.forward_tokens(tokens).sum().backward()
    assert tokens.grad is not None


def test_deploy_keeps_fp32_outputs_within_1e_5_where_pooling_is_a_convolution():
    model = _randomised()
    x = torch.randn(1, 3, 256, 320)  # stage 1 has 64x80 tokens: the convolution form
    with torch.no_grad():
        expected = model(x)
        model.switch_to_deploy()
        folded = model(x)
    assert _rel_diff(expected, folded) <= 1e-5


# ---------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize('arch', ['s12', 'm36'])
@pytest.mark.parametrize('form', ['fast', 'deploy'])
def test_bf16_backbone_outputs_are_within_2e_2_of_fp32(arch, form):
    model = _randomised(arch)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected = model(x)
        if form == 'deploy':
            model.switch_to_deploy()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model(x)
    assert _rel_diff(expected, low) <= 2e-2


def test_deploy_casts_its_weights_once_and_again_after_a_weight_change():
    model = _randomised().switch_to_deploy()
    block = model.stages[0].blocks[0]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        model(x)
        first = block._weights_in(torch.bfloat16)
        model(x)
        assert block._weights_in(torch.bfloat16)[0] is first[0]
        block.fc1_weight.mul_(2)  # load_state_dict copies in place the same way
        recast = block._weights_in(torch.bfloat16)
    assert recast[0] is not first[0]
    torch.testing.assert_close(recast[0].float(), 2 * first[0].float(), rtol=1e-2, atol=0)
    assert 'fc1_weight' in dict(block.named_buffers()) and len(block.state_dict()) == 5


def test_fp16_keeps_the_folded_layer_scales_of_1e_6():
    """fp16 has no normal numbers below 6e-5: fc2's rows are scaled to 1 before the cast and
    the scale is applied to the fp32 output."""
    model = _randomised()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'layer_scale' in name:
                param.fill_(1e-6)
        model.switch_to_deploy()
    block = model.stages[0].blocks[0]
    tokens = torch.randn(1, 16, 16, 64) * 1e-4  # fp32 resolves updates of 1e-6 on these
    with torch.no_grad():
        expected = block.forward_tokens(tokens.clone()) - tokens
        fc2_weight, row_scale = block._weights_in(torch.float16)[2::2]
        low = block._forward_mixed_precision(tokens.clone(), torch.float16) - tokens
    assert fc2_weight.dtype == torch.float16 and row_scale.dtype == torch.float32
    assert fc2_weight.abs().amax(1).min().item() == pytest.approx(1.0, rel=1e-3)
    # the MLP's update is about 1e-6: unscaled fp16 weights would round it to 0 or far off
    assert (low - expected).abs().max() <= 2e-2 * expected.abs().max()


# ---------------------------------------------------------------------------------- channels-last
def test_channels_last_outputs_hold_the_same_values():
    model = _randomised().switch_to_deploy()
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        expected = model(x)
        model.set_channels_last_outputs(True)
        outs = model(x)
    for a, b in zip(expected, outs):
        assert a.is_contiguous() and b.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


@pytest.mark.parametrize('config', [TOY_FPN, UPERNET, TOY_RETINANET, TOY_MASK_RCNN])
def test_prepare_for_inference_keeps_the_network_outputs(config):
    model = _model(config)
    with torch.no_grad():  # statistics a folded batch norm must carry (not 0 and 1)
        for bn in [m for m in model.modules() if isinstance(m, _BatchNorm)]:
            bn.running_mean.normal_(std=0.1)
            bn.running_var.uniform_(0.5, 2)
    task = 'mmdet' if 'detection' in config else 'mmseg'
    inputs, samples = dummy_batch(model, task, 128, 160)
    fast = copy.deepcopy(model)
    form = prepare_for_inference(fast)
    if config == UPERNET:
        assert form.neck_left_because == 'the model has no neck'
    elif config == TOY_RETINANET:  # a 128-channel FPN on the 128-channel stage 2
        assert 'too many for the folded form to be cheaper' in form.neck_left_because
    else:
        assert form.neck_left_because is None and isinstance(fast.neck, FoldedFPN)
        assert fast.neck.parity_weight.is_contiguous(memory_format=torch.channels_last)
    # Semantic FPN's head reads the finest level through one convolution, merged into the neck
    assert isinstance(getattr(fast, 'neck', None), FoldedFPNWithHeadConv) == (config == TOY_FPN)
    assert form.head_conv_left_because == {
        TOY_FPN: None, UPERNET: 'the neck is not a folded FPN',
        TOY_RETINANET: 'the neck is not a folded FPN',
        TOY_MASK_RCNN: 'the model has no decode head'}[config]
    # the batch norms of the segmentation heads' ConvModules; the detectors have none
    batch_norms = sum(isinstance(m, _BatchNorm) for m in model.modules())
    assert form.batch_norms_folded == batch_norms
    assert batch_norms > 0 if task == 'mmseg' else batch_norms == 0
    assert not any(isinstance(m, _BatchNorm) for m in fast.modules())
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    with torch.no_grad():
        expected = flat_float_outputs(model(inputs, samples, mode='tensor'))
        outputs = flat_float_outputs(fast(inputs, samples, mode='tensor'))
    assert len(outputs) == len(expected)
    scale = max(o.abs().max().item() for o in expected)
    assert max((a - b).abs().max().item() for a, b in zip(expected, outputs)) <= 1e-4 * scale


@pytest.mark.parametrize('config', [TOY_FPN, TOY_RETINANET])
def test_a_prepared_model_refuses_the_weights_of_its_unfolded_form(config, tmp_path):
    from mmengine.runner import load_checkpoint, save_checkpoint
    trained = _model(config, seed=1)
    path = str(tmp_path / 'trained.pth')
    save_checkpoint(trained.state_dict(), path)
    model = _model(config)
    prepare_for_inference(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # mmengine's load_checkpoint is not strict: without the check it only logged the keys and
    # the model kept computing with the weights it had been folded from
    for load in (lambda: load_checkpoint(model, path, logger='silent'),
                 lambda: model.load_state_dict(trained.state_dict()),
                 lambda: model.load_state_dict(trained.state_dict(), strict=False),
                 lambda: model.backbone.load_state_dict(trained.backbone.state_dict(), False)):
        with pytest.raises(InvalidInputError, match=r'was folded for inference.*unfolded form.*'
                           r'Load the checkpoint first and fold afterwards'):
            load()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the folded form's own weights still load, and so does a copy or a pickle of it
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    clone.load_state_dict(model.state_dict())
    # the right order: load, then prepare
    load_checkpoint(model := _model(config), path, logger='silent')
    prepare_for_inference(model)
    inputs, samples = dummy_batch(model, 'mmdet' if 'detection' in config else 'mmseg', 64, 96)
    with torch.no_grad():
        expected = flat_float_outputs(trained(inputs, samples, mode='tensor'))
        outputs = flat_float_outputs(model(inputs, samples, mode='tensor'))
    assert _rel_diff(expected, outputs) <= 1e-5


def test_a_folded_backbone_refuses_unfolded_weights_in_every_layout():
    trained, model = _randomised(seed=1), _randomised().switch_to_deploy()
    with pytest.raises(InvalidInputError, match="e.g. 'stages.0.blocks.0"):
        model.load_state_dict(trained.state_dict(), strict=False)
    # checkpoints with the names from before they were unified are renamed first, then refused
    legacy = {k.replace('layer_scale1.', 'layer_scale_1.'): v
              for k, v in trained.state_dict().items() if 'layer_scale1.' in k}
    with pytest.raises(InvalidInputError, match=r"12 key\(s\).*e.g. 'stages.0.blocks.0.layer_"
                       r"scale1.scale'"):
        model.load_state_dict(legacy, strict=False)
    hooks = len(model._load_state_dict_pre_hooks)
    assert len(model.switch_to_deploy()._load_state_dict_pre_hooks) == hooks  # no second check


# ---------------------------------------------------------------------------------- --amp
@pytest.mark.parametrize('config', [TOY_RETINANET, TOY_MASK_RCNN, TOY_FPN])
def test_amp_runs_the_network_in_bf16_and_post_processing_in_fp32(config):
    """Autocast around the whole predict hands mmcv's NMS bf16 boxes, which it refuses."""
    model = _model(config)
    task = 'mmdet' if 'detection' in config else 'mmseg'
    inputs, samples = dummy_batch(model, task, 128, 160)
    prepare_for_inference(model)
    seen = []
    model.neck.register_forward_hook(lambda m, i, o: seen.append(o[0].dtype))
    assert enable_inference_autocast(model, 'cpu', torch.bfloat16) >= 3
    with torch.no_grad():
        result = model.predict(inputs, samples)[0]
    # the neck ran in bf16; for two-stage detectors its output was cast back for RoIAlign
    assert seen and seen[0] in (torch.bfloat16, torch.float32)
    if task == 'mmdet':
        assert result.pred_instances.bboxes.dtype == torch.float32
        assert result.pred_instances.scores.dtype == torch.float32
    else:
        assert result.seg_logits.data.dtype == torch.float32
    # the wrapped forwards follow a deep copy (the test-time-augmentation wrapper copies)
    copied = copy.deepcopy(model)
    assert copied.backbone.forward.__self__ is copied.backbone


def test_amp_neck_output_is_bf16_for_single_stage_detectors():
    model = _model(TOY_RETINANET)
    inputs, samples = dummy_batch(model, 'mmdet', 128, 160)
    enable_inference_autocast(model, 'cpu', torch.bfloat16)
    seen = []
    model.neck.register_forward_hook(lambda m, i, o: seen.append(o[0].dtype))
    with torch.no_grad():
        maps = model(inputs, samples, mode='tensor')
    assert seen == [torch.bfloat16]
    assert all(t.dtype == torch.float32 for t in flat_float_outputs(maps))


def test_amp_choice_follows_the_cpu_bf16_units(monkeypatch):
    monkeypatch.setattr(amp_choice, 'cpu_bf16_units', lambda: ('amx_bf16', ))
    dtype, message = amp_dtype('cpu')
    assert dtype == torch.bfloat16 and 'amx_bf16' in message
    monkeypatch.setattr(amp_choice, 'cpu_bf16_units', lambda: ())
    dtype, message = amp_dtype('cpu')
    assert dtype is None
    assert 'no bf16 units' in message and 'avx512_bf16' in message and 'fp32' in message
    dtype, message = amp_dtype('cpu', 'bf16')  # asked for: run, and say so
    assert dtype == torch.bfloat16 and 'slower than fp32' in message
    # flags that cannot be read (macOS, Windows, ARM): fp32, saying it cannot tell
    monkeypatch.setattr(amp_choice, 'cpu_bf16_units', lambda: None)
    dtype, message = amp_dtype('cpu')
    assert dtype is None and message.startswith('--amp: cannot tell whether this CPU has bf16')
    assert 'no bf16 units' not in message and 'running in fp32' in message
    assert amp_dtype('cuda:0')[0] == torch.float16
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        with pytest.raises(InvalidInputError, match='this GPU has no bf16 arithmetic'):
            amp_dtype('cuda:0', 'bf16')
    else:
        assert amp_dtype('cuda:0', 'bf16')[0] == torch.bfloat16
    with pytest.raises(InvalidInputError, match='--amp fp16 is for GPUs'):
        amp_dtype('cpu', 'fp16')


def test_cpu_bf16_units_are_read_from_the_flags(tmp_path):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text('model name\t: Some CPU\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n')
    assert amp_choice.cpu_bf16_units(str(cpuinfo)) == ('amx_bf16', )
    cpuinfo.write_text('flags\t\t: fpu avx2 fma\n')
    amp_choice.cpu_bf16_units.cache_clear()
    assert amp_choice.cpu_bf16_units(str(cpuinfo)) == ()
    amp_choice.cpu_bf16_units.cache_clear()
    assert amp_choice.cpu_bf16_units(str(tmp_path / 'missing')) is None  # cannot tell
    cpuinfo.write_text('processor\t: 0\nFeatures\t: fp asimd bf16\n')  # ARM lists no x86 flags
    amp_choice.cpu_bf16_units.cache_clear()
    assert amp_choice.cpu_bf16_units(str(cpuinfo)) is None
    amp_choice.cpu_bf16_units.cache_clear()


def test_test_tool_amp_without_bf16_units_warns_and_adds_nothing(monkeypatch):
    logged = []
    monkeypatch.setattr(amp_choice, 'print_log',
                        lambda msg, level=logging.INFO, **kw: logged.append((level, msg)))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(amp_choice, 'cpu_bf16_units', lambda: ())
    cfg = Config(dict(custom_hooks=[]))
    enable_test_amp(cfg, 'auto')
    assert cfg.custom_hooks == []
    assert logged[-1][0] == logging.WARNING and 'no bf16 units' in logged[-1][1]
    enable_test_amp(cfg, 'bf16')  # forced: runs, and still warns
    assert cfg.custom_hooks == [dict(type='InferenceAutocastHook', dtype='bfloat16')]
    assert logged[-1][0] == logging.WARNING and 'as asked' in logged[-1][1]
    monkeypatch.setattr(amp_choice, 'cpu_bf16_units', lambda: ('avx512_bf16', ))
    cfg = Config(dict(custom_hooks=[]))
    enable_test_amp(cfg, 'auto')
    assert cfg.custom_hooks == [dict(type='InferenceAutocastHook', dtype='bfloat16')]
    assert logged[-1][0] == logging.INFO


# ---------------------------------------------------------------------------------- peers
def test_peer_weights_are_paired_by_value():
    backbone = _randomised()
    peer = ReferencePoolFormer.like(_randomised(seed=1))  # other weights, same names
    copy_weights_by_value(peer, backbone)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(backbone(x), peer.eval()(x)):
            # a wrong pairing differs by the outputs' size; the two layouts by fp32 rounding
            # (1.0e-5 on outputs of 4.6 on an AVX2-only CPU)
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * a.abs().max().item())


def test_missing_peer_is_skipped_with_an_install_command_that_keeps_torch(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, 'timm', None)  # import timm raises ImportError
    peer, reason = peer_backbone('timm', _randomised())
    # pip would otherwise take the newest torchvision and the newer torch it requires, which
    # the installed mmcv was not built against
    assert peer is None and 'timm is not installed' in reason
    assert f'pip install timm "torch=={torch.__version__}"' in reason


@pytest.mark.parametrize('version, index', [('2.13.0+cpu', ' --extra-index-url '
                                             'https://download.pytorch.org/whl/cpu'),
                                            ('2.13.0', '')])
def test_install_hint_keeps_the_torch_build(monkeypatch, version, index):
    """A CPU-only torch (``+cpu``) needs the torchvision of its own index: PyPI's does not
    import beside it (seen: 'operator torchvision::nms does not exist')."""
    from poolformer_mm.analysis import peers
    monkeypatch.setattr(peers.torch, '__version__', version)
    assert peers.install_hint('mmpretrain') == (
        f'pip install mmpretrain "torch=={version}"{index} (keeps torch 2.13.0; '
        'mmpretrain 1.2.0 measured)')
    # a torch built from source has no index to take torchvision from
    monkeypatch.setattr(peers.torch, '__version__', '2.13.0a0+git1234')
    assert peers.install_hint('timm') == (
        'build torchvision against this torch 2.13.0a0+git1234 (a local build, which pip would '
        'replace), then pip install timm (1.0.31 measured)')


def test_peer_missing_a_dependency_says_which(monkeypatch):
    import importlib

    def no_torchvision(name, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'torchvision'", name='torchvision')

    monkeypatch.setattr(importlib, 'import_module', no_torchvision)
    peer, reason = peer_backbone('timm', _randomised())
    assert peer is None and reason.startswith('timm is installed but needs torchvision')


def test_peer_that_does_not_import_is_skipped_with_the_reason(monkeypatch):
    """A torchvision built for another torch fails at import with a RuntimeError (seen: CPU
    torch 2.13 with the PyPI torchvision 0.28), which is no missing arch."""
    import importlib

    def broken(name, *args, **kwargs):
        raise RuntimeError('operator torchvision::nms does not exist')

    monkeypatch.setattr(importlib, 'import_module', broken)
    peer, reason = peer_backbone('mmpretrain', _randomised())
    assert peer is None
    assert reason.startswith('mmpretrain does not import beside torch')
    assert 'operator torchvision::nms does not exist' in reason
    assert 'pip uninstall torchvision, then pip install mmpretrain "torch==' in reason
    assert 'has no PoolFormer' not in reason


def test_training_amp_follows_the_cpu_bf16_units_as_at_test_time(monkeypatch):
    """A bare --amp trains in fp32 with a warning on a CPU without bf16 units (bf16 products
    ran about 140x slower than fp32 on an AVX2-only AMD EPYC); --amp bf16 forces bf16."""
    from poolformer_mm.cli import train_test as runner_setup
    logged = []
    monkeypatch.setattr(amp_choice, 'print_log',
                        lambda msg, level=logging.INFO, **kw: logged.append((level, msg)))
    monkeypatch.setattr(runner_setup.torch.cuda, 'is_available', lambda: False)

    def wrapper_after(choice, units):
        monkeypatch.setattr(amp_choice, 'cpu_bf16_units', lambda: units)
        logged.clear()
        cfg = Config(dict(optim_wrapper=dict(type='OptimWrapper')))
        runner_setup.enable_training_amp(cfg, choice)
        return cfg.optim_wrapper.type

    assert wrapper_after('auto', ('amx_bf16', )) == 'BF16AutocastOptimWrapper'
    assert logged[-1][0] == logging.INFO and 'amx_bf16' in logged[-1][1]
    assert wrapper_after('auto', ()) == 'OptimWrapper'  # fp32, and the log says why
    cfg = Config(dict(optim_wrapper=dict(type='OptimWrapper')))
    runner_setup.enable_training_amp(cfg, 'auto')
    assert cfg.amp == dict(asked='auto', runs='float32')  # kept in the work dir's config
    level, message = logged[-1]
    assert level == logging.WARNING and 'no bf16 units' in message
    assert 'running in fp32' in message and '--amp bf16 forces bf16' in message
    assert wrapper_after('bf16', ()) == 'BF16AutocastOptimWrapper'
    assert 'as asked' in logged[-1][1] and 'slower than fp32 (about 140x' in logged[-1][1]
    assert logged[-1][0] == logging.WARNING
    with pytest.raises(InvalidInputError, match='--amp fp16 is for GPUs'):
        wrapper_after('fp16', ('amx_bf16', ))
    # on a GPU: mmengine's AmpOptimWrapper, fp16 with loss scaling or bf16 without
    monkeypatch.setattr(runner_setup.torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(runner_setup.torch.cuda, 'is_bf16_supported',
                        lambda including_emulation=True: True)
    cfg = Config(dict(optim_wrapper=dict(type='OptimWrapper')))
    runner_setup.enable_training_amp(cfg, 'auto')
    assert (cfg.optim_wrapper.type, cfg.optim_wrapper.dtype,
            cfg.optim_wrapper.loss_scale) == ('AmpOptimWrapper', 'float16', 'dynamic')
    cfg = Config(dict(optim_wrapper=dict(type='OptimWrapper')))
    runner_setup.enable_training_amp(cfg, 'bf16')
    assert cfg.optim_wrapper.dtype == 'bfloat16'
    assert cfg.optim_wrapper.loss_scale == dict(enabled=False)  # mmengine's default scales
    # a GPU without bf16 arithmetic (before Ampere) is refused before training starts
    monkeypatch.setattr(runner_setup.torch.cuda, 'is_bf16_supported',
                        lambda including_emulation=True: including_emulation)
    with pytest.raises(InvalidInputError, match='this GPU has no bf16 arithmetic'):
        runner_setup.enable_training_amp(
            Config(dict(optim_wrapper=dict(type='OptimWrapper'))), 'bf16')
    # a config that already trains in mixed precision keeps its wrapper, and the log says so
    kept = []
    monkeypatch.setattr(runner_setup, 'print_log', lambda msg, **kw: kept.append(msg))
    cfg = Config(dict(optim_wrapper=dict(type='AmpOptimWrapper', dtype='float16')))
    runner_setup.enable_training_amp(cfg, 'bf16')
    assert cfg.optim_wrapper.dtype == 'float16'
    assert kept == ['--amp: the config already trains with AmpOptimWrapper; it is kept as the '
                    'config sets it']
    # ... but mmengine's AmpOptimWrapper on a CPU is refused before anything is built
    monkeypatch.setattr(runner_setup.torch.cuda, 'is_available', lambda: False)
    with pytest.raises(InvalidInputError, match="AmpOptimWrapper, which needs a GPU"):
        runner_setup.enable_training_amp(Config(dict(optim_wrapper=dict(type='AmpOptimWrapper'))))


def test_train_parser_takes_a_bare_or_named_amp():
    from poolformer_mm.cli.train_test import train_parser
    parser = train_parser()
    assert parser.parse_args(['config.py', '--amp']).amp == 'auto'
    assert parser.parse_args(['config.py', '--amp', 'bf16']).amp == 'bf16'
    assert parser.parse_args(['config.py']).amp is None
    # mmdet's own --amp takes no value: a config after it gets a message saying where it goes
    with pytest.raises(SystemExit):
        parser.parse_args(['--amp', 'configs/x.py'])
    from poolformer_mm.cli.options import amp_argument
    with pytest.raises(Exception, match='a config[?] --amp takes an optional value, so write it '
                       'after the config'):
        amp_argument('configs/x.py')
    with pytest.raises(Exception, match="takes auto, bf16, fp16, not 'fp8'"):
        amp_argument('fp8')


@pytest.mark.parametrize('build', [
    lambda: PoolFormer('s12'),
    lambda: PoolFormer('s12', token_mixers=('pool', 'pool', 'attn', 'attn')),
    lambda: MetaFormer('caformer_s18'),
    lambda: MetaFormer('convformer_s18')])
def test_backbone_outputs_are_contiguous_nchw_unless_asked_for_channels_last(build):
    """mmcv 2.1's CPU RoIAlign ignores strides: a channels-last map gives wrong RoI features
    (this broke Mask R-CNN with the MetaFormer backbones on a CPU)."""
    from mmcv.ops import roi_align
    backbone = build().eval()
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 64, 96))
    assert all(o.is_contiguous() for o in outs)
    rois = torch.tensor([[0, 1., 2., 9., 7.]])
    misread = roi_align(outs[0].contiguous(memory_format=torch.channels_last), rois, (3, 3),
                        1.0, 0, 'avg', True)
    assert not torch.allclose(misread, roi_align(outs[0], rois, (3, 3), 1.0, 0, 'avg', True))


def test_channels_last_training_gives_the_same_loss_and_gradients():
    from types import SimpleNamespace

    from poolformer_mm.analysis.benchmark import training_batch
    from poolformer_mm.engine import ChannelsLastHook
    model = _model(TOY_FPN).train()
    converted = copy.deepcopy(model)
    runner = SimpleNamespace(model=converted, logger=MMLogger.get_current_instance())
    ChannelsLastHook().before_train(runner)  # what tools/train.py --channels-last adds
    assert converted.decode_head.conv_seg.weight.is_contiguous(
        memory_format=torch.channels_last)
    data = training_batch(model, 64, 96, 2)
    results = []
    for variant in (model, converted):
        torch.manual_seed(0)
        loss, _ = variant.parse_losses(variant(data['inputs'], data['data_samples'],
                                               mode='loss'))
        loss.backward()
        results.append((loss.item(), variant.backbone.stem.conv.weight.grad.clone(),
                        variant.neck.fpn_convs[0].conv.weight.grad.clone()))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    for expected, grad in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-4 * expected.abs().max())


def test_train_tool_has_channels_last():
    from poolformer_mm.cli.train_test import train_parser
    assert train_parser().parse_args(['some_config.py', '--channels-last']).channels_last


@pytest.mark.slow
def test_benchmark_times_whole_models_with_precisions_and_notes_missing_peers(tmp_path):
    import json
    import re
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, 'tools/analysis/benchmark.py', '--model', TOY_FPN, '--shape', '64',
         '--warmup', '0', '--repeat', '2', '--variants', 'reference', 'deploy', 'deploy:bf16',
         '--json', str(tmp_path / 'out.json')], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    # mmseg's notices while its heads are built (see poolformer_mm.utils.known_warnings)
    assert 'Warning' not in result.stderr, result.stderr
    assert re.search(r'^machine: .+\(.*\), torch .+ matmul fp32 [\d.]+ GFLOP/s, bf16 [\d.]+', out,
                     re.M)
    saved = json.loads((tmp_path / 'out.json').read_text())['results']
    assert set(saved) == {'reference', 'deploy', 'deploy:bf16'}
    assert saved['deploy']['max_rel_diff'] <= 1e-5 and saved['deploy:bf16']['max_rel_diff'] < 5e-2
    # the speed-up printed is the ratio of the printed medians
    line = re.search(r'deploy vs reference: ([\d.]+)x speed \(([\d.]+) / ([\d.]+) ms\)', out)
    assert float(line[1]) == pytest.approx(float(line[2]) / float(line[3]), abs=0.01)
    # a peer that is not installed is skipped with the command that installs it
    result = subprocess.run(
        [sys.executable, '-c', 'import sys; sys.modules["timm"] = None; '
         'sys.argv = ["benchmark.py", "--arch", "s12", "--shape", "64", "--warmup", "0", '
         '"--repeat", "1", "--variants", "reference", "timm", "deploy"]; '
         'exec(open("tools/analysis/benchmark.py").read())'],
        cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'timm skipped: timm is not installed' in result.stdout
    assert 'pip install timm' in result.stdout


@pytest.mark.slow
def test_benchmark_refuses_an_unknown_precision_or_variant_in_one_line():
    import subprocess
    import sys
    from pathlib import Path

    from poolformer_mm.analysis.benchmark import parse_variant
    assert parse_variant('deploy:bf16') == ('deploy', 'bf16')
    assert parse_variant('deploy', 'bf16') == ('deploy', 'bf16')
    with pytest.raises(ValueError, match="unknown precision 'int4' in variant 'deploy:int4'"):
        parse_variant('deploy:int4')
    result = subprocess.run(
        [sys.executable, 'tools/analysis/benchmark.py', '--arch', 's12', '--shape', '32',
         '--variants', 'reference', 'deploy:int4'], cwd=Path(__file__).resolve().parents[2],
        capture_output=True, text=True)
    assert result.returncode == 2  # a usage error, refused before anything is timed
    assert "error: argument --variants: unknown precision 'int4'" in result.stderr
    assert 'Traceback' not in result.stderr


def _benchmark_tool():
    import runpy
    from pathlib import Path
    return runpy.run_path(str(Path(__file__).resolve().parents[2] / 'tools' / 'analysis' /
                              'benchmark.py'))


@pytest.mark.parametrize('argv, message', [
    (['--model', 'configs/nope.py'], "argument --model: 'configs/nope.py' is no file (missing"),
    (['--config', TOY_FPN, '--onnx', 'configs'], "argument --onnx: 'configs' is no file (missing, "
     'or a folder)'),
    (['--arch', 's12', '--shape', '0'], 'argument --shape: must be at least 32 pixels'),
    (['--arch', 's12', '--shape', '64', '64', '64'], '--shape takes H or H W, got 3'),
    (['--arch', 's12', '--sizes', '224', '16'], 'argument --sizes: must be at least 32 pixels'),
    (['--arch', 's12', '--batch', '0'], 'argument --batch: must be at least 1, got 0'),
    (['--arch', 's12', '--batch', 'two'], "argument --batch: invalid literal for int()"),
    (['--arch', 's12', '--repeat', '0'], 'argument --repeat: must be at least 1, got 0'),
    (['--arch', 's12', '--warmup', '-1'], 'argument --warmup: must be at least 0, got -1'),
    (['--arch', 's12', '--threads', '0'], 'argument --threads: must be at least 1, got 0'),
    (['--arch', 's12', '--device', 'tpu'], 'argument --device: tpu: use cpu, or cuda where'),
    (['--arch', 's12', '--json', '/nonexistent_folder/out.json'],
     'argument --json: /nonexistent_folder/out.json: a folder, or its folder does not exist'),
    (['--model', TOY_FPN, '--plot', 'speed.png'], '--plot times backbones'),
    (['--config', TOY_FPN, '--whole-model', '--plot', 'speed.png'], '--plot times backbones'),
    (['--config', TOY_FPN, '--whole-model', '--mode', 'inference'],
     '--whole-model times training steps of the --config model; for inference use --model'),
    (['--arch', 's12', '--json', '.'], 'argument --json: .: a folder'),
    (['--arch', 's12', '--plot', 'speed'], 'argument --plot: speed: not a writable image file'),
    (['--arch', 's12', '--checkpoint', 'README.md'], '--checkpoint goes with --onnx'),
    (['--arch', 's12', '--postprocess'], '--postprocess goes with --model in inference'),
    (['--model', TOY_FPN, '--mode', 'train', '--postprocess'], '--postprocess goes with'),
    (['--arch', 's12', '--variants', 'deploy', 'deploy:fp32'],
     '--variants names deploy:fp32 more than once'),
    (['--arch', 's12', '--variants', 'fast:'],
     "argument --variants: unknown precision '' in variant 'fast:'"),
    (['--arch', 's12', '--variants', 'channels_last'],
     '--variants: unknown variant channels_last for backbones'),
    (['--arch', 's12', '--mode', 'train', '--variants', 'fast', 'deploy:bf16'],
     "'deploy' is an inference form; it does not train"),
    (['--arch', 's99'], "argument --arch: invalid choice: 's99' (choose from 's12', 's24'"),
    (['--arch', 's12', '--onnx', 'README.md'], '--onnx needs the --config it was exported from'),
    (['--config', TOY_FPN, '--onnx', 'README.md', '--dtype', 'bf16'],
     '--onnx times the exported model in fp32 inference against PyTorch eager and deploy; drop '
     '--dtype bf16'),
])
def test_benchmark_refuses_settings_it_cannot_run_before_anything_runs(
        argv, message, monkeypatch, capsys):
    tool = _benchmark_tool()
    monkeypatch.setattr('sys.argv', ['benchmark.py'] + argv)
    with pytest.raises(SystemExit) as exit_info:
        tool['parse_args']()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f'error: {message}' in err.strip().splitlines()[-1] and err.count('error:') == 1


@pytest.mark.slow
def test_benchmark_refuses_what_it_cannot_time_with_the_reason():
    from poolformer_mm.analysis import benchmark
    resnet = Config(dict(model=dict(type='EncoderDecoder', backbone=dict(
        type='mmseg.ResNetV1c', depth=50))))  # as the stock mmseg bases
    with pytest.raises(ValueError, match='its backbone is ResNetV1c; this benchmark times '
                       'PoolFormer backbones'):
        benchmark.backbone_settings(resnet)
    with pytest.raises(ValueError, match='its backbone is MetaFormer'):
        benchmark.model_variants('configs/segmentation/fpn_convformer_s18.py', ['fast'])
    # a config's backbone comes with all its settings, and the paper's formulation is refused
    # where it computes something else
    arch, settings = benchmark.backbone_settings('configs/segmentation/fpn_poolformer_s12_ppaa.py')
    assert arch == 's12' and settings['token_mixers'] == ('pool', 'pool', 'attn', 'attn')
    assert not set(settings) & set(benchmark.VARIANT_SETTINGS)
    with pytest.raises(ValueError, match=r"'reference' is the paper's PoolFormer, which this "
                       r'backbone is not: not every block is a PoolFormer block \(token mixers '
                       r"Attention, PoolingMixer.*leave 'reference' out of --variants"):
        benchmark.backbone_variants(arch, ['reference', 'deploy'], **settings)
    variants = benchmark.backbone_variants(arch, ['plain', 'deploy'], **settings)
    assert [type(b.token_mixer).__name__ for b in variants['plain'].stages[3].blocks] == [
        'Attention'] * 2
    assert why_no_reference(PoolFormer('s12')) is None
    assert 'GELU' in why_no_reference(PoolFormer('s12', act_cfg=dict(type='ReLU')))
    for arch_variants in (lambda: benchmark.backbone_variants('s12', ['fast', 'deploy'],
                                                              train=True),
                          lambda: benchmark.model_variants(TOY_FPN, ['fast', 'deploy'],
                                                           train=True)):
        with pytest.raises(ValueError, match="'deploy' is an inference form; it does not train"):
            arch_variants()


@pytest.mark.slow
def test_benchmark_times_detector_training_with_checkpointing_and_leaves_out_what_cannot_run():
    from poolformer_mm.analysis import benchmark
    variants = benchmark.model_variants(TOY_RETINANET, ['fast', 'cp'], train=True)
    assert variants['cp'].backbone.stages[0].grad_checkpointing
    assert not variants['fast'].backbone.stages[0].grad_checkpointing
    # a Mask R-CNN's training batch has masks for its boxes
    model = benchmark.model_variants(TOY_MASK_RCNN, ['fast'], train=True)['fast']
    data = benchmark.training_batch(model, 64, 96, 2)
    assert {'loss_rpn_cls', 'loss_bbox', 'loss_mask'} <= set(
        model(data['inputs'], data['data_samples'], mode='loss'))
    with pytest.raises(ValueError, match='ONNX Runtime cannot load it'):
        onnx_variants(TOY_FPN, 'README.md')


@pytest.mark.slow
def test_benchmark_training_batch_has_the_asked_size_not_the_configs_crop():
    from poolformer_mm.analysis.benchmark import training_batch
    model = _model('configs/segmentation/fpn_poolformer_s12.py')
    assert tuple(model.data_preprocessor.size) == (512, 512)  # the ADE20K crop
    data = training_batch(model, 64, 96, 2)
    assert data['inputs'].shape == (2, 3, 64, 96)
    assert [s.gt_sem_seg.data.shape for s in data['data_samples']] == [(1, 64, 96)] * 2
    assert tuple(model.data_preprocessor.size) == (512, 512)  # given back


@pytest.mark.slow
def test_benchmark_differences_are_against_the_baseline_in_fp32_and_rows_name_precisions():
    from poolformer_mm.analysis import benchmark
    parse_args = _benchmark_tool()['parse_args']
    for argv, exact, inexact, least in [(['--arch', 's12'], 'deploy:fp32', 'reference:bf16', 1e-4),
                                        (['--model', TOY_FPN], 'deploy', 'deploy:bf16', 0)]:
        args = parse_args(argv + ['--shape', '64', '--variants', inexact, exact])
        variants, _, compared, _ = benchmark.build(args, args.variants)
        results = {name: benchmark.Measurement(name, [1.0]) for name in variants}
        benchmark.compare(args, variants, compared, results)
        # the fp32 form is exact; the bf16 one is not, and is not the ground truth (whole
        # models: the baseline in fp32 is a model of its own)
        assert results[exact].max_rel_diff <= 1e-5
        assert least < results[inexact].max_rel_diff < 5e-2
    # a row without a rate (bf16 emulated) shows '-' under '% matmul'
    table = benchmark.format_results(results, 1, 'deploy:bf16', 1.0,
                                     {'deploy:bf16': None, 'deploy': 100.0})
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert rows['deploy:bf16'][-1] == '-' and rows['deploy'][-1].endswith('%')


class _MachineOfRate:
    """A stand-in for ``torch.mm`` and the benchmark's clock: each product moves the clock on by
    the time a machine of ``gflops_per_s`` would take. No real time passes, so the result does
    not depend on how fast or busy the machine running the test is."""

    def __init__(self, gflops_per_s: float):
        self.gflops_per_s = gflops_per_s
        self.now = 0.0
        self.sizes = []

    def perf_counter(self) -> float:
        return self.now

    def mm(self, a, b):
        self.sizes.append(a.shape[0])
        self.now += 2 * a.shape[0] * a.shape[1] * b.shape[1] / (self.gflops_per_s * 1e9)
        return a


def test_matmul_rate_of_an_emulating_cpu_is_measured_in_seconds_not_minutes(monkeypatch):
    """bf16 on a CPU without bf16 units ran at 1.2-1.4 GFLOP/s (AMD EPYC, AVX2 only): 13
    products of 2048 took minutes before the benchmark printed anything."""
    import types

    from poolformer_mm.analysis import benchmark
    slow = _MachineOfRate(1.0)
    monkeypatch.setattr(torch, 'mm', slow.mm)
    monkeypatch.setattr(benchmark, 'time', types.SimpleNamespace(perf_counter=slow.perf_counter))
    assert benchmark.matmul_gflops(dtype=torch.bfloat16, repeat=3) == pytest.approx(1.0)
    assert slow.now < 5  # seconds such a machine spends
    assert max(slow.sizes) <= 512
    # a fast machine keeps the large size, whose rate is the one the fractions need
    fast = _MachineOfRate(1000.0)
    monkeypatch.setattr(torch, 'mm', fast.mm)
    monkeypatch.setattr(benchmark, 'time', types.SimpleNamespace(perf_counter=fast.perf_counter))
    assert benchmark.matmul_gflops(repeat=1) == pytest.approx(1000.0)
    assert max(fast.sizes) == 2048


def test_benchmark_says_bf16_is_emulated_on_a_cpu_without_bf16_units(monkeypatch):
    from poolformer_mm.analysis import benchmark
    rates = {'fp32': 180.0, 'bf16': 1.3}
    monkeypatch.setattr(benchmark, 'cpu_bf16_units', lambda: ())
    note = benchmark.emulated_bf16_note(rates)
    assert 'no bf16 units' in note and 'bf16 is emulated' in note
    assert '1.3 GFLOP/s' in note and '138x slower' in note and '--amp runs fp32' in note
    assert benchmark.emulated_bf16_note({'fp32': 180.0}) is None
    assert benchmark.emulated_bf16_note(rates, device='cuda') is None
    monkeypatch.setattr(benchmark, 'cpu_bf16_units', lambda: ('amx_bf16', ))
    assert benchmark.emulated_bf16_note(rates) is None
    monkeypatch.setattr(benchmark, 'cpu_bf16_units', lambda: None)  # flags unknown: no claim
    assert benchmark.emulated_bf16_note(rates) is None


@pytest.mark.slow
def test_benchmark_says_to_train_upernet_with_a_batch_of_two():
    import subprocess
    import sys
    from pathlib import Path
    config = 'configs/segmentation/upernet_poolformer_s12.py'
    result = subprocess.run(
        [sys.executable, 'tools/analysis/benchmark.py', '--model', config, '--mode', 'train',
         '--shape', '64', '--repeat', '1', '--warmup', '0', '--variants', 'fast'],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f'error: {config}: a training step at --batch 1 has a batch norm '
                           'with one value per channel (Expected more than 1 value'), last
    assert last.endswith('; use --batch 2')
