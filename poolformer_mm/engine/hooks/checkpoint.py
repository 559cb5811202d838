"""mmengine's CheckpointHook, reordered so that a kill at any moment loses no checkpoint."""
import contextlib
import os.path as osp

from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook
from mmengine.registry import HOOKS

from ...checkpoint_io import remove_incomplete_writes


@HOOKS.register_module()
class CrashSafeCheckpointHook(CheckpointHook):
    """:class:`~mmengine.hooks.CheckpointHook` (same arguments) that deletes outdated checkpoints
    only once the new one is in place and ``last_checkpoint`` points at it (upstream deletes them
    first, so a job killed during the write can be left with none). At the start of training it
    deletes the temporary files of killed writes (the work-dir lock says no other job owns them).
    """

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if not is_main_process():
            return
        for folder in dict.fromkeys([runner.work_dir, self.out_dir]):
            removed = remove_incomplete_writes(folder)
            if removed:
                runner.logger.warning(
                    f'removed {len(removed)} incomplete checkpoint write(s) of an interrupted '
                    f'run from {folder}: {", ".join(removed)}')

    def _save_checkpoint_with_step(self, runner, step, meta):
        with self._removals_deferred():
            super()._save_checkpoint_with_step(runner, step, meta)

    def _save_best_checkpoint(self, runner, metrics) -> None:
        # (upstream's may call _save_checkpoint_with_step inside: the deferral is re-entrant)
        with self._removals_deferred():
            super()._save_best_checkpoint(runner, metrics)

    @contextlib.contextmanager
    def _removals_deferred(self):
        """Defer the file backend's removals inside the block to the end of the outermost one."""
        if getattr(self, '_deferred', None) is not None:
            yield
            return
        deferred = self._deferred = []
        backend = self.file_backend
        backend.remove = lambda path: deferred.append((path, False))
        backend.rmtree = lambda path: deferred.append((path, True))
        try:
            yield
        finally:
            del backend.remove, backend.rmtree  # the instance attributes shadowed the methods
            self._deferred = None
        current = [self.last_ckpt, getattr(self, 'best_ckpt_path', None),
                   *getattr(self, 'best_ckpt_path_dict', {}).values()]
        current = {osp.abspath(str(path)) for path in current if path}
        for path, is_dir in deferred:
            if osp.abspath(str(path)) in current:  # rewritten under the same name: keep it
                continue
            if is_dir:
                self.file_backend.rmtree(path)
            elif self.file_backend.isfile(path):
                self.file_backend.remove(path)
