"""PyTorch DDP on CPU-only nodes through mmengine's Runner; with a GPU nothing here runs.

mmengine 0.10.7 calls ``torch.cuda.set_device`` and wraps with ``device_ids=[local_rank]``; on
CPU we start the gloo process group ourselves and wrap without device ids, converting SyncBN to
BN in the built model only (the same config still gives SyncBN on GPUs).
"""
import inspect
import os
from collections import Counter
from contextlib import contextmanager

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm
from mmengine.registry import MODEL_WRAPPERS
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# Unlike the old name, forward_sync_buffers=False still broadcasts rank 0's buffers once, when
# DDP wraps the model; no buffer here must differ between ranks.
_NO_FORWARD_BUFFER_SYNC = ('forward_sync_buffers' if 'forward_sync_buffers' in
                           inspect.signature(DistributedDataParallel.__init__).parameters
                           else 'broadcast_buffers')


def revert_sync_bn_for_cpu(module: nn.Module) -> nn.Module:
    """Convert the SyncBN layers (torch's and mmcv's) of ``module`` to BN (same state-dict keys),
    saying which in the log. Each process then normalises over its own images only."""
    names = [name for name, m in module.named_modules()
             if isinstance(m, nn.SyncBatchNorm) or type(m).__name__ == 'SyncBatchNorm']
    if not names:
        return module
    module = revert_sync_batchnorm(module)
    # one entry per top-level module, e.g. "decode_head: 7, auxiliary_head: 1"
    where = Counter(name.split('.')[0] or 'model' for name in names)
    print_log(
        f'CPU distributed run: converted {len(names)} SyncBN layers '
        f'({", ".join(f"{k}: {n}" for k, n in where.items())}) to BN, as gloo has no '
        'synchronised batch norm; each process computes batch statistics over its own images '
        '(SyncBN on GPUs uses those of all processes)',
        logger='current')
    return module


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` for CPU processes (gloo), converting SyncBN to BN before
    torch's DDP inspects the model; on GPUs it keeps SyncBN."""

    def __init__(self, module: nn.Module, **kwargs):
        if not any(p.is_cuda for p in module.parameters()):
            module = revert_sync_bn_for_cpu(module)
        super().__init__(module=module, **kwargs)


def prepare_cpu_distributed(cfg: Config) -> None:
    """Make ``cfg.launcher`` in {'pytorch', 'slurm'} work on machines without CUDA."""
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none' or torch.cuda.is_available():
        return
    if launcher == 'slurm':  # slurm's task variables as torch's env:// rendezvous reads them
        missing = [v for v in ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID')
                   if v not in os.environ]
        if missing:
            raise RuntimeError(f'--launcher slurm outside a slurm task ({", ".join(missing)} '
                               'unset)')
        os.environ['RANK'] = os.environ['SLURM_PROCID']
        os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
        os.environ['LOCAL_RANK'] = os.environ['SLURM_LOCALID']
        if 'MASTER_ADDR' not in os.environ:
            raise RuntimeError('--launcher slurm on CPU needs MASTER_ADDR (tools/slurm_train.sh '
                               'sets it to the first node of the job)')
        os.environ.setdefault('MASTER_PORT', '29500')
    elif launcher != 'pytorch':
        raise RuntimeError(f"--launcher {launcher} needs CUDA here; on CPU-only nodes use "
                           "--launcher pytorch (tools/dist_train.sh) or slurm")
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    wrapper = dict(cfg.get('model_wrapper_cfg') or dict(type='MMDistributedDataParallel'))
    if wrapper.get('type', 'MMDistributedDataParallel') in ('MMDistributedDataParallel',
                                                            MMDistributedDataParallel):
        wrapper['type'] = 'CPUDistributedDataParallel'
    wrapper['device_ids'] = None
    if not {'broadcast_buffers', 'forward_sync_buffers'} & set(wrapper):
        # no buffer broadcast before each forward pass, as mmengine's default GPU wrapping
        wrapper[_NO_FORWARD_BUFFER_SYNC] = False
    # mmengine reads a top-level find_unused_parameters only when it builds the wrapper itself
    wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo', init_method='env://')


@contextmanager
def closing_process_group():
    """Around a whole run: if the run starts a process group, wait for every rank and destroy
    it when the run has succeeded (left to interpreter exit, gloo's threads can abort the process).
    A group that existed before is left as it is, and so is everything after an error."""
    started_before = dist.is_available() and dist.is_initialized()
    yield
    if not started_before and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
