"""``--deploy``'s neck and head changes: the folded FPN, batch norms folded into convolutions,
and the Semantic FPN head's forward. The same outputs as mmdet's and mmseg's FPN and mmseg's
``FPNHead`` in every configuration they take, and the cases left as they are, with the
reason."""
import copy

import pytest
import torch
import torch.nn as nn
from mmdet.models.necks import FPN as MMDetFPN
from mmdet.registry import MODELS as DET_MODELS
from mmengine.config import Config
from mmseg.models.decode_heads import FPNHead
from mmseg.models.necks import FPN as MMSegFPN
from mmseg.registry import MODELS as SEG_MODELS

from poolformer_mm.deploy.folded_fpn import FoldedFPN
from poolformer_mm.deploy.folded_fpn_head import ConvAppliedByNeck, FoldedFPNWithHeadConv
from poolformer_mm.models.decode_heads import LowMemoryFPNHead

S12_CHANNELS = [64, 128, 320, 512]

FPN_SETUPS = {
    'semantic FPN (mmseg)': (MMSegFPN, dict(num_outs=4)),
    'Mask R-CNN (max-pooled extra level)': (MMDetFPN, dict(num_outs=5)),
    'RetinaNet (from stage 2, extra convs on input)': (
        MMDetFPN, dict(num_outs=5, start_level=1, add_extra_convs='on_input')),
    'extra convs on output with ReLU': (
        MMDetFPN, dict(num_outs=6, add_extra_convs='on_output', relu_before_extra_convs=True)),
    'extra convs on lateral': (MMDetFPN, dict(num_outs=5, add_extra_convs='on_lateral')),
    'fixed scale factor': (
        MMSegFPN, dict(num_outs=4, upsample_cfg=dict(mode='nearest', scale_factor=2))),
    'end level': (MMDetFPN, dict(num_outs=3, end_level=2)),
}


def _fpn(setup, seed=0, channels=S12_CHANNELS, **overrides):
    cls, kwargs = FPN_SETUPS[setup]
    torch.manual_seed(seed)
    fpn = cls(channels, 256, **{**kwargs, **overrides}).eval()
    with torch.no_grad():  # biases far from zero: the border correction must hold them
        for module in fpn.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(std=0.05)
                if module.bias is not None:
                    module.bias.normal_(std=1.0)
    return fpn


def _features(height, width, batch=2, channels=S12_CHANNELS, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, max(height // 2**i, 1), max(width // 2**i, 1), generator=generator)
        for i, c in enumerate(channels)
    ]


def _assert_same_outputs(expected, actual, rel=1e-5):
    assert len(actual) == len(expected)
    for a, b in zip(expected, actual):
        assert b.shape == a.shape and b.dtype == a.dtype
        assert (a - b).abs().max().item() <= rel * a.abs().max().item()


@pytest.mark.parametrize('setup', FPN_SETUPS)
@pytest.mark.parametrize('height, width', [(64, 96), (8, 8), (4, 4), (2, 6), (60, 44)])
def test_folded_fpn_gives_the_fpn_outputs(setup, height, width):
    fpn = _fpn(setup)
    folded = FoldedFPN.fold(fpn)
    assert isinstance(folded, FoldedFPN)
    features = _features(height, width)
    with torch.no_grad():
        try:
            expected = fpn(features)
        except RuntimeError:  # a fixed scale factor on sizes that do not halve evenly
            with pytest.raises(RuntimeError, match='size of tensor'):
                folded(features)
            return
        _assert_same_outputs(expected, folded(features))


@pytest.mark.parametrize('setup', ['semantic FPN (mmseg)', 'Mask R-CNN (max-pooled extra level)'])
def test_folded_fpn_computes_sizes_that_are_not_twice_the_coarser_the_plain_way(setup):
    fpn = _fpn(setup)
    folded = FoldedFPN.fold(fpn)
    features = _features(17, 33)  # 17x33 over 8x16: nearest upsampling repeats unevenly
    with torch.no_grad():
        _assert_same_outputs(fpn(features), folded(features), rel=0)


def test_folded_fpn_runs_fewer_multiply_adds_on_the_finest_level():
    fpn = _fpn('semantic FPN (mmseg)')
    folded = FoldedFPN(fpn)
    # per fine pixel: 9 taps on 64 channels and 4 coarse taps on 256, against a 1x1 lateral
    # and 9 taps on 256 channels
    assert folded.folded_weight.shape == (256, 64, 3, 3)
    assert folded.parity_weight.shape == (4 * 256, 256, 2, 2)
    folded_macs = folded.folded_weight.numel() + folded.parity_weight.numel() / 4
    plain_macs = fpn.lateral_convs[0].conv.weight.numel() + fpn.fpn_convs[0].conv.weight.numel()
    assert folded_macs / plain_macs == pytest.approx(0.676, abs=1e-3)


def test_semantic_fpn_s12_neck_runs_10_3_instead_of_13_4_gmacs_at_512():
    fpn = _fpn('semantic FPN (mmseg)')
    folded = FoldedFPN(fpn)
    sides = [128 // 2**i for i in range(4)]  # S12's strides 4..32 at 512x512
    plain = sum((lateral.conv.weight.numel() + output.conv.weight.numel()) * side**2
                for lateral, output, side in zip(fpn.lateral_convs, fpn.fpn_convs, sides))
    coarse = sides[1] + 1  # the parity convolution's output, padded by one
    folded_macs = (plain - (fpn.lateral_convs[0].conv.weight.numel() +
                            fpn.fpn_convs[0].conv.weight.numel()) * sides[0]**2 +
                   folded.folded_weight.numel() * sides[0]**2 +
                   folded.parity_weight.numel() * coarse**2)
    assert round(plain / 1e9, 1) == 13.4 and round(folded_macs / 1e9, 1) == 10.3


def test_folded_fpn_keeps_the_fpn_parameters_and_state_dict():
    fpn = _fpn('semantic FPN (mmseg)')
    folded = FoldedFPN(fpn)
    assert list(folded.state_dict()) == list(fpn.state_dict())
    assert folded.lateral_convs is fpn.lateral_convs and folded.fpn_convs is fpn.fpn_convs


def test_folded_fpn_outputs_keep_the_fpn_layout():
    """Contiguous in, contiguous out, as the FPN: mmcv's CPU RoIAlign ignores strides."""
    fpn = _fpn('Mask R-CNN (max-pooled extra level)')
    folded = FoldedFPN.fold(fpn)
    with torch.no_grad():
        outs = folded(_features(32, 48))
    assert all(out.is_contiguous() for out in outs)


def test_folded_fpn_refolds_after_new_weights_are_loaded_or_edited():
    fpn = _fpn('semantic FPN (mmseg)')
    folded = FoldedFPN(_fpn('semantic FPN (mmseg)', seed=5)).to(memory_format=torch.channels_last)
    features = _features(32, 32)
    folded.load_state_dict(fpn.state_dict())
    with torch.no_grad():
        _assert_same_outputs(fpn(features), folded(features))
        # the refolded kernels keep the layout --deploy gave them
        assert folded.parity_weight.is_contiguous(memory_format=torch.channels_last)
        for module in (fpn, folded):  # an in-place edit, as an EMA swap makes
            module.lateral_convs[0].conv.bias.mul_(-2)
        _assert_same_outputs(fpn(features), folded(features))


def test_folded_fpn_gives_the_finest_convolutions_their_gradients():
    fpn = _fpn('Mask R-CNN (max-pooled extra level)')
    folded = FoldedFPN(_fpn('Mask R-CNN (max-pooled extra level)'))
    features = _features(16, 16)
    for module in (fpn, folded):
        sum(out.square().sum() for out in module(features)).backward()
    for (name, expected), actual in zip(fpn.named_parameters(), folded.parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-5, atol=1e-4, msg=name)


def test_folded_fpn_follows_channels_last_and_bf16_autocast():
    fpn = _fpn('semantic FPN (mmseg)')
    features = _features(64, 64, batch=1)
    with torch.no_grad():
        expected = fpn(features)
    folded = FoldedFPN(fpn).to(memory_format=torch.channels_last)
    assert folded.parity_weight.is_contiguous(memory_format=torch.channels_last)
    channels_last = [f.contiguous(memory_format=torch.channels_last) for f in features]
    with torch.no_grad():
        _assert_same_outputs(expected, folded(channels_last))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = folded(channels_last)
    assert low[0].dtype == torch.bfloat16
    for a, b in zip(expected, low):
        assert (a - b.float()).abs().max().item() <= 2e-2 * a.abs().max().item()


@pytest.mark.parametrize('change, reason', [
    (dict(norm_cfg=dict(type='BN')), 'a norm, an activation'),
    (dict(act_cfg=dict(type='ReLU')), 'a norm, an activation'),
    (dict(upsample_cfg=dict(mode='bilinear')), 'is not nearest by 2'),
    (dict(upsample_cfg=dict(mode='nearest', scale_factor=3)), 'is not nearest by 2'),
    (dict(start_level=3, num_outs=1), 'single backbone level'),
    (dict(channels=[160, 128, 320, 512]), '160 channels, too many'),
])
def test_fpns_that_do_not_fold_say_why(change, reason):
    channels = change.pop('channels', S12_CHANNELS)
    fpn = _fpn('semantic FPN (mmseg)', channels=channels, **change)
    assert reason in FoldedFPN.why_not_foldable(fpn)
    assert FoldedFPN.fold(fpn) is None
    with pytest.raises(ValueError, match='FoldedFPN cannot fold this FPN: .*' + reason):
        FoldedFPN(fpn)


def test_a_subclass_of_fpn_is_not_folded():

    class OwnFPN(MMDetFPN):

        def forward(self, inputs):
            return super().forward(inputs)[::-1]

    fpn = OwnFPN(S12_CHANNELS, 256, num_outs=4)
    assert 'OwnFPN is not mmdet\'s or mmseg\'s FPN' == FoldedFPN.why_not_foldable(fpn)


@pytest.mark.parametrize('config', [
    'configs/segmentation/fpn_poolformer_s12.py', 'configs/detection/retinanet_poolformer_s12.py',
    'configs/detection/mask_rcnn_poolformer_s12.py'
])
def test_the_paper_configs_necks_fold(config):
    neck_cfg = Config.fromfile(config).model.neck
    registry = SEG_MODELS if 'segmentation' in config else DET_MODELS
    assert FoldedFPN.why_not_foldable(registry.build(neck_cfg)) is None


def test_folded_fpn_refuses_a_wrong_number_of_feature_maps():
    folded = FoldedFPN(_fpn('semantic FPN (mmseg)'))
    with pytest.raises(ValueError, match=r'takes 4 feature maps .* not 3'):
        folded(_features(32, 32)[:3])


# --------------------------------------------------------------------------- Semantic FPN head
def _heads(seed=0):
    kwargs = dict(in_channels=[256] * 4, in_index=[0, 1, 2, 3], feature_strides=[4, 8, 16, 32],
                  channels=128, num_classes=150, norm_cfg=dict(type='BN'))
    torch.manual_seed(seed)
    upstream = FPNHead(**kwargs)
    ours = LowMemoryFPNHead(**kwargs)
    with torch.no_grad():
        for bn in [m for m in upstream.modules() if isinstance(m, nn.BatchNorm2d)]:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    ours.load_state_dict(upstream.state_dict())
    return upstream.eval(), ours.eval()


@pytest.mark.parametrize('size', [64, 60])
def test_semantic_fpn_head_forward_equals_mmseg(size):
    upstream, ours = _heads()
    features = [torch.randn(1, 256, size // 2**i, size // 2**i) for i in range(4)]
    with torch.no_grad():
        torch.testing.assert_close(ours(features), upstream(features), rtol=0, atol=0)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            torch.testing.assert_close(ours(features), upstream(features), rtol=0, atol=0)


def test_semantic_fpn_head_gradients_equal_mmseg():
    upstream, ours = _heads()
    features = [torch.randn(1, 256, 32 // 2**i, 32 // 2**i) for i in range(4)]
    for head in (upstream, ours):
        head.train()
        torch.manual_seed(2)  # the same dropout mask
        head(features).square().mean().backward()
    grads = {name: p.grad for name, p in upstream.named_parameters()}
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=0, atol=0)


@pytest.mark.parametrize('neck_channels, logged', [
    (256, 'FPN neck folded (FoldedFPN)'),
    (64, 'neck not folded (its finest backbone level has 64 channels, too many'),
])
def test_deploy_hook_folds_the_fpn_neck_inside_wrappers_and_logs_why_not(neck_channels, logged,
                                                                          tta_wrapped):
    from types import SimpleNamespace

    from poolformer_mm.engine.hooks.deploy import DeployBackboneHook
    from poolformer_mm.models import PoolFormer

    class Detector(nn.Module):

        def __init__(self):
            super().__init__()
            self.backbone = PoolFormer('s12')
            self.neck = MMDetFPN(S12_CHANNELS, neck_channels, num_outs=5)

        def forward(self, x):
            return self.neck(self.backbone(x))

    torch.manual_seed(0)
    model = Detector().eval()
    x = torch.randn(1, 3, 64, 96)
    messages = []
    with torch.no_grad():
        expected = model(x)
        DeployBackboneHook().before_test(
            SimpleNamespace(model=tta_wrapped(model), logger=SimpleNamespace(info=messages.append)))
        _assert_same_outputs(expected, model(x))
    assert isinstance(model.neck, FoldedFPN) == (neck_channels == 256)
    assert len(messages) == 1 and logged in messages[0]
    # folding again changes nothing and says the same
    from poolformer_mm.deploy.fold import fold_fpn_neck
    neck = model.neck
    assert (fold_fpn_neck(model) is None) == (neck_channels == 256) and model.neck is neck


# ------------------------------------------------------------------------------ batch norms
def _conv_module(order=('conv', 'norm', 'act'), norm_cfg=dict(type='BN'), **kwargs):
    from mmcv.cnn import ConvModule
    torch.manual_seed(0)
    module = ConvModule(16, 16, 3, padding=1, norm_cfg=norm_cfg, order=order, **kwargs)
    with torch.no_grad():  # statistics and affine parameters far from their initial values
        for param in module.norm.parameters():
            param.normal_()
        if hasattr(module.norm, 'running_var'):
            module.norm.running_mean.normal_()
            module.norm.running_var.uniform_(0.5, 2)
    return module.eval()


@pytest.mark.parametrize('order, extra, folds', [
    (('conv', 'norm', 'act'), dict(), True),
    (('conv', 'norm', 'act'), dict(norm_cfg=dict(type='SyncBN')), True),
    (('conv', 'norm', 'act'), dict(efficient_conv_bn_eval=True), True),
    (('act', 'conv', 'norm'), dict(), True),
    (('norm', 'conv', 'act'), dict(), False),  # registered conv first, runs norm first
    (('conv', 'act', 'norm'), dict(), False),  # the activation runs in between
    (('conv', 'norm', 'act'), dict(norm_cfg=dict(type='GN', num_groups=4)), False),
    (('conv', 'norm', 'act'), dict(conv_cfg=dict(type='ConvWS')), False),  # standardises
    (('conv', 'norm', 'act'), dict(with_spectral_norm=True), False),
])
def test_batch_norms_fold_only_into_the_convolutions_they_directly_follow(order, extra, folds):
    from poolformer_mm.deploy.fold import fold_batch_norms
    module = _conv_module(order, **extra)
    x = torch.randn(2, 16, 12, 10)
    with torch.no_grad():
        expected = module(x)
        assert fold_batch_norms(module) == int(folds)
        module.eval()  # as the test loop does after the deploy hook
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(module.norm, nn.Identity) == folds


def test_a_convolution_shared_by_several_conv_modules_keeps_their_batch_norms():
    """As RTMDet's head shares one convolution across levels, each with its own norm."""
    from poolformer_mm.deploy.fold import fold_batch_norms
    levels = nn.ModuleList(_conv_module() for _ in range(3))
    for level in levels[1:]:
        level.conv = levels[0].conv
    with torch.no_grad():
        for level in levels:
            level.norm.running_mean.normal_()
    assert fold_batch_norms(levels) == 0
    assert all(isinstance(level.norm, nn.BatchNorm2d) for level in levels)


# ------------------------------------------------------ the head's first convolution, merged
class _Segmentor(nn.Module):
    """The neck and decode head of a Semantic FPN (what ``--deploy`` merges), with its batch
    norms' statistics and affine maps far from their initial values."""

    def __init__(self, head_cls=LowMemoryFPNHead, channels=S12_CHANNELS, head_channels=128,
                 seed=0, **head_kwargs):
        super().__init__()
        self.neck = _fpn('semantic FPN (mmseg)', seed=seed, channels=channels)
        kwargs = dict(in_channels=[256] * 4, in_index=[0, 1, 2, 3],
                      feature_strides=[4, 8, 16, 32], channels=head_channels, num_classes=19,
                      norm_cfg=dict(type='BN'))
        torch.manual_seed(seed)
        self.decode_head = head_cls(**{**kwargs, **head_kwargs})
        with torch.no_grad():
            for module in self.decode_head.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.normal_()
                    module.running_var.uniform_(0.5, 2)
                    module.weight.normal_()
                    module.bias.normal_()
        self.eval()

    def forward(self, features):
        return self.decode_head(self.neck(features))


def _merged(segmentor):
    from poolformer_mm.deploy.fold import fold_batch_norms, fold_fpn_neck, merge_head_conv_into_neck
    assert fold_fpn_neck(segmentor) is None
    fold_batch_norms(segmentor)
    return merge_head_conv_into_neck(segmentor)


@pytest.mark.parametrize('head_cls', [FPNHead, LowMemoryFPNHead])
@pytest.mark.parametrize('height, width', [(64, 96), (8, 8), (4, 4), (2, 6), (60, 44), (2, 2),
                                           (17, 33)])
def test_merged_head_convolution_gives_the_segmentors_outputs(head_cls, height, width):
    segmentor = _Segmentor(head_cls)
    features = _features(height, width)
    with torch.no_grad():
        expected = segmentor(features)
        assert _merged(segmentor) is None
        assert isinstance(segmentor.neck, FoldedFPNWithHeadConv)
        assert type(segmentor.decode_head.scale_heads[0][0].conv) is ConvAppliedByNeck
        _assert_same_outputs([expected], [segmentor(features)])


def test_merged_head_convolution_runs_8_2_instead_of_11_7_gmacs_at_512():
    """Semantic FPN-S12 at 512x512: the finest level (128x128) and the head's first convolution
    as the folded FPN computes them and merged: 25 taps on 64 channels plus 3x3 coarse taps for
    each of four parities, against 9 taps on 64, 2x2 coarse taps and the head's 9 on 256."""
    segmentor = _Segmentor()
    folded = FoldedFPN(segmentor.neck)
    head_conv = segmentor.decode_head.scale_heads[0][0].conv
    fine, coarse = 128, 64
    before = (folded.folded_weight.numel() * fine**2
              + folded.parity_weight.numel() * (coarse + 1)**2
              + head_conv.weight.numel() * fine**2)
    _merged(segmentor)
    merged = segmentor.neck
    assert merged.folded_weight.shape == (128, 64, 5, 5)
    assert merged.parity_weight.shape == (4 * 128, 256, 3, 3)
    after = merged.folded_weight.numel() * fine**2 + merged.parity_weight.numel() * coarse**2
    assert round(before / 1e9, 1) == 11.7 and round(after / 1e9, 1) == 8.2


def test_merged_head_convolution_keeps_the_state_dict_and_follows_new_weights():
    from poolformer_mm.deploy.fold import fold_batch_norms
    segmentor, other = _Segmentor(), _Segmentor(seed=3)
    batch_norms_folded = copy.deepcopy(segmentor)
    fold_batch_norms(batch_norms_folded)
    features = _features(32, 48)
    _merged(segmentor)
    _merged(other)
    for (key, expected), (name, actual) in zip(batch_norms_folded.state_dict().items(),
                                               segmentor.state_dict().items()):
        assert name == key and torch.equal(actual, expected)
    assert len(segmentor.state_dict()) == len(batch_norms_folded.state_dict())
    with torch.no_grad():
        other.load_state_dict(segmentor.state_dict())  # the batch norms are folded in both
        _assert_same_outputs([segmentor(features)], [other(features)])
        for model in (segmentor, other):  # an in-place edit of the head's convolution
            model.decode_head.scale_heads[0][0].conv.bias.mul_(-2)
        _assert_same_outputs([segmentor(features)], [other(features)])


def test_a_copy_of_a_merged_model_uses_its_own_head_convolution():
    segmentor = _Segmentor()
    _merged(segmentor)
    features = _features(32, 32)
    clone = copy.deepcopy(segmentor)
    with torch.no_grad():
        expected = segmentor(features)
        clone.decode_head.scale_heads[0][0].conv.weight.mul_(0.5)
        _assert_same_outputs([expected], [segmentor(features)], rel=0)
        assert (clone(features) - expected).abs().max() > 1e-3 * expected.abs().max()


def test_merged_head_convolution_gets_its_gradients():
    """Under autograd with trainable weights the neck computes the finest level the plain way
    and applies the head's convolution to it, so every parameter gets its gradient."""
    from poolformer_mm.deploy.fold import fold_batch_norms
    segmentor, merged = _Segmentor(), _Segmentor()
    fold_batch_norms(segmentor)
    _merged(merged)
    features = _features(16, 16)
    for model in (segmentor, merged):
        model(features).square().mean().backward()
    for (name, expected), actual in zip(segmentor.named_parameters(), merged.parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_merged_head_convolution_follows_channels_last_and_bf16_autocast():
    segmentor = _Segmentor()
    features = _features(64, 64, batch=1)
    with torch.no_grad():
        expected = segmentor(features)
    _merged(segmentor)
    segmentor.to(memory_format=torch.channels_last)
    assert segmentor.neck.parity_weight.is_contiguous(memory_format=torch.channels_last)
    channels_last = [f.contiguous(memory_format=torch.channels_last) for f in features]
    with torch.no_grad():
        _assert_same_outputs([expected], [segmentor(channels_last)])
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = segmentor(channels_last)
    assert low.dtype == torch.bfloat16
    assert (expected - low.float()).abs().max().item() <= 2e-2 * expected.abs().max().item()


class _OwnHead(FPNHead):

    def forward(self, inputs):
        return super().forward(inputs) * 2


@pytest.mark.parametrize('change, reason', [
    (dict(head_cls=_OwnHead), 'the decode head is _OwnHead, not FPNHead'),
    (dict(in_index=[0, 1, 2, 0]), "does not read the FPN's finest level once"),
    (dict(in_index=[1, 0, 2, 3]), "does not read the FPN's finest level once"),
    (dict(norm_cfg=dict(type='GN', num_groups=8)), 'is not one 3x3 convolution'),
    (dict(head_channels=256), 'would not save multiply-adds'),
    (dict(auxiliary=True), 'an auxiliary head reads'),
    (dict(norm_cfg=None, share='conv'), "the head's first convolution is shared"),
    (dict(norm_cfg=None, share='conv_module'), "the head's first convolution is shared"),
])
def test_head_convolutions_that_are_not_merged_say_why(change, reason):
    auxiliary, share = change.pop('auxiliary', False), change.pop('share', None)
    segmentor = _Segmentor(**change)
    if auxiliary:
        segmentor.auxiliary_head = FPNHead(
            in_channels=[256, 256], in_index=[-4, 2], feature_strides=[4, 8], channels=32,
            num_classes=19)
    if share:  # the second scale head's first convolution is the first one's
        first, second = (head[0] for head in segmentor.decode_head.scale_heads[:2])
        if share == 'conv':
            second.conv = first.conv
        else:
            segmentor.decode_head.scale_heads[1][0] = first
    features = _features(32, 32)
    with torch.no_grad():
        expected = segmentor(features)
        assert reason in _merged(segmentor)
        assert type(segmentor.neck) is FoldedFPN
        _assert_same_outputs([expected], [segmentor(features)])


def test_the_log_line_says_what_was_merged_and_why_not():
    from poolformer_mm.deploy.fold import InferenceForm
    merged = InferenceForm(None, 7, None).describe()
    assert ("FPN neck folded (FoldedFPNWithHeadConv: the decode head's first 3x3 convolution "
            'merged into its finest level); 7 batch norm(s)') in merged
    left = InferenceForm(None, 2, 'the decode head is UPerHead, not FPNHead').describe()
    assert ("FPN neck folded (FoldedFPN) (the head's first convolution not merged: the decode "
            'head is UPerHead, not FPNHead)') in left
    detector = InferenceForm(None, 0, 'the model has no decode head').describe()
    assert 'FPN neck folded (FoldedFPN); 0 batch' in detector and 'merged' not in detector
    assert 'merged' not in InferenceForm('the model has no neck', 4,
                                         'the neck is not a folded FPN').describe()
