"""Every checkpoint layout the backbones load, with no conversion step, and how they load.

Layouts are detected from the keys and renamed to this package's names by (pattern, replacement)
rules. :class:`~poolformer_mm.models.PoolFormer` reads:

* ``official`` - sail-sg/poolformer ImageNet files: ``patch_embed.proj``, ``network.{2k}.{j}``
  (blocks of stage k), ``network.{2k-1}.proj`` (downsampling), ``layer_scale_{1,2}``, ``norm``
  (final norm), ``head``;
* ``mmpretrain`` - the official names under ``backbone.``, final norm ``norm6``, ``head.fc``;
* ``timm`` - our names, ``layer_scale{1,2}.scale`` of shape [C, 1, 1], ``head.norm`` / ``head.fc``.

:class:`~poolformer_mm.models.MetaFormer` reads:

* ``sail-sg/metaformer`` - ``downsample_layers.{k}`` (stem and downsampling), ``stages.{k}.{j}``,
  channels-last MLPs and pointwise convolutions (Linear, [out, in]), ``norm``, ``head``;
* ``timm`` - our names and ``head.norm`` / ``head.fc``.

Both read ``poolformer_mm``, this package's own names, bare or inside an mmengine checkpoint of a
whole detector or segmentor (``state_dict`` with a ``backbone.`` prefix). They are timm's:
``stem.conv``, ``stages.{k}.downsample.{norm,conv}``, ``stages.{k}.blocks.{j}`` with ``norm1``,
``token_mixer``, ``layer_scale1`` / ``res_scale1``, ``norm2``, ``mlp``, ``layer_scale2`` /
``res_scale2``, and ``output_norms.{k}``. Checkpoints of PoolFormer written before these names
were unified (``stem.proj``, ``downsample.proj``, ``layer_scale_1``) load too: by the
``poolformer_mm (old names)`` rules here, and through any ``load_state_dict`` (mmengine's
``--resume`` and test checkpoints) by a hook the backbones register
(:func:`upgrade_legacy_keys_on_load`).

The classifier's final norm becomes the last output norm; classifier weights are dropped.
"""
import os.path as osp
import re
from typing import Callable, Dict, List, Mapping, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader

from ..checkpoint_io import is_remote_checkpoint, load_from_local_weights_only
from ..utils.errors import CheckpointUnavailableError, InvalidInputError

# ------------------------------------------------------------------------------- rules
# (pattern, replacement) per layout, applied to each key in order; the first match wins, a key
# that matches no rule is kept as it is (it then shows up as unexpected), a None replacement
# drops the key.
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
# ([out, in]) where ours are 1x1 convs ([out, in, 1, 1]); ``fit_shapes`` reshapes those.
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
_POOLFORMER_LAYOUT_RULES = {'official': _POOLFORMER_OFFICIAL_RULES,
                            'mmpretrain': _POOLFORMER_OFFICIAL_RULES, 'timm': _TIMM_RULES,
                            'poolformer_mm': [], 'poolformer_mm (old names)': LEGACY_RULES}
_METAFORMER_LAYOUT_RULES = {'sail-sg/metaformer': _SAILSG_METAFORMER_RULES,
                            'timm': _TIMM_RULES, 'poolformer_mm': []}
# A key of our own layout that belongs to the backbone's structure (not an output norm).
STRUCTURAL_KEY = re.compile(r'^(stem|stages)\.')


def apply_layout_rules(state: Mapping[str, torch.Tensor], rules) -> Dict[str, torch.Tensor]:
    """Rename keys by (pattern, replacement) rules: the first matching rule wins, a None
    replacement drops the key, a key that matches no rule is kept as it is."""
    converted = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            if re.match(pattern, key):
                key = None if replacement is None else re.sub(pattern, replacement, key)
                break
        if key is not None:
            converted[key] = value
    return converted


# ------------------------------------------------------------------------------- old names
def _upgrade_key(key: str, prefix: str = '') -> str:
    if not key.startswith(prefix):
        return key
    for pattern, replacement in LEGACY_RULES:
        if re.match(pattern, key[len(prefix):]):
            return prefix + re.sub(pattern, replacement, key[len(prefix):])
    return key


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


# ------------------------------------------------------------------------------- detection
def unwrap_state_dict(checkpoint: Mapping) -> Tuple[Dict[str, torch.Tensor], bool]:
    """Return the flat state dict and whether it came with a ``backbone.`` prefix.

    The weights are under ``state_dict`` (mmengine, timm's ``train.py``), ``model`` (DeiT-style
    training scripts) or at the top level. timm's ``train.py`` keeps the averaged weights of
    ``--model-ema`` apart, in ``state_dict_ema``: they are read only when the file has no
    ``state_dict`` (as timm's own ``load_checkpoint(use_ema=False)`` prefers ``state_dict``).
    """
    state = checkpoint
    for wrapper in ('state_dict', 'model'):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            if isinstance(checkpoint.get('state_dict_ema'), Mapping):
                print_log(f"checkpoint holds EMA weights too (state_dict_ema); loading '{wrapper}'"
                          ', the weights without averaging', logger='current')
            break
    else:
        if isinstance(state.get('state_dict_ema'), Mapping):
            print_log('checkpoint holds only EMA weights (state_dict_ema, from timm train.py '
                      '--model-ema); loading those', logger='current')
            state = state['state_dict_ema']
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    backbone = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    if backbone:
        return backbone, True
    return dict(state), False


def _has_output_norms(state: Mapping) -> bool:
    return any(k.startswith('output_norms.') for k in state)


def _detect_poolformer_layout(state: Mapping, had_backbone_prefix: bool) -> str:
    if 'stem.proj.weight' in state:
        return 'poolformer_mm (old names)'
    if 'stem.norm.weight' in state or 'downsample_layers.0.conv.weight' in state:
        raise InvalidInputError(
            "checkpoint is a MetaFormer baseline (v2) checkpoint, not a PoolFormer "
            "one; load it with dict(type='MetaFormer', ...) instead")
    if 'stem.conv.weight' in state:
        return 'poolformer_mm' if _has_output_norms(state) else 'timm'
    if 'patch_embed.proj.weight' in state and any(k.startswith('network.') for k in state):
        return 'mmpretrain' if had_backbone_prefix else 'official'
    sample = ', '.join(list(state)[:5])
    raise InvalidInputError(
        'checkpoint is not a PoolFormer checkpoint in any known layout (official, '
        f'mmpretrain, timm, poolformer_mm); its first keys are: {sample}')


def _detect_metaformer_layout(state: Mapping) -> str:
    if 'downsample_layers.0.conv.weight' in state:
        return 'sail-sg/metaformer'
    if 'stem.norm.weight' in state:  # PoolFormer (v1) has no norm in its stem
        return 'poolformer_mm' if _has_output_norms(state) else 'timm'
    if any(k in state for k in ('stem.conv.weight', 'stem.proj.weight',
                                'patch_embed.proj.weight')):
        raise InvalidInputError(
            'checkpoint is a PoolFormer (v1) checkpoint, not a MetaFormer v2 one; '
            "load it with dict(type='PoolFormer', ...) instead")
    sample = ', '.join(list(state)[:5])
    raise InvalidInputError(
        'checkpoint is not a MetaFormer checkpoint in any known layout '
        f'(sail-sg/metaformer, timm, poolformer_mm); its first keys are: {sample}')


def convert_to_poolformer_layout(checkpoint: Mapping) -> Tuple[Dict[str, torch.Tensor], str]:
    """Rename a checkpoint's keys to this package's :class:`PoolFormer` names.

    Returns:
        tuple: the converted state dict and the name of the detected layout.
    """
    state, had_prefix = unwrap_state_dict(checkpoint)
    layout = _detect_poolformer_layout(state, had_prefix)
    return apply_layout_rules(state, _POOLFORMER_LAYOUT_RULES[layout]), layout


def convert_to_metaformer_layout(checkpoint: Mapping) -> Tuple[Dict[str, torch.Tensor], str]:
    """Rename a checkpoint's keys to this package's :class:`MetaFormer` names.

    Returns:
        tuple: the converted state dict and the name of the detected layout.
    """
    state, _ = unwrap_state_dict(checkpoint)
    layout = _detect_metaformer_layout(state)
    return apply_layout_rules(state, _METAFORMER_LAYOUT_RULES[layout]), layout


# ------------------------------------------------------------------------------- loading
POOLFORMER_DOWNLOAD_HINT = (
    'Name the official weights by URL instead (https://github.com/sail-sg/poolformer/releases/'
    'download/v1.0/poolformer_<arch>.pth.tar, downloaded once into the torch hub cache), or '
    'download that file into checkpoints/')


def read_checkpoint(path: str, download_hint: str = POOLFORMER_DOWNLOAD_HINT) -> dict:
    """Read a pretrained file or URL without running code (``weights_only=True``, or
    safetensors); say where to get it when missing.

    A URL is read from ``checkpoints/<file name>`` or the torch hub cache when either has it,
    and downloaded into the cache otherwise
    (:func:`~poolformer_mm.checkpoint_io.resolve_checkpoint_url`); mmengine's other
    schemes load through their safe loaders.
    """
    if is_remote_checkpoint(path):
        return CheckpointLoader.load_checkpoint(path, map_location='cpu')
    path = osp.expanduser(path)
    if not osp.isfile(path):
        raise CheckpointUnavailableError(
            f"pretrained checkpoint '{path}' not found. {download_hint}, or train from scratch "
            'with --cfg-options model.backbone.init_cfg=None')
    return load_from_local_weights_only(path, map_location='cpu')


def fit_shapes(state: Dict[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> List[str]:
    """Reshape tensors that only differ by singleton dims (timm's [C,1,1] scales, Linear vs 1x1
    conv); return the keys whose shapes really differ."""
    mismatched = []
    for key, value in state.items():
        if key not in target or value.shape == target[key].shape:
            continue
        if value.squeeze().shape == target[key].squeeze().shape:
            state[key] = value.reshape(target[key].shape)
        else:
            mismatched.append(f'{key}: checkpoint {tuple(value.shape)} vs model '
                              f'{tuple(target[key].shape)}')
    return mismatched


def load_converted_weights(backbone: nn.Module, state: Dict[str, torch.Tensor],
                           source: str) -> None:
    """Load a state dict already in the backbone's own names.

    Raises a clear error when a shape differs or the checkpoint's blocks do not match the model's
    (a checkpoint of another arch); logs the keys that stay at their initial values and the
    checkpoint tensors left unused, one line each.
    """
    name = type(backbone).__name__
    target = backbone.state_dict()
    mismatched = fit_shapes(state, target)
    if mismatched:
        raise InvalidInputError(
            f'{source} does not fit this {name}: {len(mismatched)} shape '
            f'mismatches, e.g. {"; ".join(mismatched[:3])}. Is it a checkpoint of '
            'another arch?')
    unexpected = sorted(k for k in state if k not in target)
    missing = sorted(k for k in target if k not in state)
    extra = [k for k in unexpected if STRUCTURAL_KEY.match(k)]
    lacking = [k for k in missing if STRUCTURAL_KEY.match(k)]
    if extra or lacking:
        raise InvalidInputError(
            f'{source} has a different block structure from this {name} ({len(extra)} extra '
            f'and {len(lacking)} missing backbone tensors, e.g. {(extra + lacking)[0]}). Is it '
            'a checkpoint of another arch?')

    # What remains is benign: output norms the file lacks (ImageNet files have only the final
    # norm) or output norms for stages this model does not return.
    for key in unexpected:
        state.pop(key)
    backbone.load_state_dict(state, strict=False)
    print_log(f'{name}: loaded {len(state)} tensors from {source}', logger='current')
    if missing:
        print_log(f'{name}: left at initial values (not in checkpoint): {", ".join(missing)}',
                  logger='current')
    if unexpected:
        print_log(f'{name}: unused checkpoint tensors: {", ".join(unexpected)}',
                  logger='current')


def _load(backbone: nn.Module, path: str, convert: Callable, download_hint: str) -> None:
    state, layout = convert(read_checkpoint(path, download_hint=download_hint))
    load_converted_weights(backbone, state, f"checkpoint '{path}' ({layout} layout)")


def load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Load a PoolFormer checkpoint (file or URL) in any known layout into ``backbone``."""
    _load(backbone, path, convert_to_poolformer_layout, POOLFORMER_DOWNLOAD_HINT)


def load_metaformer_weights(backbone: nn.Module, path: str) -> None:
    """Load a MetaFormer checkpoint (file or URL) in any known layout into ``backbone``."""
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
