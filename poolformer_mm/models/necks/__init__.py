from .folded_fpn import FoldedFPN, weights_used_as_stored
from .folded_fpn_head import (
    ConvAppliedByNeck,
    FoldedFPNWithHeadConv,
    levels_read,
    why_head_conv_not_mergeable,
)

__all__ = ['FoldedFPN', 'weights_used_as_stored', 'ConvAppliedByNeck', 'FoldedFPNWithHeadConv',
           'levels_read', 'why_head_conv_not_mergeable']
