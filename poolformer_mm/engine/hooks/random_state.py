"""Checkpoints that carry the random number generators, so a resumed run continues exactly.

mmengine 0.10.7 saves no random state: a resumed run re-seeds from ``randomness.seed`` and draws
dropout masks (torch) and, with data loader workers 0, the random resize/crop/flip of the
pipeline (numpy, python ``random``) from the start of the sequence again.
"""
import random
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_dist_info
from mmengine.hooks import CheckpointHook, Hook
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop, get_priority

CHECKPOINT_KEY = 'random_state'


def _restore_after_fast_forward(loop: IterBasedTrainLoop, iterator: Iterator, skip: int,
                                restore: Callable[[], None]):
    """Stands in for ``loop.dataloader_iterator`` (``iterator``) while a resumed loop skips the
    ``skip`` batches it has trained on (running the pipeline and its random draws), and calls
    ``restore`` right after the skip: no hook runs in between."""
    for _ in range(skip):
        yield next(iterator)
    loop.dataloader_iterator = iterator  # out of the way from now on
    restore()
    yield next(iterator)


def get_random_state() -> dict:
    """This process's generator states as tensors, numbers, strings and lists only, which
    ``torch.load(weights_only=True)`` accepts without a new allow-list entry."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = dict(
        torch=torch.get_rng_state(),
        numpy=dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                   has_gauss=int(has_gauss), cached_gaussian=float(cached_gaussian)),
        python=dict(version=version, state=list(py_state), gauss_next=gauss_next))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_random_state(state: dict) -> None:
    """Inverse of :func:`get_random_state` (tensors may come back on a GPU: resume maps the
    checkpoint to the training device)."""
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'].cpu())
    numpy = state['numpy']
    np.random.set_state((numpy['name'], numpy['keys'].cpu().numpy().astype(np.uint32),
                         numpy['pos'], numpy['has_gauss'], numpy['cached_gaussian']))
    python = state['python']
    random.setstate((python['version'], tuple(python['state']), python['gauss_next']))


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Save the random generators of every process with each checkpoint
    (``random_state=dict(world_size=N, ranks=[...])``) and restore each rank's on ``--resume``.

    The ranks' states are gathered when a ``CheckpointHook`` is due and before each validation
    (for ``save_best``); they are restored at ``before_train`` (epoch-based loops) or right after
    mmengine has skipped the trained batches (iteration-based). Validation leaves the random
    state as it found it. Not covered (with a warning where it can): persistent workers of
    epoch-based loops, mid-epoch checkpoints, resuming with another number of processes.
    """
    # Just before CheckpointHook (VERY_LOW) so the states are gathered before it saves, and after
    # the other hooks' ``before_train``, so that what they draw does not shift the sequence.
    priority = get_priority('VERY_LOW') - 1

    def __init__(self) -> None:
        self._saved: Optional[dict] = None  # the random state of a loaded checkpoint
        self._before_val: Optional[dict] = None
        self._gathered: Optional[tuple] = None  # (runner.iter, states of all ranks)

    # -- saving ------------------------------------------------------------------------------
    @staticmethod
    def _checkpoint_due(runner, by_epoch: bool) -> bool:
        """Whether a CheckpointHook saves now (alike on all ranks: all gather, or none)."""
        every, last = ((Hook.every_n_epochs, Hook.is_last_train_epoch) if by_epoch
                       else (Hook.every_n_train_iters, Hook.is_last_train_iter))
        return any(every(hook, runner, hook.interval, hook.save_begin)
                   or (hook.save_last and last(hook, runner))
                   for hook in runner.hooks
                   if isinstance(hook, CheckpointHook) and hook.by_epoch == by_epoch)

    def _gather(self, runner, state: Optional[dict] = None) -> None:
        if get_dist_info()[1] > 1:
            self._gathered = (runner.iter, all_gather_object(state or get_random_state()))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self._checkpoint_due(runner, by_epoch=False):
            self._gather(runner)

    def after_train_epoch(self, runner) -> None:
        if self._checkpoint_due(runner, by_epoch=True):
            self._gather(runner)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        world_size = get_dist_info()[1]
        if world_size == 1:
            # a save_best write inside validation stores the state from before it, which
            # after_val restores
            states = [self._before_val or get_random_state()]
        elif self._gathered is not None and self._gathered[0] == runner.iter:
            states = self._gathered[1]
        else:  # a save outside the CheckpointHook schedule: only this rank's state is at hand
            states = [get_random_state()]
        checkpoint[CHECKPOINT_KEY] = dict(world_size=world_size, ranks=states)

    # -- restoring ---------------------------------------------------------------------------
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        # also called for ``load_from``: ``before_train`` applies it only when the loop resumes
        self._saved = checkpoint.get(CHECKPOINT_KEY)

    def before_train(self, runner) -> None:
        saved, self._saved = self._saved, None
        loop = runner.train_loop
        # mmengine's resume sets the loop's iteration from the checkpoint, load_from does not
        if loop.iter == 0:
            return
        where = f'iteration {loop.iter}' if isinstance(loop, IterBasedTrainLoop) \
            else f'epoch {loop.epoch}'
        rank, world_size = get_dist_info()
        why = None
        if saved is None:
            why = f'the checkpoint has no random state (written without {type(self).__name__})'
        elif saved['world_size'] != world_size:
            why = (f"the checkpoint's random state is that of {saved['world_size']} processes and "
                   f'this run has {world_size} (resume with as many for an exact continuation)')
        elif len(saved['ranks']) != world_size:
            why = ('the checkpoint holds the random state of rank 0 only (it was saved outside '
                   'the CheckpointHook schedule)')
        if why:
            runner.logger.warning(
                f'{why}: random state not restored, so dropout and data augmentation of the '
                'resumed run start over from randomness.seed and differ from an uninterrupted run')
            return
        state = saved['ranks'][rank]

        def restore():
            set_random_state(state)
            runner.logger.info(f'restored the random state (torch, numpy, python random) of '
                               f'{world_size} process(es) as it was after {where}')

        if isinstance(loop, IterBasedTrainLoop):
            loop.dataloader_iterator = _restore_after_fast_forward(
                loop, loop.dataloader_iterator, loop.iter, restore)
        else:
            restore()
            dataloader = loop.dataloader
            if (isinstance(loop, EpochBasedTrainLoop) and dataloader.num_workers > 0
                    and dataloader.persistent_workers):
                runner.logger.warning(
                    'train_dataloader.persistent_workers=True: the random state of the data '
                    'loader workers is not in the checkpoint, so the data augmentation of the '
                    'resumed run differs from an uninterrupted one. Set '
                    'train_dataloader.persistent_workers=False for an exact resume.')

    # -- validation --------------------------------------------------------------------------
    def before_val(self, runner) -> None:
        self._before_val = get_random_state()
        self._gather(runner, self._before_val)  # what a save_best checkpoint after it stores

    def after_val(self, runner) -> None:
        if self._before_val is not None:
            set_random_state(self._before_val)
            self._before_val = None
