"""Refuse, before testing or drawing, a checkpoint that was not trained for the config's model.

mmengine loads test checkpoints with ``strict=False`` and only logs the keys that do not fit, so
another arch's weights gave metrics of a partly random model. Here every parameter and buffer of
the model must be in the checkpoint with its shape, and the checkpoint may hold nothing else,
except BatchNorm's ``num_batches_tracked`` (older PyTorch checkpoints lack it) and everything
outside ``state_dict`` (optimizer, schedulers, message hub, ``EMAHook``'s ``ema_state_dict``).
Whole models in the official mmdet / mmseg layout are compared under the names they load with;
a backbone alone (an ImageNet classifier) is refused with where it belongs (``init_cfg``).
"""
import re
from collections import defaultdict
from typing import Dict, List, Mapping

import torch.nn as nn
from mmengine.runner.checkpoint import CheckpointLoader

from ..models.backbones.poolformer import PoolFormer
from ..models.checkpoint_layouts import (
    classifier_layout,
    convert_official_dense_keys,
    is_whole_model,
    upgrade_legacy_keys,
)
from ..utils.errors import InvalidInputError

TOLERATED = re.compile(r'(^|\.)num_batches_tracked$')
_BLOCK_KEY = re.compile(r'^backbone\.stages\.(\d+)\.blocks\.(\d+)\.')
# buffers of a folded block (DeployPoolFormerBlock), which no trained model has
FOLDED_BLOCK_KEY = re.compile(r'\.blocks\.\d+\.(mixer_scale|fc1_weight)$')


def _bare_model(model: nn.Module) -> nn.Module:
    """The model inside DDP and test-time-augmentation (``BaseTTAModel``) wrappers."""
    while isinstance(getattr(model, 'module', None), nn.Module):
        model = model.module
    return model


def _block_counts(keys) -> str:
    blocks = defaultdict(set)
    for key in keys:
        match = _BLOCK_KEY.match(key)
        if match:
            blocks[int(match[1])].add(int(match[2]))
    return '/'.join(str(len(blocks[stage])) for stage in sorted(blocks))


def _describe(part: str, missing: List[str], unexpected: List[str], mismatched: List[str],
              checkpoint_keys, model_keys) -> str:
    if part == 'backbone':
        ours, theirs = _block_counts(model_keys), _block_counts(checkpoint_keys)
        if ours and theirs and ours != theirs:
            return f'backbone: checkpoint has {theirs} blocks, the config builds {ours}'
    if not any(k.startswith(part + '.') for k in checkpoint_keys):
        return f'{part}: the config builds it, the checkpoint has no {part}'
    if not any(k.startswith(part + '.') for k in model_keys):
        return f'{part}: the checkpoint has a {part}, the config builds none'
    details = []
    if mismatched:
        count = len(mismatched)
        details.append(f'{count} tensor{"s" * (count > 1)} of another shape, e.g. {mismatched[0]}')
    if missing:
        details.append(f'{len(missing)} missing, e.g. {missing[0]}')
    if unexpected:
        details.append(f'{len(unexpected)} not in the model, e.g. {unexpected[0]}')
    return f'{part}: {"; ".join(details)}'


def checkpoint_mismatches(model_state: Mapping, checkpoint_state: Mapping) -> List[str]:
    """One line per top-level part (``backbone``, ``neck``, ``bbox_head`` ...) that does not fit."""
    by_part: Dict[str, tuple] = defaultdict(lambda: ([], [], []))
    for key, value in model_state.items():
        part = key.split('.', 1)[0]
        if key not in checkpoint_state:
            if not TOLERATED.search(key):
                by_part[part][0].append(key)
        elif tuple(checkpoint_state[key].shape) != tuple(value.shape):
            by_part[part][2].append(f'{key} {tuple(checkpoint_state[key].shape)} in the '
                                    f'checkpoint, {tuple(value.shape)} in the model')
    for key in checkpoint_state:
        if key not in model_state and not TOLERATED.search(key):
            by_part[key.split('.', 1)[0]][1].append(key)
    return [_describe(part, *by_part[part], checkpoint_state, model_state)
            for part in sorted(by_part)]


def check_checkpoint_fits(model: nn.Module, checkpoint: str, config: str = 'the config') -> None:
    """Raise ValueError naming each part of ``model`` that ``checkpoint`` does not fit."""
    loaded = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu', logger='silent')
    state = loaded.get('state_dict', loaded) if isinstance(loaded, Mapping) else loaded
    if not isinstance(state, Mapping):
        raise InvalidInputError(f"checkpoint '{checkpoint}' holds no state dict")
    state = {re.sub(r'^module\.', '', key): value for key, value in state.items()
             if hasattr(value, 'shape')}
    # old names and the official mmdet/mmseg layout load through the backbone's state-dict
    # hooks: compare them under the names they load with
    state = upgrade_legacy_keys(state)
    model_state = _bare_model(model).state_dict()
    backbone = getattr(_bare_model(model), 'backbone', None)
    if isinstance(backbone, PoolFormer):
        convert_official_dense_keys(state, 'backbone.', set(backbone.output_norms))
    layout = classifier_layout(state) if is_whole_model(model_state) else None
    if layout is not None:
        raise InvalidInputError(
            f"checkpoint '{checkpoint}' holds a backbone alone ({layout} layout: an ImageNet "
            f'classifier, or a backbone saved on its own), not a whole model of {config}: '
            "testing it would run the config's neck and heads with random weights. Give a "
            'checkpoint of the whole detector or segmentor (the paper\'s released ones load as '
            'they are); to fine-tune from this file, name it in model.backbone.init_cfg = '
            "dict(type='Pretrained', checkpoint=...)")
    folded = sorted(key for key in state if FOLDED_BLOCK_KEY.search(key))
    if folded:
        raise InvalidInputError(
            f"checkpoint '{checkpoint}' holds a model folded for inference (keys such as "
            f"'{folded[0]}', saved after --deploy or prepare_for_inference), which cannot be "
            'unfolded; test the checkpoint written by training instead (--deploy folds it '
            'again after loading)')
    problems = checkpoint_mismatches(model_state, state)
    if problems:
        raise InvalidInputError(
            f"checkpoint '{checkpoint}' does not fit the model of {config}:\n  "
            + '\n  '.join(problems)
            + '\nWas it trained with another config (another arch, or another task)? Test it '
            'with the config it was trained with.')
