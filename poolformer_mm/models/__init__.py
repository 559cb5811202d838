from .backbones import MetaFormer, PoolFormer
from .channel_check import InChannelsError, check_neck_in_channels
from .checkpoint_layouts import (
    convert_to_metaformer_layout,
    convert_to_poolformer_layout,
    load_backbone_weights,
    load_metaformer_weights,
)

__all__ = [
    'InChannelsError', 'MetaFormer', 'PoolFormer', 'check_neck_in_channels',
    'convert_to_metaformer_layout', 'convert_to_poolformer_layout', 'load_backbone_weights',
    'load_metaformer_weights'
]
