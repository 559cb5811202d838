"""The PoolFormer implementations a user would pick instead of this one, with the same weights.

* ``timm``: ``timm.create_model('poolformer_<arch>', features_only=True)`` (the stages' outputs,
  without the output norms of the detection and segmentation models);
* ``mmpretrain``: ``mmpretrain.models.PoolFormer`` with the output norms of the four stages.

Neither is a dependency: :func:`peer_backbone` returns None and the reason when one is not
installed. The weights are copied from this project's backbone by matching tensors, after
reading the peer's own random weights through this project's checkpoint conversion, so no
layout table is written twice.
"""
import importlib
import re
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..models.checkpoint_layouts import convert_to_poolformer_layout

PEERS = {
    'timm': 'pip install timm (1.0.31 measured; it needs torchvision)',
    'mmpretrain': 'pip install mmpretrain (1.2.0 measured)',
}


def _build_peer(name: str, arch: str) -> nn.Module:
    if name == 'timm':
        timm = importlib.import_module('timm')
        return timm.create_model(f'poolformer_{arch}', features_only=True, pretrained=False)
    mmpretrain_models = importlib.import_module('mmpretrain.models')
    # mmpretrain numbers its stages and the downsamplings between them together
    return mmpretrain_models.PoolFormer(arch, out_indices=(0, 2, 4, 6))


def peer_backbone(name: str, backbone: nn.Module) -> Tuple[Optional[nn.Module], str]:
    """``(peer, '')`` with ``backbone``'s weights, or ``(None, reason)`` when the peer is not
    installed or has no model of this arch."""
    if name not in PEERS:
        raise ValueError(f"unknown peer '{name}'; choose from {', '.join(PEERS)}")
    try:
        peer = _build_peer(name, backbone.arch_name)
    except ImportError as error:
        return None, f'{name} is not installed ({error}): {PEERS[name]}'
    except (KeyError, RuntimeError, ValueError) as error:  # no model of that arch
        return None, f'{name} has no PoolFormer {backbone.arch_name}: {error}'
    copy_weights_by_value(peer, backbone)
    peer.eval()  # mmpretrain's train() returns None
    return peer, ''


def _fingerprint(tensor: torch.Tensor) -> tuple:
    flat = tensor.detach().flatten().double()
    return flat.numel(), round(flat.sum().item(), 6), round(flat.abs().max().item(), 6)


def copy_weights_by_value(peer: nn.Module, backbone: nn.Module) -> None:
    """Load ``backbone``'s weights into ``peer``: the peer's state dict, converted to this
    project's names, pairs each peer tensor with one of ``backbone``'s (by its values, which
    the conversion keeps); every backbone weight but the output norms (timm's features have
    none) must find its peer tensor."""
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for tensor in peer.state_dict().values():  # distinct values to pair by
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    peer_state = peer.state_dict()
    by_value: Dict[tuple, str] = {_fingerprint(t): k for k, t in peer_state.items()
                                  if t.is_floating_point()}
    # timm's feature extractor flattens 'stages.0' to 'stages_0'
    converted, _ = convert_to_poolformer_layout(
        {re.sub(r'^stages_(\d+)\.', r'stages.\1.', k): t for k, t in peer_state.items()})
    own = backbone.state_dict()
    loaded = {}
    for key, tensor in converted.items():
        if key in own and tensor.is_floating_point():
            peer_key = by_value[_fingerprint(tensor)]
            loaded[peer_key] = own[key].reshape(peer_state[peer_key].shape)
    # timm's features have no output norms: their outputs then differ by those
    missing = sorted(k for k in set(own) - set(converted) if not k.startswith('output_norms.'))
    if missing:
        raise RuntimeError(f'{type(peer).__name__} has no counterpart of {missing[:3]}')
    peer.load_state_dict(loaded, strict=False)
