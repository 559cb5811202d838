"""The paper's released detection and segmentation checkpoints load wherever a checkpoint loads.

sail-sg/poolformer released whole models of mmdet 2.19 and mmseg 0.19: the backbone has the names
of the official ``poolformer_*_feat`` class (``patch_embed.proj``, ``network.{i}.{j}``,
``network.{i}.proj``, ``layer_scale_{1,2}``, output norms ``norm0/2/4/6``; the RetinaNet models,
trained with ``FORK_LAST3=1``, have no ``norm0``), the neck and heads the names mmdet 3.x and
mmseg 1.x give them. Files in that layout are made here from the toy models by renaming keys by
those rules; their random weights are enough to compare predictions exactly with the same
weights in this package's layout.
"""
import pickle
import re
import runpy
import sys

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.runner import load_checkpoint

from poolformer_mm.apis.inference import init_inferencer
from poolformer_mm.cli.train_test import run_testing
from poolformer_mm.datasets import make_toy_ade, make_toy_coco
from poolformer_mm.models import PoolFormer, checkpoint_layouts
from poolformer_mm.models.checkpoint_fit import check_checkpoint_fits

TOY_RETINANET = 'configs/detection/toy/retinanet_poolformer_s12_toy.py'
TOY_MASK_RCNN = 'configs/detection/toy/mask_rcnn_poolformer_s12_toy.py'
TOY_FPN = 'configs/segmentation/toy/fpn_poolformer_s12_toy.py'
CONVERTER = 'tools/model_converters/convert_poolformer.py'


def to_paper_layout(state):
    """A whole model's state dict -> the names of the paper's released checkpoints."""
    out = {}
    for key, value in state.items():
        key = key.replace('backbone.stem.conv.', 'backbone.patch_embed.proj.')
        key = re.sub(r'^backbone\.stages\.(\d)\.downsample\.conv\.',
                     lambda m: f'backbone.network.{2 * int(m[1]) - 1}.proj.', key)
        key = re.sub(r'^backbone\.stages\.(\d)\.blocks\.',
                     lambda m: f'backbone.network.{2 * int(m[1])}.', key)
        key = re.sub(r'^(backbone\..*)layer_scale(\d)\.scale$', r'\1layer_scale_\2', key)
        key = re.sub(r'^backbone\.output_norms\.(\d)\.',
                     lambda m: f'backbone.norm{2 * int(m[1])}.', key)
        out[key] = value
    return out


def _randomise(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.1)


@pytest.fixture(scope='module')
def released(tmp_path_factory, build_model):
    """Per toy config: its classes, the state dict, and the same random weights saved as
    tools/train.py saves them and as mmdet 2.19 / mmseg 0.19 saved the paper's models."""
    folder = tmp_path_factory.mktemp('released')
    files = {}
    for seed, config in enumerate((TOY_RETINANET, TOY_MASK_RCNN, TOY_FPN)):
        cfg = Config.fromfile(config)
        model = build_model(cfg)  # (PyTorch's initial values: random enough here)
        _randomise(model.backbone, seed)
        if config == TOY_RETINANET:  # every anchor scores 0.5: boxes to compare
            model.bbox_head.retina_cls.bias.data.zero_()
        state = {key: value.clone() for key, value in model.state_dict().items()}
        classes = tuple(cfg.metainfo['classes'])
        name = config.split('/')[-1][:-3]
        ours, paper = folder / f'{name}.pth', folder / f'{name}_paper.pth'
        torch.save(dict(meta=dict(dataset_meta=dict(cfg.metainfo)), state_dict=state), ours)
        upstream = 'mmdet_version' if cfg.default_scope == 'mmdet' else 'mmseg_version'
        paper_meta = {upstream: '2.19.0' if upstream == 'mmdet_version' else '0.19.0',
                      'mmcv_version': '1.4.0', 'CLASSES': classes, 'epoch': 12,
                      'config': 'model = dict(...)  # the mmdet 2.x / mmseg 0.x config'}
        if 'palette' in cfg.metainfo:
            paper_meta['PALETTE'] = [list(color) for color in cfg.metainfo['palette']]
        torch.save(dict(meta=paper_meta, state_dict=to_paper_layout(state)), paper)
        files[config] = dict(state=state, ours=str(ours), paper=str(paper), classes=classes,
                             palette=paper_meta.get('PALETTE'), model=model)
    return files


def test_the_files_have_the_papers_layout(released):
    keys = torch.load(released[TOY_RETINANET]['paper'], weights_only=True)['state_dict']
    assert 'backbone.patch_embed.proj.weight' in keys
    assert 'backbone.network.1.proj.weight' in keys and 'backbone.network.4.5.norm1.weight' in keys
    assert 'backbone.network.0.1.layer_scale_2' in keys
    norms = sorted({k.split('.')[1] for k in keys if re.match(r'backbone\.norm\d', k)})
    assert norms == ['norm2', 'norm4', 'norm6']  # FORK_LAST3: no norm0
    keys = torch.load(released[TOY_MASK_RCNN]['paper'], weights_only=True)['state_dict']
    assert {k.split('.')[1] for k in keys if re.match(r'backbone\.norm\d', k)} == {
        'norm0', 'norm2', 'norm4', 'norm6'}


def _logs(monkeypatch):
    logged = []
    monkeypatch.setattr(checkpoint_layouts, 'print_log', lambda msg, **kwargs: logged.append(msg))
    return logged


def _assert_holds(model, expected):
    assert model.state_dict().keys() == expected.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize('config', [TOY_RETINANET, TOY_MASK_RCNN, TOY_FPN])
def test_upstream_load_checkpoint_and_load_state_dict_give_the_same_weights(
        released, config, monkeypatch):
    """What upstream tools/test.py, load_from and the inferencers do: mmengine's
    load_checkpoint, here strict; and torch's own load_state_dict."""
    logged = _logs(monkeypatch)
    expected, model = released[config]['state'], released[config]['model']
    _randomise(model, 100)  # other values everywhere
    load_checkpoint(model, released[config]['paper'], map_location='cpu', strict=True,
                    logger='silent')
    _assert_holds(model, expected)
    count = sum(key.startswith('backbone.') for key in expected)
    assert logged == [
        f"PoolFormer: converted {count} checkpoint tensors under 'backbone.' from the official "
        'mmdet/mmseg layout (sail-sg/poolformer detection and segmentation checkpoints: '
        "patch_embed, network.*, norm0/2/4/6) to this package's names"]

    _randomise(model, 101)
    paper = torch.load(released[config]['paper'], weights_only=True)['state_dict']
    model.load_state_dict(paper, strict=True)
    _assert_holds(model, expected)


@pytest.fixture(scope='module')
def toy_coco(tmp_path_factory):
    return make_toy_coco(str(tmp_path_factory.mktemp('data') / 'coco'), num_train=1, num_val=1)


@pytest.mark.slow
def test_tools_test_gives_the_same_metrics_and_predictions(released, toy_coco, tmp_path):
    results = {}
    for layout in ('ours', 'paper'):
        out = tmp_path / f'{layout}.pkl'
        metrics = run_testing([TOY_RETINANET, released[TOY_RETINANET][layout],
                               '--data-root', toy_coco, '--work-dir', str(tmp_path / layout),
                               '--out', str(out)])
        with open(out, 'rb') as f:
            results[layout] = (metrics, pickle.load(f))
    (metrics, ours), (paper_metrics, paper) = results['ours'], results['paper']
    assert paper_metrics == metrics
    assert len(ours) == len(paper) == 1
    for a, b in zip(ours, paper):
        assert a['pred_instances']['bboxes'].shape[0] > 0
        for field in ('bboxes', 'scores', 'labels'):
            assert torch.equal(a['pred_instances'][field], b['pred_instances'][field])


def _predict(inferencer, image):
    result = inferencer(image, return_datasamples=True)
    sample = result['predictions'] if isinstance(result, dict) else result  # (mmseg's)
    sample = sample[0] if isinstance(sample, list) else sample
    if 'pred_sem_seg' in sample:
        return {'sem_seg': torch.as_tensor(sample.pred_sem_seg.data)}
    return {field: torch.as_tensor(getattr(sample.pred_instances, field))
            for field in ('bboxes', 'scores', 'labels', 'masks')
            if field in sample.pred_instances}


@pytest.mark.slow
@pytest.mark.parametrize('config', [TOY_MASK_RCNN, TOY_FPN])
def test_inferencers_predict_the_same_and_read_the_classes(released, config, tmp_path):
    """tools/infer.py's inferencer, on the paper's file; then the same inferencer with this
    package's file of the same weights loaded the way mmdet / mmseg load it."""
    if config == TOY_FPN:
        image = f"{make_toy_ade(str(tmp_path / 'ade'), 1, 1)}/images/validation/" \
                'ADE_validation_00000001.jpg'
    else:
        image = f"{make_toy_coco(str(tmp_path / 'coco'), 1, 1)}/val2017/000001.png"
    inferencer = init_inferencer(config, released[config]['paper'])
    # the classes of the mmdet 2.x / mmseg 0.x meta (CLASSES, PALETTE)
    assert tuple(inferencer.model.dataset_meta['classes']) == released[config]['classes']
    paper = _predict(inferencer, image)
    load_checkpoint(inferencer.model, released[config]['ours'], map_location='cpu',
                    strict=True, logger='silent')
    ours = _predict(inferencer, image)
    assert ours.keys() == paper.keys()
    for field, value in ours.items():
        assert value.numel() > 0 and torch.equal(value, paper[field]), field


class _Detector(nn.Module):
    """A model that holds a backbone as mmdet's and mmseg's do (``backbone.``)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def test_a_wider_arch_loads_as_well():
    """S36, as the paper's RetinaNet S36 (FORK_LAST3): the same renaming, checked on the
    backbone alone through load_state_dict (strict)."""
    source = _Detector(PoolFormer('s36', out_indices=(1, 2, 3)))
    _randomise(source, 7)
    target = _Detector(PoolFormer('s36', out_indices=(1, 2, 3)))
    paper = to_paper_layout(source.state_dict())
    assert {k.split('.')[1] for k in paper if re.match(r'backbone\.norm', k)} == {
        'norm2', 'norm4', 'norm6'}
    assert 'backbone.network.4.17.layer_scale_1' in paper  # the 18 blocks of stage 3
    target.load_state_dict(paper, strict=True)
    _assert_holds(target, source.state_dict())


def test_a_retinanet_trained_without_fork_last3_loads_without_its_unused_norm0(monkeypatch):
    """The paper's RetinaNet code built norm0 unless FORK_LAST3=1, and its FPN never used it."""
    logged = _logs(monkeypatch)
    source = _Detector(PoolFormer('s12'))
    _randomise(source, 3)
    target = _Detector(PoolFormer('s12', out_indices=(1, 2, 3)))
    target.load_state_dict(to_paper_layout(source.state_dict()), strict=True)
    for key, value in target.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    assert logged[0].endswith('; left out norm0: this PoolFormer returns stages (1, 2, 3) and '
                              'has no output norm for the others')


def test_the_fit_check_names_an_imagenet_classifier_given_as_a_whole_model(
        released, build_model, tmp_path):
    from test_checkpoint_layouts import to_official
    model = build_model(Config.fromfile(TOY_RETINANET))
    check_checkpoint_fits(model, released[TOY_RETINANET]['paper'])  # the paper's: fits
    path = tmp_path / 'poolformer_s12.pth.tar'
    torch.save(to_official(PoolFormer('s12').state_dict()), path)
    with pytest.raises(ValueError, match=r"holds a backbone alone \(official layout: an ImageNet "
                       r'classifier.*random weights.*model\.backbone\.init_cfg') as err:
        check_checkpoint_fits(model, str(path), 'the toy config')
    assert 'another config' not in str(err.value)


def _convert(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, 'argv', [CONVERTER, *map(str, argv)])
    runpy.run_path(CONVERTER, run_name='__main__')
    return capsys.readouterr().out


def test_the_converter_writes_the_whole_model_with_its_meta(released, tmp_path, monkeypatch,
                                                            capsys):
    files = released[TOY_FPN]
    dst = tmp_path / 'fpn_mm.pth'
    out = _convert(monkeypatch, capsys, files['paper'], dst, '--arch', 's12')
    count = sum(key.startswith('backbone.') for key in files['state'])
    assert f'(official mmdet/mmseg layout; a whole model: {count} backbone tensors converted' in out
    converted = torch.load(dst, weights_only=True)
    assert converted['state_dict'].keys() == files['state'].keys()
    for key, value in files['state'].items():
        assert torch.equal(converted['state_dict'][key], value), key
    meta = converted['meta']
    assert meta['mmseg_version'] == '0.19.0' and meta['CLASSES'] == files['classes']
    assert meta['dataset_meta'] == dict(classes=files['classes'], palette=files['palette'])


def test_the_converter_gives_an_official_imagenet_file_the_papers_start(tmp_path, monkeypatch,
                                                                        capsys):
    from test_checkpoint_layouts import to_official
    source = PoolFormer('s12')
    src, dst = tmp_path / 'poolformer_s12.pth.tar', tmp_path / 'poolformer_s12_mm.pth'
    torch.save(to_official(source.state_dict()), src)
    out = _convert(monkeypatch, capsys, src, dst)
    assert '(official layout; backbone of 128 tensors)' in out
    converted = torch.load(dst, weights_only=True)
    assert not any(k.startswith('output_norms.') for k in converted)
    _convert(monkeypatch, capsys, src, dst, '--final-norm', 'classifier')
    assert 'output_norms.3.weight' in torch.load(dst, weights_only=True)
