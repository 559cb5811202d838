from .folded_fpn import FoldedFPN, weights_used_as_stored

__all__ = ['FoldedFPN', 'weights_used_as_stored']
