"""mmseg decode heads. Importing this module needs mmsegmentation; configs that use these heads
list it in ``custom_imports`` next to ``poolformer_mm``."""
from .low_memory_heads import (
    LowMemoryFCNHead,
    LowMemoryFPNHead,
    LowMemoryUPerHead,
    UpsampledLossMixin,
)

__all__ = ['LowMemoryFCNHead', 'LowMemoryFPNHead', 'LowMemoryUPerHead', 'UpsampledLossMixin']
