"""A hook that stops a run early with a message instead of failing late or silently."""
import math
import os.path as osp

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class FiniteLossHook(Hook):
    """Stop training at the first iteration whose loss is NaN or infinite, before the checkpoint
    hook can write the broken weights."""
    priority = 'ABOVE_NORMAL'

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        loss = (outputs or {}).get('loss')
        if loss is None:
            return
        # detached: float() of a tensor that requires grad warns on every iteration
        loss = float(loss.detach()) if hasattr(loss, 'detach') else float(loss)
        if math.isfinite(loss):
            return
        last = osp.join(runner.work_dir, 'last_checkpoint')
        if osp.isfile(last):
            with open(last) as f:
                kept = f"the last good checkpoint is {f.read().strip()}"
        else:
            kept = 'no checkpoint had been written yet'
        raise FloatingPointError(
            f'loss became {loss} at iteration {runner.iter + 1} (epoch {runner.epoch + 1}); '
            f'training stopped and {kept}. Lower the learning rate, enable gradient clipping '
            '(optim_wrapper.clip_grad) or check the data, then train again with --resume.')
