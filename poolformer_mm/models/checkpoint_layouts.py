"""Every checkpoint layout the backbones load, with no conversion step, and how they load.

Layouts are detected from the keys and renamed to this package's names by (pattern, replacement)
rules. :class:`~poolformer_mm.models.PoolFormer` reads:

* ``official`` - sail-sg/poolformer ImageNet files: ``patch_embed.proj``, ``network.{2k}.{j}``
  (blocks of stage k), ``network.{2k-1}.proj`` (downsampling), ``layer_scale_{1,2}``, ``norm``;
* ``official mmdet/mmseg`` - sail-sg/poolformer's mmdet 2.19 / mmseg 0.19 checkpoints (and
  mmdet / mmseg models with mmpretrain's PoolFormer): the names of ``poolformer_*_feat`` under
  ``backbone.``, with an output norm ``norm{2k}`` per returned stage (the RetinaNet models,
  trained with ``FORK_LAST3=1``, have no ``norm0``), next to neck and head keys;
* ``mmpretrain`` - the official names under ``backbone.``, final norm ``norm6``, ``head.fc``;
* ``timm`` - our names, ``layer_scale{1,2}.scale`` of shape [C, 1, 1], ``head.norm`` / ``head.fc``.

:class:`~poolformer_mm.models.MetaFormer` reads ``sail-sg/metaformer`` (``downsample_layers.{k}``,
``stages.{k}.{j}``, channels-last Linear layers, ``norm``, ``head``) and ``timm``.

Both read ``poolformer_mm``, this package's own (timm's) names, bare or inside a whole model's
mmengine checkpoint (``backbone.`` prefix). PoolFormer checkpoints from before the names were
unified (``stem.proj``, ``downsample.proj``, ``layer_scale_1``), and whole models in the
``official mmdet/mmseg`` layout, also load through any ``load_state_dict`` (``--resume``, test
checkpoints, upstream tools) by hooks of the backbones (:func:`upgrade_legacy_keys_on_load`,
:func:`convert_official_dense_keys_on_load`).

An ImageNet classifier's final norm is the only output norm it has. An ``official`` file starts
where the paper's code started fine-tuning (loaded with ``strict=False`` into
``poolformer_*_feat``, whose last output norm kept its initial weights); the other layouts
initialise the last output norm from the classifier's final norm, as mmpretrain's downstream
models do. ``final_norm`` in the ``init_cfg`` chooses otherwise (:data:`FINAL_NORM_CHOICES`).
Classifier weights are dropped. timm ``train.py`` checkpoints with averaged weights load those
(``state_dict_ema``), as timm's ``load_checkpoint`` does; ``use_ema=False`` loads ``state_dict``.
"""
import os.path as osp
import re
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader

from ..checkpoint_io import is_remote_checkpoint, load_from_local_weights_only
from ..utils.errors import CheckpointUnavailableError, InvalidInputError

# ------------------------------------------------------------------------------- rules
# (pattern, replacement) per layout, applied as :func:`apply_layout_rules` says.
_POOLFORMER_OFFICIAL_RULES = [
    # the attention hybrids' position embedding sits at the start of their first attention stage
    (r'^network\.(\d+)\.pos_embed$', lambda m: f'stages.{(int(m[1]) + 1) // 2}.pos_embed.weight'),
    (r'^patch_embed\.proj\.', 'stem.conv.'),
    (r'^network\.(\d+)\.proj\.', lambda m: f'stages.{(int(m[1]) + 1) // 2}.downsample.conv.'),
    (r'^network\.(\d+)\.(\d+)\.layer_scale_(\d)$',
     lambda m: f'stages.{int(m[1]) // 2}.blocks.{m[2]}.layer_scale{m[3]}.scale'),
    (r'^network\.(\d+)\.(\d+)\.', lambda m: f'stages.{int(m[1]) // 2}.blocks.{m[2]}.'),
    (r'^norm\.', 'output_norms.3.'),
    (r'^norm(\d)\.', lambda m: f'output_norms.{int(m[1]) // 2}.'),  # mmpretrain: norm{2k}
    (r'^head\.', None),
]
# sail-sg/metaformer works channels-last, so its MLP and SepConv pointwise layers are Linear
# ([out, in]) where ours are 1x1 convs; :func:`load_converted_weights` reshapes those.
_SAILSG_METAFORMER_RULES = [
    (r'^downsample_layers\.0\.conv\.', 'stem.conv.'),
    (r'^downsample_layers\.0\.post_norm\.', 'stem.norm.'),
    (r'^downsample_layers\.(\d+)\.pre_norm\.', r'stages.\1.downsample.norm.'),
    (r'^downsample_layers\.(\d+)\.conv\.', r'stages.\1.downsample.conv.'),
    (r'^stages\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'),
    (r'^norm\.', 'output_norms.3.'),
    (r'^head\.', None),
]
# timm's names are ours except for the classifier (PoolFormer v1 and v2 alike).
_TIMM_RULES = [
    (r'^head\.norm\.', 'output_norms.3.'),
    (r'^head\.', None),
]
# This package's PoolFormer names before they were unified with timm's (and MetaFormer's).
LEGACY_RULES = [
    (r'^stem\.proj\.', 'stem.conv.'),
    (r'^(stages\.\d+\.downsample)\.proj\.', r'\1.conv.'),
    (r'^(stages\.\d+\.blocks\.\d+\.layer_scale)_(\d)\.', r'\1\2.'),
]
# sail-sg/poolformer's mmdet 2.19 / mmseg 0.19 checkpoints (its poolformer_*_feat class)
OFFICIAL_DENSE = 'official mmdet/mmseg'
_POOLFORMER_LAYOUT_RULES = {'official': _POOLFORMER_OFFICIAL_RULES,
                            OFFICIAL_DENSE: _POOLFORMER_OFFICIAL_RULES,
                            'mmpretrain': _POOLFORMER_OFFICIAL_RULES, 'timm': _TIMM_RULES,
                            'poolformer_mm': [], 'poolformer_mm (old names)': LEGACY_RULES}
_METAFORMER_LAYOUT_RULES = {'sail-sg/metaformer': _SAILSG_METAFORMER_RULES,
                            'timm': _TIMM_RULES, 'poolformer_mm': []}
# The final norm of an ImageNet classifier, per layout: the one output norm such a file has.
_CLASSIFIER_FINAL_NORM = {'official': r'^norm\.', 'mmpretrain': r'^norm6\.',
                          'timm': r'^head\.norm\.', 'sail-sg/metaformer': r'^norm\.'}
# What becomes of it: 'initial' leaves the last output norm at its initial weights (GroupNorm:
# weight 1, bias 0), 'classifier' loads the classifier's final norm there.
FINAL_NORM_CHOICES = ('initial', 'classifier')
# Where each layout's own downstream code started (the paper's code: see the module docstring).
_DEFAULT_FINAL_NORM = {'official': 'initial'}
# A key of our own layout that belongs to the backbone's structure (not an output norm).
STRUCTURAL_KEY = re.compile(r'^(stem|stages)\.')


def _rename(key: str, rules) -> Optional[str]:
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return None if replacement is None else re.sub(pattern, replacement, key)
    return key


def apply_layout_rules(state: Mapping[str, torch.Tensor], rules) -> Dict[str, torch.Tensor]:
    """Rename keys by (pattern, replacement) rules: the first matching rule wins, a None
    replacement drops the key, a key that matches no rule is kept as it is."""
    renamed = ((_rename(key, rules), value) for key, value in state.items())
    return {key: value for key, value in renamed if key is not None}


# ------------------------------------------------------------------------------- old names
def _upgrade_key(key: str, prefix: str = '') -> str:
    return prefix + _rename(key[len(prefix):], LEGACY_RULES) if key.startswith(prefix) else key


# where a backbone's keys start: bare, in a detector / segmentor, in a wrapped one
_BACKBONE_PREFIX = re.compile(r'^(?:module\.)?(?:backbone\.)?')


def upgrade_legacy_keys(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename the old PoolFormer keys of a bare backbone's state dict, or of a whole model's
    (``backbone.``, ``module.backbone.``), to today's names; other keys are kept. For code that
    compares a checkpoint's keys with a model's before loading it."""
    return {_upgrade_key(key, _BACKBONE_PREFIX.match(key)[0]): value
            for key, value in state.items()}


def upgrade_legacy_keys_on_load(state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook of the backbones: renames their old keys in place."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new_key = _upgrade_key(key, prefix)
        if new_key != key:
            state_dict[new_key] = state_dict.pop(key)


# ------------------------------------------------------------------------------- official dense
# The names of the official dense-prediction backbone (poolformer_*_feat) that this package's
# PoolFormer does not use: its stem, stages and output norms norm0 / norm2 / norm4 / norm6.
_OFFICIAL_DENSE_KEY = re.compile(r'^(?:patch_embed|network|norm[0246])\.')


def convert_official_dense_keys(state_dict: dict, prefix: str,
                                output_norms) -> Tuple[int, List[str]]:
    """Rename, in place, the keys under ``prefix`` named as the official dense-prediction
    backbone's to :class:`PoolFormer` names. An output norm of a stage not in ``output_norms``
    (stage numbers as str) is dropped (the paper's RetinaNet built ``norm0`` without using it).
    Returns how many tensors were converted and kept, and the official names of those dropped."""
    keys = [k for k in state_dict
            if k.startswith(prefix) and _OFFICIAL_DENSE_KEY.match(k[len(prefix):])]
    converted = apply_layout_rules({k[len(prefix):]: state_dict.pop(k) for k in keys},
                                   _POOLFORMER_OFFICIAL_RULES)
    kept, dropped = 0, set()
    for key, value in converted.items():
        stage = re.match(r'output_norms\.(\d+)\.', key)
        if stage and stage[1] not in output_norms:
            dropped.add(f'norm{2 * int(stage[1])}')
        else:
            state_dict[prefix + key] = value
            kept += 1
    return kept, sorted(dropped)


def convert_official_dense_keys_on_load(module: nn.Module, state_dict: dict, prefix: str,
                                        *args) -> None:
    """``load_state_dict`` pre-hook of :class:`PoolFormer`: converts a backbone in the
    ``official mmdet/mmseg`` layout in place, and says so in one log line."""
    count, dropped = convert_official_dense_keys(state_dict, prefix, set(module.output_norms))
    if not count:
        return
    name = type(module).__name__
    where = f"under '{prefix}' " if prefix else ''
    note = (f'; left out {", ".join(dropped)}: this {name} returns stages {module.out_indices} '
            'and has no output norm for the others' if dropped else '')
    print_log(f'{name}: converted {count} checkpoint tensors {where}from the {OFFICIAL_DENSE} '
              'layout (sail-sg/poolformer detection and segmentation checkpoints: '
              f"patch_embed, network.*, norm0/2/4/6) to this package's names{note}",
              logger='current')


# ------------------------------------------------------------------------------- detection
def _pick_weights(checkpoint: Mapping, use_ema: bool) -> Mapping:
    """The weights of a checkpoint, chosen (and logged) as timm's ``load_checkpoint`` does: EMA
    (``state_dict_ema``, ``model_ema``) if asked for and present, then ``state_dict``,
    ``model`` (DeiT-style scripts), else the top level."""
    ema = next((k for k in ('state_dict_ema', 'model_ema')
                if isinstance(checkpoint.get(k), Mapping)), None)
    plain = next((k for k in ('state_dict', 'model') if isinstance(checkpoint.get(k), Mapping)),
                 None)
    if ema is None:
        return checkpoint[plain] if plain else checkpoint
    if plain is None:
        if not use_ema:
            raise InvalidInputError(
                f"use_ema=False asks for the weights without averaging, but the checkpoint "
                f"holds only EMA weights ('{ema}', from timm train.py --model-ema); leave "
                'use_ema unset to load those')
        print_log(f"checkpoint holds only EMA weights ({ema}, from timm train.py --model-ema); "
                  'loading those', logger='current')
        return checkpoint[ema]
    chosen = ema if use_ema else plain
    why = (f"as timm's load_checkpoint does by default; use_ema=False in the init_cfg loads "
           f"'{plain}'" if use_ema else 'use_ema=False')
    print_log(f"checkpoint holds EMA weights ({ema}, from timm train.py --model-ema) and the "
              f"weights without averaging ({plain}); loading '{chosen}' ({why})",
              logger='current')
    return checkpoint[chosen]


def _strip_module(state: Mapping) -> Dict[str, torch.Tensor]:
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}


def _split_backbone(state: Mapping) -> Tuple[Dict[str, torch.Tensor], bool]:
    backbone = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    return (backbone, True) if backbone else (dict(state), False)


def is_whole_model(state: Mapping) -> bool:
    """Whether a flat state dict is a whole detector's or segmentor's: a ``backbone.`` part and
    others (an mmpretrain classifier has only ``backbone.`` and ``head.``)."""
    parts = {key.split('.', 1)[0] for key in state}
    return 'backbone' in parts and bool(parts - {'backbone', 'head'})


def holds_whole_model(checkpoint: Mapping) -> bool:
    """Whether a checkpoint (mmengine's, mmcv's, or a bare state dict) holds a whole detector or
    segmentor (:func:`is_whole_model`)."""
    state = checkpoint.get('state_dict', checkpoint)
    return isinstance(state, Mapping) and is_whole_model(_strip_module(state))


def _has_output_norms(state: Mapping) -> bool:
    return any(k.startswith('output_norms.') for k in state)


def _detect_poolformer_layout(state: Mapping, had_backbone_prefix: bool,
                              whole: Optional[Mapping] = None) -> str:
    if 'stem.proj.weight' in state:
        return 'poolformer_mm (old names)'
    if 'stem.norm.weight' in state or 'downsample_layers.0.conv.weight' in state:
        raise InvalidInputError(
            "checkpoint is a MetaFormer baseline (v2) checkpoint, not a PoolFormer "
            "one; load it with dict(type='MetaFormer', ...) instead")
    if 'stem.conv.weight' in state:
        return 'poolformer_mm' if _has_output_norms(state) else 'timm'
    if 'patch_embed.proj.weight' in state and any(k.startswith('network.') for k in state):
        if not had_backbone_prefix:
            return 'official'
        # an mmpretrain classifier has a head; a detector or segmentor has a neck and heads
        return 'mmpretrain' if any(k.startswith('head.') for k in whole or {}) else OFFICIAL_DENSE
    raise InvalidInputError(
        'checkpoint is not a PoolFormer checkpoint in any known layout (official, '
        f"{OFFICIAL_DENSE}, mmpretrain, timm, poolformer_mm); its first keys are: "
        f"{', '.join(list(state)[:5])}")


def _detect_metaformer_layout(state: Mapping, *unused) -> str:
    if 'downsample_layers.0.conv.weight' in state:
        return 'sail-sg/metaformer'
    if 'stem.norm.weight' in state:  # PoolFormer (v1) has no norm in its stem
        return 'poolformer_mm' if _has_output_norms(state) else 'timm'
    if any(k in state for k in ('stem.conv.weight', 'stem.proj.weight',
                                'patch_embed.proj.weight')):
        raise InvalidInputError(
            'checkpoint is a PoolFormer (v1) checkpoint, not a MetaFormer v2 one; '
            "load it with dict(type='PoolFormer', ...) instead")
    raise InvalidInputError(
        'checkpoint is not a MetaFormer checkpoint in any known layout (sail-sg/metaformer, '
        f"timm, poolformer_mm); its first keys are: {', '.join(list(state)[:5])}")


def classifier_layout(state: Mapping) -> Optional[str]:
    """The layout of a flat state dict that holds a backbone alone (an ImageNet classifier's, or
    a backbone saved on its own), or None for anything else (a whole detector or segmentor)."""
    if is_whole_model(state):
        return None
    backbone, had_prefix = _split_backbone(state)
    for detect in (_detect_poolformer_layout, _detect_metaformer_layout):
        try:
            return detect(backbone, had_prefix, state)
        except InvalidInputError:
            continue
    return None


def _final_norm_rules(layout: str, state: Mapping, final_norm: Optional[str]) -> list:
    """The rules that drop the classifier's final norm where ``final_norm`` (or the layout's
    default) is 'initial'; logs what was left out."""
    if final_norm is not None and final_norm not in FINAL_NORM_CHOICES:
        raise InvalidInputError(f"final_norm must be one of {FINAL_NORM_CHOICES} or unset (the "
                                f"layout's own start), got {final_norm!r}")
    if layout not in _CLASSIFIER_FINAL_NORM:
        if final_norm is not None:
            raise InvalidInputError(
                f"final_norm='{final_norm}' is for ImageNet classifier checkpoints; this one is "
                f'in the {layout} layout, whose output norms were trained with the rest of its '
                'model: leave final_norm unset')
        return []
    if (final_norm or _DEFAULT_FINAL_NORM.get(layout, 'classifier')) == 'classifier':
        return []
    pattern = _CLASSIFIER_FINAL_NORM[layout]
    dropped = sorted(k for k in state if re.match(pattern, k))
    if dropped:
        where = (", where the paper's code started fine-tuning from this file"
                 if layout == 'official' else '')
        print_log(f"the classifier's final norm ({', '.join(dropped)}) is not loaded: the last "
                  f'output norm keeps its initial weights{where} (final_norm=\'classifier\' in '
                  'the init_cfg loads it)', logger='current')
    return [(pattern, None)]


def _convert(checkpoint: Mapping, detect: Callable, table: dict, use_ema: bool,
             final_norm: Optional[str]) -> Tuple[Dict[str, torch.Tensor], str]:
    whole = _strip_module(_pick_weights(checkpoint, use_ema))
    state, had_prefix = _split_backbone(whole)
    layout = detect(state, had_prefix, whole)
    rules = _final_norm_rules(layout, state, final_norm) + table[layout]
    return apply_layout_rules(state, rules), layout


def convert_to_poolformer_layout(checkpoint: Mapping, use_ema: bool = True,
                                 final_norm: Optional[str] = None
                                 ) -> Tuple[Dict[str, torch.Tensor], str]:
    """Rename the keys of ``checkpoint`` (a state dict, or a checkpoint holding one) to this
    package's :class:`PoolFormer` names; return the state dict and the detected layout's name.

    ``use_ema`` reads the EMA weights of a timm ``train.py`` checkpoint that has them (timm's
    default), else ``state_dict``. For an ImageNet classifier, ``final_norm='initial'`` leaves
    the last output norm out, 'classifier' converts the classifier's final norm into it; None
    is the layout's own start ('initial' for the official layout, 'classifier' otherwise).
    """
    return _convert(checkpoint, _detect_poolformer_layout, _POOLFORMER_LAYOUT_RULES, use_ema,
                    final_norm)


def convert_to_metaformer_layout(checkpoint: Mapping, use_ema: bool = True,
                                 final_norm: Optional[str] = None
                                 ) -> Tuple[Dict[str, torch.Tensor], str]:
    """:func:`convert_to_poolformer_layout` for :class:`MetaFormer` names (every layout's
    default ``final_norm`` is 'classifier')."""
    return _convert(checkpoint, _detect_metaformer_layout, _METAFORMER_LAYOUT_RULES, use_ema,
                    final_norm)


def convert_dense_checkpoint(checkpoint: Mapping) -> Tuple[dict, str]:
    """A whole detector's or segmentor's checkpoint, ``dict(meta=..., state_dict=...)``, with
    its PoolFormer backbone in this package's names (neck, heads and ``meta`` kept; an mmdet 2.x
    / mmseg 0.x ``meta``'s ``CLASSES`` and ``PALETTE`` also as ``dataset_meta``, where mmdet 3.x
    and mmseg 1.x inferencers look first), and the backbone's detected layout."""
    whole = _strip_module(_pick_weights(checkpoint, True))
    if not is_whole_model(whole):
        raise InvalidInputError('checkpoint holds no whole detector or segmentor (keys outside '
                                "'backbone.' and a classifier's 'head.')")
    backbone, _ = _split_backbone(whole)
    layout = _detect_poolformer_layout(backbone, True, whole)
    state = {f'backbone.{key}': value for key, value in
             apply_layout_rules(backbone, _POOLFORMER_LAYOUT_RULES[layout]).items()}
    state.update((key, value) for key, value in whole.items() if not key.startswith('backbone.'))
    meta = dict(checkpoint.get('meta') or {})
    if 'dataset_meta' not in meta and meta.get('CLASSES') is not None:
        meta['dataset_meta'] = dict(classes=tuple(meta['CLASSES']))
        if meta.get('PALETTE') is not None:
            meta['dataset_meta']['palette'] = [list(color) for color in meta['PALETTE']]
    return dict(meta=meta, state_dict=state), layout


# ------------------------------------------------------------------------------- loading
POOLFORMER_DOWNLOAD_HINT = (
    'Name the official weights by URL instead (https://github.com/sail-sg/poolformer/releases/'
    'download/v1.0/poolformer_<arch>.pth.tar, downloaded once into the torch hub cache), or '
    'download that file into checkpoints/')


def read_checkpoint(path: str, download_hint: str = POOLFORMER_DOWNLOAD_HINT) -> dict:
    """Read a pretrained file, URL or other mmengine scheme without running code (through the
    loaders of :mod:`poolformer_mm.checkpoint_io`); say where to get a missing file."""
    if is_remote_checkpoint(path):
        return CheckpointLoader.load_checkpoint(path, map_location='cpu')
    path = osp.expanduser(path)
    if not osp.isfile(path):
        raise CheckpointUnavailableError(
            f"pretrained checkpoint '{path}' not found. {download_hint}, or train from scratch "
            'with --cfg-options model.backbone.init_cfg=None')
    return load_from_local_weights_only(path, map_location='cpu')


def load_converted_weights(backbone: nn.Module, state: Dict[str, torch.Tensor],
                           source: str) -> None:
    """Load a state dict already in the backbone's own names (tensors that differ only by
    singleton dims, e.g. timm's [C,1,1] scales or Linear vs 1x1 conv, are reshaped). Raises a
    clear error for a checkpoint of another arch; logs the keys left at their initial values and
    the unused checkpoint tensors."""
    name = type(backbone).__name__
    target = backbone.state_dict()
    mismatched = []
    for key, value in state.items():
        if key not in target or value.shape == target[key].shape:
            continue
        if value.squeeze().shape == target[key].squeeze().shape:
            state[key] = value.reshape(target[key].shape)
        else:
            mismatched.append(f'{key}: checkpoint {tuple(value.shape)} vs model '
                              f'{tuple(target[key].shape)}')
    if mismatched:
        raise InvalidInputError(
            f'{source} does not fit this {name}: {len(mismatched)} shape mismatches, e.g. '
            f'{"; ".join(mismatched[:3])}. Is it a checkpoint of another arch?')
    unexpected = sorted(k for k in state if k not in target)
    missing = sorted(k for k in target if k not in state)
    extra = [k for k in unexpected if STRUCTURAL_KEY.match(k)]
    lacking = [k for k in missing if STRUCTURAL_KEY.match(k)]
    if extra or lacking:
        raise InvalidInputError(
            f'{source} has a different block structure from this {name} ({len(extra)} extra '
            f'and {len(lacking)} missing backbone tensors, e.g. {(extra + lacking)[0]}). Is it '
            'a checkpoint of another arch?')
    # what remains is benign: output norms the file lacks, or of stages this model does not return
    for key in unexpected:
        state.pop(key)
    backbone.load_state_dict(state, strict=False)
    print_log(f'{name}: loaded {len(state)} tensors from {source}', logger='current')
    if missing:
        print_log(f'{name}: left at initial values (not in checkpoint): {", ".join(missing)}',
                  logger='current')
    if unexpected:
        print_log(f'{name}: unused checkpoint tensors: {", ".join(unexpected)}', logger='current')


def pretrained_options(backbone: nn.Module) -> dict:
    """The loading options of ``backbone``'s ``init_cfg=dict(type='Pretrained', ...)``:
    ``use_ema`` (default True) and ``final_norm`` (default None: the layout's own start; see
    :func:`convert_to_poolformer_layout`)."""
    init_cfg = getattr(backbone, 'init_cfg', None)
    init_cfg = init_cfg if isinstance(init_cfg, Mapping) else {}
    use_ema, final_norm = init_cfg.get('use_ema', True), init_cfg.get('final_norm')
    if not isinstance(use_ema, bool):
        raise InvalidInputError(f'init_cfg use_ema must be True (the EMA weights of a timm '
                                f"train.py checkpoint) or False ('state_dict'), got {use_ema!r}")
    if final_norm is not None and final_norm not in FINAL_NORM_CHOICES:
        raise InvalidInputError(f"init_cfg final_norm must be 'initial' (the last output norm "
                                "keeps its initial weights) or 'classifier' (the ImageNet "
                                "classifier's final norm initialises it), or unset, got "
                                f'{final_norm!r}')
    return dict(use_ema=use_ema, final_norm=final_norm)


def _load(backbone: nn.Module, path: str, convert: Callable, download_hint: str) -> None:
    options = pretrained_options(backbone)
    state, layout = convert(read_checkpoint(path, download_hint=download_hint), **options)
    load_converted_weights(backbone, state, f"checkpoint '{path}' ({layout} layout)")


def load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Load a PoolFormer checkpoint (file or URL) in any known layout into ``backbone``, with
    the options of its ``init_cfg`` (:func:`pretrained_options`)."""
    _load(backbone, path, convert_to_poolformer_layout, POOLFORMER_DOWNLOAD_HINT)


def load_metaformer_weights(backbone: nn.Module, path: str) -> None:
    """Load a MetaFormer checkpoint (file or URL) in any known layout into ``backbone``, with
    the options of its ``init_cfg`` (:func:`pretrained_options`)."""
    arch = getattr(backbone, 'arch_name', 'custom')
    if arch == 'custom':
        hint = ('Name ImageNet weights of the same depths and widths by URL (sail-sg/metaformer '
                'or timm on the Hugging Face Hub), or download them into checkpoints/')
    else:
        hint = (f'Name the ImageNet weights of {arch} by URL instead (sail-sg/metaformer: '
                f'https://huggingface.co/sail/dl/resolve/main/{arch.split("_")[0]}/{arch}.pth, '
                'or timm: https://huggingface.co/timm/<model>/resolve/main/model.safetensors), '
                'or download that file into checkpoints/')
    _load(backbone, path, convert_to_metaformer_layout, hint)
