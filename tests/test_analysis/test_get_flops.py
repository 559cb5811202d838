"""tools/analysis/get_flops.py: parameters and MACs against the paper's figures."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn as nn

from poolformer_mm.analysis.complexity import backbone_complexity, image_shape, model_complexity
from poolformer_mm.models import PoolFormer

REPO = Path(__file__).resolve().parents[2]

# Paper Table 1 (MACs counted with fvcore at 224x224) and the dense backbones' exact sizes.
PAPER_MACS_G = {'s12': 1.8, 's24': 3.4, 's36': 5.0, 'm36': 8.8, 'm48': 11.6}
DENSE_BACKBONE_PARAMS = {'s12': 11_403_200, 's24': 20_876_992, 's36': 30_350_784,
                         'm36': 55_404_864, 'm48': 72_705_792}


@pytest.fixture(scope='module')
def backbones_at_224():
    # One trace per arch, shared by the tests below (tracing M48 takes a few seconds).
    return {arch: backbone_complexity(arch, 224) for arch in PAPER_MACS_G}


@pytest.mark.slow
@pytest.mark.parametrize('arch, macs_g', PAPER_MACS_G.items())
def test_backbone_macs_at_224_round_to_the_paper(backbones_at_224, arch, macs_g):
    assert round(backbones_at_224[arch].macs_g, 1) == macs_g


@pytest.mark.parametrize('arch, params', DENSE_BACKBONE_PARAMS.items())
def test_backbone_parameter_count_is_exact(backbones_at_224, arch, params):
    assert backbones_at_224[arch].params == params


def test_pooling_gelu_and_elementwise_ops_are_reported_as_uncounted(backbones_at_224):
    s12 = backbones_at_224['s12']  # 12 blocks
    assert set(s12.macs_by_operator) == {'conv', 'group_norm'}
    assert s12.uncounted_ops == {'aten::avg_pool2d': 12, 'aten::gelu': 12, 'aten::sub': 12,
                                 'aten::add': 24, 'aten::mul': 24}


class _ImageNetClassifier(nn.Module):
    """The paper's classifier: last stage -> final norm -> global mean -> 1000-way linear."""

    def __init__(self, arch):
        super().__init__()
        # The only output norm of out_indices=(3,) plays the classifier's final norm.
        self.backbone = PoolFormer(arch, out_indices=(3, ))
        self.head = nn.Linear(self.backbone.embed_dims[3], 1000)

    def forward(self, x):
        return self.head(self.backbone(x)[0].mean((-2, -1)))


def test_classifier_and_dense_backbone_differ_by_far_less_than_the_rounding(backbones_at_224):
    classifier = backbone_complexity(_ImageNetClassifier('s12'), 224)
    assert classifier.params == 11_915_176  # the official ImageNet S12
    assert abs(classifier.macs - backbones_at_224['s12'].macs) < 0.005e9


@pytest.mark.parametrize('config, params', [
    ('configs/detection/retinanet_poolformer_s12.py', 21_653_044),
    ('configs/segmentation/fpn_poolformer_s12.py', 15_669_846),
])
@pytest.mark.slow
def test_whole_model_parameters_match_the_paper_and_macs_exceed_the_backbone(
        backbones_at_224, config, params):
    # Parameters do not depend on the input; a small image keeps the trace quick.
    model = model_complexity(REPO / config, shape=256)
    assert model.params == params
    assert model.input_shape == (256, 256)
    # Every backbone op works per position, so its MACs grow with the pixel count; the neck and
    # heads come on top.
    backbone_macs_at_256 = backbones_at_224['s12'].macs * (256 / 224)**2
    assert model.macs > backbone_macs_at_256 + 1e9


def test_backbone_part_takes_the_configs_out_indices():
    # RetinaNet feeds stages 1-3 to the FPN, so stage 0 has no output norm (2 x 64 parameters).
    result = model_complexity(REPO / 'configs/detection/retinanet_poolformer_s12.py',
                              part='backbone')
    assert result.params == DENSE_BACKBONE_PARAMS['s12'] - 128
    assert result.input_shape == (224, 224)


def test_shape_accepts_one_side_or_height_and_width():
    assert image_shape(224, (1, 1)) == (224, 224)
    assert image_shape([1280, 800], (1, 1)) == (1280, 800)
    assert image_shape(None, (512, 512)) == (512, 512)
    with pytest.raises(ValueError, match='height and width'):
        image_shape((1, 2, 3), (1, 1))


def test_a_non_poolformer_backbone_config_is_refused_with_a_hint():
    with pytest.raises(ValueError, match="part='model'"):
        backbone_complexity(dict(type='ResNet', depth=50))


@pytest.mark.slow
def test_script_prints_s12_params_macs_and_the_uncounted_ops():
    done = subprocess.run([sys.executable, 'tools/analysis/get_flops.py', '--arch', 's12'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith('PoolFormer-S12'))
    assert row.split()[1:] == ['224x224', '11,403,200', '11.40', '1.824']
    assert 'avg_pool2d x12' in done.stdout and 'gelu x12' in done.stdout
    assert 'Not counted' in done.stdout


@pytest.mark.slow
def test_script_on_a_segmentor_config_prints_no_warnings_nobody_can_act_on():
    done = subprocess.run([sys.executable, 'tools/analysis/get_flops.py',
                           'configs/segmentation/toy/fpn_poolformer_s12_toy.py', '--shape', '64'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert 'fpn_poolformer_s12_toy.py [model]        64x64  15,651,141' in done.stdout
    # mmseg's notices while its heads and losses are built (see poolformer_mm.utils.known_warnings)
    assert 'Warning' not in done.stderr, done.stderr
