"""Load PoolFormer weights from the checkpoint layouts users already have, with no conversion step.

Recognised layouts (detected from the keys):

* ``official`` - sail-sg/poolformer ImageNet files: ``patch_embed.proj``, ``network.{2k}.{j}``
  (blocks of stage k), ``network.{2k-1}.proj`` (downsampling), ``norm`` (final norm), ``head``.
* ``mmpretrain`` - the official names under ``backbone.``, final norm ``norm6``, ``head.fc``.
* ``timm`` - ``stem.conv``, ``stages.{k}.downsample.conv``, ``stages.{k}.blocks.{j}``,
  ``layer_scale1.scale``, ``head.norm`` / ``head.fc``.
* ``poolformer_mm`` - this package's own names, bare or inside an mmengine checkpoint of a whole
  detector or segmentor (``state_dict`` with a ``backbone.`` prefix).

The classifier's final norm becomes the last output norm; classifier weights are dropped.
"""
import os.path as osp
import re
from typing import Dict, List, Mapping, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader

from ..engine.safe_checkpoints import is_remote_checkpoint, load_from_local_weights_only

# (pattern, replacement) rules per layout, applied to each key in order; the first match wins and
# a key that matches no rule is kept as it is (it then shows up as unexpected).
_OFFICIAL_RULES = [
    # the attention hybrids' position embedding sits at the start of their first attention stage
    (r'^network\.(\d+)\.pos_embed$', lambda m: f'stages.{(int(m[1]) + 1) // 2}.pos_embed.weight'),
    (r'^patch_embed\.proj\.', 'stem.proj.'),
    (r'^network\.(\d+)\.proj\.', lambda m: f'stages.{(int(m[1]) + 1) // 2}.downsample.proj.'),
    (r'^network\.(\d+)\.(\d+)\.layer_scale_(\d)$',
     lambda m: f'stages.{int(m[1]) // 2}.blocks.{m[2]}.layer_scale_{m[3]}.scale'),
    (r'^network\.(\d+)\.(\d+)\.', lambda m: f'stages.{int(m[1]) // 2}.blocks.{m[2]}.'),
    (r'^norm\.', 'output_norms.3.'),
    (r'^norm(\d)\.', lambda m: f'output_norms.{int(m[1]) // 2}.'),  # mmpretrain: norm{2k}
    (r'^head\.', None),
]
_TIMM_RULES = [
    (r'^stem\.conv\.', 'stem.proj.'),
    (r'^stages\.(\d+)\.downsample\.conv\.', r'stages.\1.downsample.proj.'),
    (r'^(stages\.\d+\.blocks\.\d+)\.layer_scale(\d)\.', r'\1.layer_scale_\2.'),
    (r'^head\.norm\.', 'output_norms.3.'),
    (r'^head\.', None),
]
_LAYOUT_RULES = {'official': _OFFICIAL_RULES, 'mmpretrain': _OFFICIAL_RULES,
                 'timm': _TIMM_RULES, 'poolformer_mm': []}
# A key of our own layout that belongs to the backbone's structure (not an output norm).
STRUCTURAL_KEY = re.compile(r'^(stem|stages)\.')


POOLFORMER_DOWNLOAD_HINT = ('Download the ImageNet weights (github.com/sail-sg/poolformer, '
                            'release v1.0, poolformer_<arch>.pth.tar) into checkpoints/')


def read_checkpoint(path: str, download_hint: str = POOLFORMER_DOWNLOAD_HINT) -> dict:
    """Read a pretrained file or URL safely (``weights_only=True``); say where to get it when
    missing. URLs (and mmengine's other schemes) are downloaded into the torch hub cache."""
    if is_remote_checkpoint(path):
        return CheckpointLoader.load_checkpoint(path, map_location='cpu')
    path = osp.expanduser(path)
    if not osp.isfile(path):
        raise FileNotFoundError(
            f"pretrained checkpoint '{path}' not found. {download_hint}, or train from scratch "
            'with --cfg-options model.backbone.init_cfg=None')
    return load_from_local_weights_only(path, map_location='cpu')


def unwrap_state_dict(checkpoint: Mapping) -> Tuple[Dict[str, torch.Tensor], bool]:
    """Return the flat state dict and whether it came with a ``backbone.`` prefix."""
    state = checkpoint
    for wrapper in ('state_dict', 'model'):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    backbone = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    if backbone:
        return backbone, True
    return dict(state), False


def _detect_layout(state: Mapping, had_backbone_prefix: bool) -> str:
    if 'stem.proj.weight' in state:
        return 'poolformer_mm'
    if 'stem.conv.weight' in state:
        return 'timm'
    if 'patch_embed.proj.weight' in state and any(k.startswith('network.') for k in state):
        return 'mmpretrain' if had_backbone_prefix else 'official'
    sample = ', '.join(list(state)[:5])
    raise ValueError('checkpoint is not a PoolFormer checkpoint in any known layout (official, '
                     f'mmpretrain, timm, poolformer_mm); its first keys are: {sample}')


def convert_to_poolformer_layout(checkpoint: Mapping) -> Tuple[Dict[str, torch.Tensor], str]:
    """Rename a checkpoint's keys to this package's :class:`PoolFormer` names.

    Returns:
        tuple: the converted state dict and the name of the detected layout.
    """
    state, had_prefix = unwrap_state_dict(checkpoint)
    layout = _detect_layout(state, had_prefix)
    return apply_layout_rules(state, _LAYOUT_RULES[layout]), layout


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


def load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Load a PoolFormer checkpoint in any known layout into ``backbone``."""
    state, layout = convert_to_poolformer_layout(read_checkpoint(path))
    load_converted_weights(backbone, state, f"checkpoint '{path}' ({layout} layout)")


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
        raise ValueError(f'{source} does not fit this {name}: {len(mismatched)} shape '
                         f'mismatches, e.g. {"; ".join(mismatched[:3])}. Is it a checkpoint of '
                         'another arch?')
    unexpected = sorted(k for k in state if k not in target)
    missing = sorted(k for k in target if k not in state)
    extra = [k for k in unexpected if STRUCTURAL_KEY.match(k)]
    lacking = [k for k in missing if STRUCTURAL_KEY.match(k)]
    if extra or lacking:
        raise ValueError(
            f'{source} has a different block structure from this {name} ({len(extra)} extra '
            f'and {len(lacking)} missing backbone tensors, e.g. {(extra + lacking)[0]}). Is it a '
            'checkpoint of another arch?')

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
