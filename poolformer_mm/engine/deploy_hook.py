"""Fold the backbone for inference once the checkpoint to test is loaded."""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..errors import InvalidInputError


def find_backbone(model):
    """The backbone of a detector or segmentor, through DDP and test-time-augmentation wrappers."""
    while is_model_wrapper(model) or (not hasattr(model, 'backbone') and hasattr(model, 'module')):
        model = model.module
    return getattr(model, 'backbone', None)


def switch_backbone_to_deploy(model) -> None:
    """Call ``switch_to_deploy()`` on ``model``'s backbone, or say why it cannot be done."""
    backbone = find_backbone(model)
    if not hasattr(backbone, 'switch_to_deploy'):
        raise InvalidInputError(
            f'--deploy folds a PoolFormer backbone for inference, but this model\'s backbone is '
            f'{type(backbone).__name__}, which has no switch_to_deploy(); drop --deploy.')
    backbone.switch_to_deploy()


@HOOKS.register_module()
class DeployBackboneHook(Hook):
    """Switch the backbone to its inference form (:meth:`PoolFormer.switch_to_deploy`).

    ``Runner.test`` loads the checkpoint before the test loop starts, so folding at
    ``before_test`` uses the trained weights. Same predictions, faster backbone.
    """

    def before_test(self, runner) -> None:
        switch_backbone_to_deploy(runner.model)
        runner.logger.info('backbone switched to its deploy (folded) form')
