from .folded_fpn import FoldedFPN

__all__ = ['FoldedFPN']
