from .metaformer import MetaFormer
from .poolformer import PoolFormer

__all__ = ['MetaFormer', 'PoolFormer']
