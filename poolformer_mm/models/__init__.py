from .backbones import PoolFormer
from .pretrained import convert_to_poolformer_layout, load_backbone_weights

__all__ = ['PoolFormer', 'convert_to_poolformer_layout', 'load_backbone_weights']
