"""Inference, in mmdet's meaning of ``apis``: draw a model's predictions on images."""
from .inference import draw_predictions, init_inferencer

__all__ = ['draw_predictions', 'init_inferencer']
