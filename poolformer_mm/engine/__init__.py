from .optim_wrapper import BF16AutocastOptimWrapper

__all__ = ['BF16AutocastOptimWrapper']
