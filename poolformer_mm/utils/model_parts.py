"""Finding the parts of a detector or segmentor through the wrappers around it."""
from mmengine.model import is_model_wrapper


def unwrap_model(model):
    """The detector or segmentor inside DDP and test-time-augmentation wrappers."""
    while is_model_wrapper(model) or (not hasattr(model, 'backbone') and hasattr(model, 'module')):
        model = model.module
    return model


def find_backbone(model):
    """The backbone of a detector or segmentor, through DDP and test-time-augmentation wrappers."""
    return getattr(unwrap_model(model), 'backbone', None)
