from .backbones import MetaFormer, PoolFormer
from .pretrained import convert_to_poolformer_layout, load_backbone_weights

__all__ = ['MetaFormer', 'PoolFormer', 'convert_to_poolformer_layout', 'load_backbone_weights']
