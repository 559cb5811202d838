"""timm's and mmpretrain's PoolFormers with this project's weights; neither is a dependency."""
import importlib
import re
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..models.checkpoint_layouts import convert_to_poolformer_layout

# each peer's module and the version the README measured
PEERS = {'timm': ('timm', '1.0.31'), 'mmpretrain': ('mmpretrain.models', '1.2.0')}


def install_hint(name: str) -> str:
    """How to install peer ``name`` keeping this torch, the one the installed mmcv was built for."""
    version, _, build = torch.__version__.partition('+')
    if build and not re.fullmatch(r'cpu|cu\d+|rocm[\d.]+|xpu', build):
        return (f'build torchvision against this torch {torch.__version__} (a local build, '
                f'which pip would replace), then pip install {name} ({PEERS[name][1]} measured)')
    command = f'pip install {name} "torch=={torch.__version__}"'
    if build:
        command += f' --extra-index-url https://download.pytorch.org/whl/{build}'
    return f'{command} (keeps torch {version}; {name} {PEERS[name][1]} measured)'


def peer_backbone(name: str, backbone: nn.Module) -> Tuple[Optional[nn.Module], str]:
    """``(peer, '')`` with ``backbone``'s weights, or ``(None, reason)`` when the peer is not
    installed, does not import, or has no model of this arch."""
    if name not in PEERS:
        raise ValueError(f"unknown peer '{name}'; choose from {', '.join(PEERS)}")
    try:
        module = importlib.import_module(PEERS[name][0])
    except ImportError as error:
        missing = (error.name or name).split('.')[0]
        needs = 'is not installed' if missing == name else f'is installed but needs {missing}'
        return None, f'{name} {needs} ({error}): {install_hint(name)}'
    except (OSError, RuntimeError) as error:  # e.g. "operator torchvision::nms does not exist"
        return None, (f'{name} does not import beside torch {torch.__version__} '
                      f'({type(error).__name__}: {error}); the usual cause is a torchvision '
                      f'built for another torch: pip uninstall torchvision, then '
                      f'{install_hint(name)}')
    arch = backbone.arch_name
    try:  # mmpretrain numbers its stages and the downsamplings between them together
        peer = (module.create_model(f'poolformer_{arch}', features_only=True, pretrained=False)
                if name == 'timm' else module.PoolFormer(arch, out_indices=(0, 2, 4, 6)))
    except (KeyError, RuntimeError, ValueError) as error:  # no model of that arch
        return None, f'{name} has no PoolFormer {arch}: {error}'
    copy_weights_by_value(peer, backbone)
    peer.eval()  # mmpretrain's train() returns None
    return peer, ''


def copy_weights_by_value(peer: nn.Module, backbone: nn.Module) -> None:
    """Load ``backbone``'s weights into ``peer``, pairing tensors by value through this project's
    checkpoint conversion of the peer's own (random) weights: no layout table written twice."""
    def fingerprint(tensor):
        flat = tensor.detach().flatten().double()
        return flat.numel(), round(flat.sum().item(), 6), round(flat.abs().max().item(), 6)

    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for tensor in peer.state_dict().values():  # distinct values to pair by
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    peer_state = peer.state_dict()
    by_value = {fingerprint(t): k for k, t in peer_state.items() if t.is_floating_point()}
    # timm's feature extractor flattens 'stages.0' to 'stages_0'
    converted, _ = convert_to_poolformer_layout(
        {re.sub(r'^stages_(\d+)\.', r'stages.\1.', k): t for k, t in peer_state.items()})
    own, loaded = backbone.state_dict(), {}
    for key, tensor in converted.items():
        if key in own and tensor.is_floating_point():
            peer_key = by_value[fingerprint(tensor)]
            loaded[peer_key] = own[key].reshape(peer_state[peer_key].shape)
    # timm's features have no output norms: their outputs then differ by those
    missing = sorted(k for k in set(own) - set(converted) if not k.startswith('output_norms.'))
    if missing:
        raise RuntimeError(f'{type(peer).__name__} has no counterpart of {missing[:3]}')
    peer.load_state_dict(loaded, strict=False)
