from .synthetic import (
                        TOY_ADE_CLASSES,
                        TOY_ADE_PALETTE,
                        TOY_COCO_CLASSES,
                        make_toy_ade,
                        make_toy_coco,
)

__all__ = ['TOY_ADE_CLASSES', 'TOY_ADE_PALETTE', 'TOY_COCO_CLASSES', 'make_toy_ade',
           'make_toy_coco']
