"""Check, once a detector or segmentor is built, that what reads the backbone's outputs expects
their channels: a stock mmdet / mmseg base with our backbone swapped in keeps the ResNet's
``in_channels``, and would otherwise die deep inside the neck at the first forward pass."""
import warnings
from typing import List, Optional, Sequence

import torch.nn as nn

from ..utils.errors import InvalidInputError
from .backbones.base import DenseBackbone


class InChannelsError(InvalidInputError):
    """A neck or head whose ``in_channels`` do not match the backbone's outputs."""


def check_neck_in_channels(model: nn.Module) -> None:
    """Raise :class:`InChannelsError` when what reads a PoolFormer / MetaFormer backbone of
    ``model`` (a built detector or segmentor, or a wrapper with ``.module``) expects other
    channels: the neck (the first of a list), else the segmentor's ``decode_head`` and
    ``auxiliary_head`` through their ``in_index``. A neck's ``in_channels`` lists every output
    (mmdet's and mmseg's FPN assert that length); entries it never reads (before
    ``start_level``, after ``end_level``) are not compared. Other backbones, and necks / heads
    without a list or int ``in_channels``, are left alone. A neck with ``start_level`` > 0
    leaves output norms without gradient, which multi-GPU training refuses: that gets a warning
    saying which stages to return instead."""
    model = getattr(model, 'module', model)
    backbone = getattr(model, 'backbone', None)
    if not isinstance(backbone, DenseBackbone):
        return
    outputs = backbone.out_channels
    returns = f'{backbone.describe()} returns {outputs}'
    neck = getattr(model, 'neck', None)
    if neck is not None:
        name = 'neck'
        if isinstance(neck, nn.Sequential):
            neck, name = neck[0], 'neck[0]'
        problems = [_neck_problem(name, neck, outputs, returns)]
        if not problems[0]:
            _warn_unread_stages(name, neck, backbone)
    else:
        problems = [
            _head_problem(name, head, outputs, returns)
            for name, head in _heads(model, ('decode_head', 'auxiliary_head'))
        ]
    problems = [p for p in problems if p]
    if problems:
        raise InChannelsError('\n'.join(problems))


def _heads(model: nn.Module, names: Sequence[str]):
    for name in names:
        head = getattr(model, name, None)
        if isinstance(head, nn.ModuleList):  # mmseg's cascade heads, several auxiliary heads
            yield from ((f'{name}[{i}]', h) for i, h in enumerate(head))
        elif head is not None:
            yield name, head


def _neck_problem(name: str, neck: nn.Module, outputs: List[int],
                  returns: str) -> Optional[str]:
    in_channels = getattr(neck, 'in_channels', None)
    if not isinstance(in_channels, (list, tuple)):
        return None
    in_channels = list(in_channels)
    first = getattr(neck, 'start_level', 0)
    end = getattr(neck, 'backbone_end_level', len(in_channels))
    if len(in_channels) == len(outputs) and in_channels[first:end] == outputs[first:end]:
        return None
    return (f'{name}.in_channels is {in_channels} but {returns}; '
            f'set model.{name}.in_channels={outputs}')


def _warn_unread_stages(name: str, neck: nn.Module, backbone: DenseBackbone) -> None:
    first = getattr(neck, 'start_level', 0)
    if not isinstance(neck.in_channels, (list, tuple)) or first <= 0:
        return
    read = backbone.out_indices[first:]
    channels = backbone.out_channels[first:]
    warnings.warn(
        f'{name}.start_level={first} skips the first {first} output(s) of '
        f'{backbone.describe()}: their output norms get no gradient, and multi-GPU training '
        f'stops on unused parameters. Return only what the neck reads: backbone out_indices='
        f'{read}, model.{name}.in_channels={channels}, model.{name}.start_level=0',
        UserWarning, stacklevel=2)


def _head_problem(name: str, head: nn.Module, outputs: List[int],
                  returns: str) -> Optional[str]:
    in_channels, in_index = getattr(head, 'in_channels', None), getattr(head, 'in_index', None)
    if in_index is None or not isinstance(in_channels, (int, list, tuple)):
        return None
    indices = [in_index] if isinstance(in_index, int) else list(in_index)
    if any(not -len(outputs) <= i < len(outputs) for i in indices):
        return (f'{name}.in_index is {in_index} but {returns} ({len(outputs)} outputs); '
                f'set model.{name}.in_index to indices below {len(outputs)} and its '
                'in_channels to theirs')
    selected = [outputs[i] for i in indices]
    if getattr(head, 'input_transform', None) == 'resize_concat':
        # mmseg keeps only the sum of a concatenating head's in_channels.
        if in_channels == sum(selected):
            return None
        return (f'{name} concatenates {in_channels} channels (in_index {in_index}) but '
                f'{returns}; set model.{name}.in_channels={selected}')
    expected = selected[0] if isinstance(in_index, int) else selected
    if isinstance(in_channels, (list, tuple)):
        in_channels = list(in_channels)
    if in_channels == expected:
        return None
    return (f'{name}.in_channels is {in_channels} (in_index {in_index}) but {returns}; '
            f'set model.{name}.in_channels={expected}')
