"""PyTorch DDP on CPU-only nodes through mmengine's Runner.

mmengine 0.10.7 initialises the process group with ``torch.cuda.set_device(local_rank)`` for every
launcher, and wraps the model with ``device_ids=[local_rank]``; both fail without CUDA
("'torch._C' has no attribute '_cuda_setDevice'"). On CPU we start the gloo process group
ourselves (the Runner then skips its own init) and wrap without device ids. With a GPU nothing
here runs and behaviour is upstream's.
"""
import os

import torch
import torch.distributed as dist
from mmengine.config import Config


def _export_slurm_env() -> None:
    """Translate slurm's task variables to the ones torch's env:// rendezvous reads."""
    missing = [v for v in ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID')
               if v not in os.environ]
    if missing:
        raise RuntimeError(f'--launcher slurm outside a slurm task ({", ".join(missing)} unset)')
    os.environ['RANK'] = os.environ['SLURM_PROCID']
    os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
    os.environ['LOCAL_RANK'] = os.environ['SLURM_LOCALID']
    if 'MASTER_ADDR' not in os.environ:
        raise RuntimeError('--launcher slurm on CPU needs MASTER_ADDR (tools/slurm_train.sh '
                           'sets it to the first node of the job)')
    os.environ.setdefault('MASTER_PORT', '29500')


def prepare_cpu_distributed(cfg: Config) -> None:
    """Make ``cfg.launcher`` in {'pytorch', 'slurm'} work on machines without CUDA."""
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none' or torch.cuda.is_available():
        return
    if launcher == 'slurm':
        _export_slurm_env()
    elif launcher != 'pytorch':
        raise RuntimeError(f"--launcher {launcher} needs CUDA here; on CPU-only nodes use "
                           "--launcher pytorch (tools/dist_train.sh) or slurm")
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    wrapper = dict(cfg.get('model_wrapper_cfg') or dict(type='MMDistributedDataParallel'))
    wrapper['device_ids'] = None
    wrapper.setdefault('broadcast_buffers', False)  # as mmengine's default GPU wrapping
    cfg.model_wrapper_cfg = wrapper
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo', init_method='env://')
