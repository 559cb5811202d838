"""Fold the backbone for inference once the checkpoint to test is loaded."""
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..errors import InvalidInputError
from .channels_last import to_channels_last
from .model_parts import find_backbone


def switch_backbone_to_deploy(model) -> None:
    """Call ``switch_to_deploy()`` on ``model``'s backbone, or say why it cannot be done."""
    backbone = find_backbone(model)
    if not hasattr(backbone, 'switch_to_deploy'):
        raise InvalidInputError(
            f'--deploy folds a PoolFormer backbone for inference, but this model\'s backbone is '
            f'{type(backbone).__name__}, which has no switch_to_deploy(); drop --deploy.')
    backbone.switch_to_deploy()


def prepare_for_inference(model) -> None:
    """The fastest inference form of a detector or segmentor with a PoolFormer backbone: the
    backbone folded (:func:`switch_backbone_to_deploy`), and every convolution of the neck and
    head channels-last, fed channels-last maps by the backbone, whose token-layout stages make
    them that way. oneDNN's channels-last convolutions need no layout conversion per call:
    Semantic FPN-S12 at 512x512 ran 1.2x faster in fp32 and 1.9x in bf16 (CPU, 1 thread).
    RoI extractors get contiguous maps. Same predictions up to rounding."""
    switch_backbone_to_deploy(model)
    to_channels_last(model)


@HOOKS.register_module()
class DeployBackboneHook(Hook):
    """Switch the backbone to its inference form (:meth:`PoolFormer.switch_to_deploy`).

    ``Runner.test`` loads the checkpoint before the test loop starts, so folding at
    ``before_test`` uses the trained weights. Same predictions, faster backbone.
    """

    def before_test(self, runner) -> None:
        prepare_for_inference(runner.model)
        runner.logger.info('backbone switched to its deploy (folded) form; neck and head '
                           'convolutions channels-last')
