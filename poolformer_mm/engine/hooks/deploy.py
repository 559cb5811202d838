"""Fold the model for inference in the test loop (``tools/test.py --deploy``)."""
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ...deploy.fold import prepare_for_inference


@HOOKS.register_module()
class DeployBackboneHook(Hook):
    """Switch the backbone to its inference form (:meth:`PoolFormer.switch_to_deploy`) once
    ``Runner.test`` has loaded the checkpoint: same predictions, faster backbone."""

    def before_test(self, runner) -> None:
        runner.logger.info(prepare_for_inference(runner.model).describe())
