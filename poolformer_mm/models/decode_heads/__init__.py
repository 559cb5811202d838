"""mmseg decode heads. Importing this module needs mmsegmentation; configs that use these heads
list it in ``custom_imports`` next to ``poolformer_mm``."""
from .low_memory_fpn_head import LowMemoryFPNHead

__all__ = ['LowMemoryFPNHead']
