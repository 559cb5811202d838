"""The snippets for using the backbone in other mm configs, read from README.md and
docs/user_guides/configs.md and put as written on stock mmdet / mmseg bases, and what a user
is told when a part of them is missing.

Only the ``_base_`` line of a snippet changes. The backbone's ``init_cfg`` (the official release
URL, whose loading ``test_official_weights.py`` covers) is dropped so that nothing downloads.
"""
import hashlib
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from poolformer_mm.datasets import make_toy_ade, make_toy_coco
from poolformer_mm.models import InChannelsError, MetaFormer, PoolFormer, check_neck_in_channels
from poolformer_mm.utils.config import read_config
from poolformer_mm.utils.errors import InvalidInputError

REPO = Path(__file__).resolve().parents[2]

README = (REPO / 'README.md').read_text()
SNIPPET_PAGES = README + (REPO / 'docs' / 'user_guides' / 'configs.md').read_text()
STOCK_BASES = {
    'mmdet': [
        'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
        'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
        'mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py',
        'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
        'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
    ],
    'mmseg': ['mmseg::_base_/models/fpn_r50.py'],
    'mmseg-no-neck': ['mmseg::_base_/models/upernet_r50.py'],
}
SIZE = 64
TINY_POOLFORMER = dict(layers=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32], mlp_ratios=[2, 2, 2, 2],
                       layer_scale_init_value=1e-5)
TINY_METAFORMER = dict(layers=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32],
                       token_mixers=['pool', 'pool', 'sepconv', 'sepconv'])


def readme_snippet(name: str) -> str:
    found = re.findall(rf'<!-- stock-base snippet: {re.escape(name)} -->\n```python\n(.*?)```',
                       SNIPPET_PAGES, re.S)
    assert len(found) == 1, f'the docs need exactly one snippet marked {name!r}'
    return found[0]


def on_base(snippet: str, base: str) -> str:
    text, count = re.subn(r"^_base_ = '[^']+'$", f"_base_ = '{base}'", snippet, flags=re.M)
    assert count == 1, snippet
    return text


def load_config(tmp_path, text: str) -> Config:
    path = tmp_path / 'config.py'
    path.write_text(text)
    # (mmseg's model bases set no default_scope: read_config takes it from the base)
    return read_config(str(path))


def _fewer_rois(cfg: Config) -> None:
    """Train the R-CNN heads on 64 sampled RoIs per image instead of 512 (a training setting, not
    the model's): the mask heads of the cascade's three stages cost most of this file's time."""
    train_cfg = cfg.model.get('train_cfg') or {}
    if 'rpn_proposal' in train_cfg:
        train_cfg.rpn_proposal.max_per_img = 200
    rcnn = train_cfg.get('rcnn', [])
    for stage in rcnn if isinstance(rcnn, list) else [rcnn]:
        stage.sampler.num = 64


def snippet_config(tmp_path, name: str, base: str) -> Config:
    cfg = load_config(tmp_path, on_base(readme_snippet(name), base))
    assert cfg.model.backbone.init_cfg.checkpoint == (
        'https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_s12.pth.tar')
    cfg.model.backbone.init_cfg = None
    if cfg.default_scope == 'mmseg':
        # A model base has no crop size; a whole config sets it with its data set.
        cfg.model.data_preprocessor.size = (SIZE, SIZE)
    return cfg


# ------------------------------------------------------------------------- one training step
def _segmentation_batch():
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 19, (1, SIZE, SIZE)))
        samples.append(sample)
    return samples


def _unread_output_norms(model) -> set:
    """Output norms of the stages before the neck's start_level (warned about when built)."""
    first = getattr(getattr(model, 'neck', None), 'start_level', 0)
    return {f'output_norms.{i}.' for i in model.backbone.out_indices[:first]}


@pytest.mark.slow
@pytest.mark.parametrize('snippet, base', [(name, base) for name, bases in STOCK_BASES.items()
                                           for base in bases])
def test_readme_snippet_trains_one_step_on_the_stock_base(snippet, base, tmp_path, build_model,
                                                          detection_samples):
    torch.manual_seed(0)
    cfg = snippet_config(tmp_path, snippet, base)
    _fewer_rois(cfg)
    model = build_model(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        check_neck_in_channels(model)
    unread = _unread_output_norms(model)
    # RetinaNet's and FCOS's FPN start at stage 1: the check says what to return instead
    warned = [w for w in caught if 'start_level' in str(w.message)]
    assert len(warned) == (1 if unread else 0), [str(w.message) for w in caught]
    # (the upstream modules keep their construction-time initialisation: mmengine's report of
    # every parameter's initialisation would cost more than the training step)
    model.backbone.init_weights()
    model.train()  # the mmseg heads' SyncBN runs as BN in one process, as for one GPU

    samples = (_segmentation_batch() if snippet.startswith('mmseg') else
               detection_samples(SIZE, labels=(1, 5)))
    images = [torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8) for _ in samples]
    data = model.data_preprocessor(dict(inputs=images, data_samples=samples), True)
    loss, _ = model.parse_losses(model(**data, mode='loss'))
    loss.backward()

    assert torch.isfinite(loss) and loss > 0
    for name, param in model.backbone.named_parameters():
        if any(name.startswith(prefix) for prefix in unread):
            assert param.grad is None, name
        else:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert any(param.grad.abs().sum() > 0 for param in model.backbone.stem.parameters())


# ------------------------------------------------------------------------- as written, by the tool
def readme_block(marker: str) -> str:
    found = re.findall(rf'<!-- {re.escape(marker)} -->\n```python\n(.*?)```', SNIPPET_PAGES, re.S)
    assert len(found) == 1, marker
    return found[0]


# The shortest run of each kind of whole config on the toy sets (two iterations and a validation
# of one image), as docs/user_guides/configs.md shows them.
SHORT_RUN = {
    'mmdet': ['train_cfg.max_epochs=1', 'train_dataloader.dataset.indices=4',
              'train_dataloader.batch_size=2', 'val_dataloader.dataset.indices=1'],
    'mmseg': ['train_cfg.max_iters=2', 'train_cfg.val_interval=2', 'train_dataloader.batch_size=2',
              'val_dataloader.dataset.indices=1', 'default_hooks.checkpoint.interval=2'],
}


@pytest.fixture(scope='module')
def toy_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp('toy')
    return dict(mmdet=make_toy_coco(str(root / 'coco'), num_train=4, num_val=1),
                mmseg=make_toy_ade(str(root / 'ade'), num_train=4, num_val=1))


@pytest.fixture
def cached_release_weights(tmp_path):
    """The file the snippets' init_cfg URL names, in the torch hub cache of a TORCH_HOME of the
    test's own, where a user who has run a config before has it (nothing downloads in tests)."""
    url = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_s12.pth.tar'
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    cache.mkdir(parents=True)
    name = f'{hashlib.sha256(url.encode()).hexdigest()[:8]}-{url.rsplit("/", 1)[1]}'
    torch.manual_seed(0)
    torch.save(PoolFormer('s12').state_dict(), cache / name)
    return dict(os.environ, TORCH_HOME=str(tmp_path / 'torch_home'))


def train_tool(config, data_root, options, env):
    return subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'train.py'), str(config), '--data-root', data_root,
         '--work-dir', str(config.parent / 'work'), '--cfg-options', *options],
        cwd=config.parent, env=env, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['intro', 'mmdet', 'mmseg', 'mmseg-no-neck'])
def test_snippet_trains_as_written_through_the_training_tool(name, tmp_path, toy_sets,
                                                             cached_release_weights):
    """Each snippet as written in a file of its own, trained by tools/train.py on the toy sets
    the way docs/user_guides/configs.md says (for the COCO bases: with its override config
    naming the toy classes), with no scope or setting added by the test."""
    task = 'mmseg' if name.startswith('mmseg') else 'mmdet'
    config = tmp_path / ('my_fpn.py' if task == 'mmseg' else 'my_faster_rcnn.py')
    config.write_text(readme_snippet(name))
    if task == 'mmdet':
        override = readme_block('toy override: coco')
        assert "_base_ = './my_faster_rcnn.py'" in override
        config = tmp_path / 'toy.py'
        config.write_text(override)
    result = train_tool(config, toy_sets[task], SHORT_RUN[task], cached_release_weights)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    work = tmp_path / 'work'
    assert sorted(p.name for p in work.glob('*.pth')) == (
        ['epoch_1.pth'] if task == 'mmdet' else ['iter_2.pth'])
    assert re.search(r'\((train)\) .*? loss: \d+\.\d+', output), output[-3000:]
    # the backbone started from the cached release file (the intro snippet names none)
    if name != 'intro':
        assert 'poolformer_s12.pth.tar' in output


@pytest.mark.slow
def test_coco_config_on_a_set_of_other_classes_says_to_name_them(tmp_path, toy_sets,
                                                                 cached_release_weights):
    config = tmp_path / 'my_faster_rcnn.py'
    config.write_text(readme_snippet('mmdet'))
    result = train_tool(config, toy_sets['mmdet'], SHORT_RUN['mmdet'], cached_release_weights)
    assert result.returncode != 0
    assert ("instances_train2017.json' has the categories ('circle', 'square', 'triangle'), none "
            "of which is among the classes of the config's data set ('person', 'bicycle', 'car', "
            "'motorcycle', 'airplane', ... 80 in all): mmdet would use none of its annotations. "
            'Name them in each data set of the config: '
            "metainfo=dict(classes=('circle', 'square', 'triangle'))") in result.stderr, \
        result.stderr[-3000:]


def test_model_only_base_is_refused_for_training_with_what_to_inherit(tmp_path):
    from poolformer_mm.cli.train_test import run_training
    path = tmp_path / 'config.py'
    path.write_text(on_base(readme_snippet('mmseg'), 'mmseg::_base_/models/fpn_r50.py'))
    with pytest.raises(InvalidInputError, match=r"has no train_dataloader, train_cfg, "
                       r"optim_wrapper: a model-only base .* inherit a whole config"):
        run_training([str(path), '--work-dir', str(tmp_path / 'work')])


def test_model_only_base_gets_the_scope_of_the_package_it_comes_from(tmp_path):
    snippet = on_base(readme_snippet('mmseg'), 'mmseg::_base_/models/fpn_r50.py')
    path = tmp_path / 'config.py'
    path.write_text(snippet)
    assert Config.fromfile(str(path)).get('default_scope') is None  # as mmengine reads it
    assert read_config(str(path)).default_scope == 'mmseg'


# ------------------------------------------------------------------------- what users are told
def test_intro_snippet_fits_an_mmdet_fpn_base(tmp_path, build_model):
    intro = readme_snippet('intro')
    cfg = load_config(tmp_path, "_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'\n"
                      + intro)
    model = build_model(cfg)
    check_neck_in_channels(model)
    assert model.backbone.out_channels == list(model.neck.in_channels) == [64, 128, 320, 512]


def test_neck_that_skips_a_returned_stage_says_which_stages_to_return(tmp_path, build_model):
    cfg = snippet_config(tmp_path, 'mmdet', STOCK_BASES['mmdet'][3])  # RetinaNet: start_level=1
    with pytest.warns(UserWarning) as caught:
        check_neck_in_channels(build_model(cfg))
    assert [str(w.message) for w in caught] == [
        "neck.start_level=1 skips the first 1 output(s) of PoolFormer arch 's12' with "
        'out_indices (0, 1, 2, 3): their output norms get no gradient, and multi-GPU training '
        'stops on unused parameters. Return only what the neck reads: backbone out_indices='
        '(1, 2, 3), model.neck.in_channels=[128, 320, 512], model.neck.start_level=0']


def test_mmdet_base_without_the_neck_line_is_refused_before_the_forward_pass(tmp_path, build_model):
    snippet = on_base(readme_snippet('mmdet'), STOCK_BASES['mmdet'][0])
    snippet, count = re.subn(r',\n\s*neck=dict\(in_channels=\[[\d, ]+\]\)\)', ')', snippet)
    assert count == 1
    cfg = load_config(tmp_path, snippet)
    cfg.model.backbone.init_cfg = None
    with pytest.raises(InChannelsError) as err:
        check_neck_in_channels(build_model(cfg))
    assert str(err.value) == (
        "neck.in_channels is [256, 512, 1024, 2048] but PoolFormer arch 's12' with out_indices "
        '(0, 1, 2, 3) returns [64, 128, 320, 512]; set model.neck.in_channels=[64, 128, 320, 512]')


def test_upernet_base_without_the_head_lines_names_both_heads(tmp_path, build_model):
    snippet = on_base(readme_snippet('mmseg-no-neck'), STOCK_BASES['mmseg-no-neck'][0])
    snippet, count = re.subn(r',\n\s*decode_head=dict\(.*\)\)', ')', snippet, flags=re.S)
    assert count == 1
    cfg = load_config(tmp_path, snippet)
    with pytest.raises(InChannelsError) as err:
        check_neck_in_channels(build_model(cfg))
    returns = "PoolFormer arch 's12' with out_indices (0, 1, 2, 3) returns [64, 128, 320, 512]"
    assert str(err.value).splitlines() == [
        f'decode_head.in_channels is [256, 512, 1024, 2048] (in_index [0, 1, 2, 3]) but '
        f'{returns}; set model.decode_head.in_channels=[64, 128, 320, 512]',
        f'auxiliary_head.in_channels is 1024 (in_index 2) but {returns}; '
        'set model.auxiliary_head.in_channels=320',
    ]


def test_head_reading_a_stage_the_backbone_does_not_return_is_refused(tmp_path, build_model):
    cfg = snippet_config(tmp_path, 'mmseg-no-neck', STOCK_BASES['mmseg-no-neck'][0])
    cfg.model.backbone.out_indices = (1, 2, 3)
    with pytest.raises(InChannelsError, match=r'^decode_head\.in_index is \[0, 1, 2, 3\] but '
                       r"PoolFormer arch 's12' with out_indices \(1, 2, 3\) returns "
                       r'\[128, 320, 512\] \(3 outputs\); set model\.decode_head\.in_index'):
        check_neck_in_channels(build_model(cfg))


def test_fpn_that_reads_fewer_stages_than_returned_is_refused(tmp_path, build_model):
    cfg = snippet_config(tmp_path, 'mmseg', STOCK_BASES['mmseg'][0])
    cfg.model.backbone = dict(type='MetaFormer', arch='convformer_m36', out_indices=(1, 2, 3))
    with pytest.raises(InChannelsError, match=r'neck\.in_channels is \[64, 128, 320, 512\] but '
                       r"MetaFormer arch 'convformer_m36' with out_indices \(1, 2, 3\) returns "
                       r'\[192, 384, 576\]; set model\.neck\.in_channels=\[192, 384, 576\]$'):
        check_neck_in_channels(build_model(cfg))


def test_mmseg_base_without_pretrained_none_says_to_set_it(tmp_path, build_model):
    snippet = on_base(readme_snippet('mmseg'), STOCK_BASES['mmseg'][0])
    without = snippet.replace('    pretrained=None,\n', '')
    assert without != snippet
    # with the snippet's init_cfg: two sources of weights
    with pytest.raises(InvalidInputError) as err:
        build_model(load_config(tmp_path, without))
    assert "pretrained 'open-mmlab://resnet50_v1c' comes with init_cfg=" in str(err.value)
    assert 'add pretrained=None to model = dict(...)' in str(err.value)
    # without it: the base's ResNet weights are not PoolFormer weights
    cfg = load_config(tmp_path, without)
    cfg.model.backbone.init_cfg = None
    with pytest.raises(InvalidInputError) as err:
        build_model(cfg)
    message = str(err.value)
    assert "pretrained 'open-mmlab://resnet50_v1c' is not a PoolFormer checkpoint" in message
    assert 'add pretrained=None to model = dict(...)' in message
    assert 'name the weights in init_cfg alone (URLs: docs/model_zoo.md)' in message


@pytest.mark.parametrize('checkpoint', ['open-mmlab://resnet50_v1c', 'torchvision://resnet50',
                                        'mmcls://resnet50'])
@pytest.mark.parametrize('setting', ['pretrained', 'init_cfg'])
def test_model_zoo_weights_are_refused_when_built(checkpoint, setting):
    value = checkpoint if setting == 'pretrained' else dict(type='Pretrained',
                                                             checkpoint=checkpoint)
    with pytest.raises(InvalidInputError,
                       match=f"{setting} '{checkpoint}' is not a MetaFormer checkpoint"):
        MetaFormer('caformer_s18', **{setting: value})


def _tiny_checkpoint(cls, arch, tmp_path):
    torch.manual_seed(1)
    source = cls(arch)
    path = tmp_path / 'tiny.pth'
    torch.save(dict(state_dict=source.state_dict()), path)
    return str(path), source.state_dict()


@pytest.mark.parametrize('cls, arch', [(PoolFormer, TINY_POOLFORMER),
                                       (MetaFormer, TINY_METAFORMER)])
def test_pretrained_is_init_cfg_with_one_deprecation_warning(cls, arch, tmp_path):
    path, expected = _tiny_checkpoint(cls, arch, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        old = cls(arch, pretrained=path)
    assert [w.category for w in caught] == [FutureWarning]
    assert f"pretrained='{path}' is deprecated" in str(caught[0].message)
    new = cls(arch, init_cfg=dict(type='Pretrained', checkpoint=path))
    assert old.init_cfg == new.init_cfg
    for model in (old, new):
        model.init_weights()
        for key, value in model.state_dict().items():
            if key in expected:
                torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_segmentor_pretrained_reaches_the_backbone_as_its_weights(tmp_path, build_model):
    path, expected = _tiny_checkpoint(PoolFormer, TINY_POOLFORMER, tmp_path)
    cfg = snippet_config(tmp_path, 'mmseg', STOCK_BASES['mmseg'][0])
    cfg.model.pretrained = path
    cfg.model.backbone.arch = TINY_POOLFORMER
    with pytest.warns(FutureWarning, match='is deprecated'):
        model = build_model(cfg)
    model.backbone.init_weights()
    torch.testing.assert_close(model.backbone.stem.conv.weight, expected['stem.conv.weight'],
                               rtol=0, atol=0)


def test_pretrained_file_of_another_network_says_to_set_model_pretrained_none(tmp_path):
    path = tmp_path / 'resnet.pth'
    torch.save({'conv1.weight': torch.zeros(64, 3, 7, 7), 'bn1.weight': torch.ones(64)}, path)
    with pytest.warns(FutureWarning):
        model = PoolFormer('s12', pretrained=str(path))
    with pytest.raises(InvalidInputError) as err:
        model.init_weights()
    message = str(err.value)
    assert message.startswith('checkpoint is not a PoolFormer checkpoint')
    assert 'given as pretrained: add pretrained=None to model = dict(...)' in message


def test_missing_pretrained_file_says_where_it_was_named(tmp_path):
    with pytest.warns(FutureWarning):
        model = PoolFormer('s12', pretrained=str(tmp_path / 'poolformer_s12.pth.tar'))
    with pytest.raises(FileNotFoundError, match=r'not found\..*given as pretrained: add '
                       r'pretrained=None to model'):
        model.init_weights()


def test_pretrained_and_init_cfg_together_are_refused():
    with pytest.raises(InvalidInputError, match=r"pretrained 'a\.pth' comes with init_cfg=.*"
                       'name the weights in init_cfg alone'):
        PoolFormer('s12', pretrained='a.pth', init_cfg=dict(type='Pretrained', checkpoint='b'))


@pytest.mark.parametrize('typo, meant', [('out_indice', 'out_indices'),
                                         ('frozen_stage', 'frozen_stages'),
                                         ('fastpath', 'fast_path'), ('init_config', 'init_cfg'),
                                         ('pretrain', 'pretrained')])
def test_misspelt_argument_gets_the_argument_it_means(typo, meant):
    with pytest.raises(TypeError, match=f"'{typo}' \\(did you mean '{meant}'\\?\\)"):
        PoolFormer('s12', **{typo: None})


# names of other meanings that difflib's default cutoff would pair: timm's dropout rate, ResNet's
# stage count, an input size
@pytest.mark.parametrize('name', ['drop_rate', 'num_stages', 'img_size'])
@pytest.mark.parametrize('cls', [PoolFormer, MetaFormer])
def test_argument_of_another_meaning_gets_no_suggestion(cls, name):
    with pytest.raises(TypeError) as err:
        cls(**{name: 1})
    assert str(err.value).startswith(f"{cls.__name__}: unknown argument(s) '{name}'; valid")


def test_resnet_settings_merged_into_the_backbone_say_to_delete_the_base_one():
    with pytest.raises(TypeError, match=r"unknown argument\(s\) 'depth', 'style'; .*from a base "
                       r"config's backbone\? add _delete_=True to the backbone dict"):
        PoolFormer('s12', depth=50, style='pytorch')


# ------------------------------------------------------------------------- the channel table
def test_readme_channel_table_lists_every_arch_with_its_channels():
    section = README.split('## Use in your own config', 1)[1]
    rows = re.findall(r'^\| `(PoolFormer|MetaFormer)` \| (.+?) \| `(\[[\d, ]+\])` \|$', section,
                      re.M)
    table = {}
    for cls, archs, channels in rows:
        for arch in re.findall(r'`([^`]+)`', archs):
            for name in _expand_braces(arch):
                table[cls, name] = eval(channels)
    expected = {(cls.__name__, name): settings['embed_dims']
                for cls in (PoolFormer, MetaFormer)
                for name, settings in cls.arch_settings.items()}
    assert table == expected


def _expand_braces(pattern: str) -> list:
    match = re.search(r'\{([^}]*)\}', pattern)
    if not match:
        return [pattern]
    return [name for option in match.group(1).split(',')
            for name in _expand_braces(pattern[:match.start()] + option + pattern[match.end():])]
