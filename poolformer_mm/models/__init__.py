from .backbones import MetaFormer, PoolFormer
from .checkpoint_layouts import (
    convert_to_metaformer_layout,
    convert_to_poolformer_layout,
    load_backbone_weights,
    load_metaformer_weights,
)

__all__ = [
    'MetaFormer', 'PoolFormer', 'convert_to_metaformer_layout', 'convert_to_poolformer_layout',
    'load_backbone_weights', 'load_metaformer_weights'
]
