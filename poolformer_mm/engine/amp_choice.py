"""The precision that ``--amp`` runs, in every tool (``tools/train.py``, ``tools/test.py``,
``tools/infer.py``).

On a GPU it is fp16 (mmengine's AMP). On a CPU it is bf16 autocast, which pays only where the
CPU has bf16 units (AVX-512 BF16 or AMX): there the matrix products run several times faster
than in fp32. A CPU without them emulates bf16, slower than fp32 (large bf16 products ran at
1.2-1.4 GFLOP/s against fp32's 176-188 on an AVX2-only AMD EPYC, about 140x slower), so there
a bare ``--amp`` says so and runs fp32 instead: it is never silently slower. Where the CPU's
flags cannot be read (not Linux, or not x86) it runs fp32 too, and says why. ``--amp bf16``
forces bf16.
"""
import argparse
import functools
import logging
from typing import Optional, Tuple

import torch
from mmengine.logging import print_log

from ..cpu_flags import BF16_CPU_FLAGS, cpu_flags
from ..errors import InvalidInputError

NO_BF16_UNITS = (f"this CPU has no bf16 units (neither {' nor '.join(BF16_CPU_FLAGS)} in "
                 '/proc/cpuinfo)')
UNKNOWN_BF16_UNITS = ('cannot tell whether this CPU has bf16 units (no x86 flags in '
                      '/proc/cpuinfo: not Linux, or not x86)')
# what emulation costs, as measured (the large products of tools/analysis/benchmark.py)
EMULATED_BF16_COST = 'slower than fp32 (about 140x in matrix products on an AVX2-only CPU)'


@functools.lru_cache(maxsize=None)
def cpu_bf16_units(cpuinfo: str = '/proc/cpuinfo') -> Optional[Tuple[str, ...]]:
    """The bf16 flags this CPU reports: () if it has none, None if it lists no x86 flags (not
    Linux, or not x86: then nobody here can tell)."""
    flags = cpu_flags(cpuinfo)
    return None if flags is None else tuple(flag for flag in BF16_CPU_FLAGS if flag in flags)


AMP_CHOICES = ('auto', 'bf16', 'fp16')


def amp_argument(value: str) -> str:
    """The ``type`` of an ``--amp [auto|bf16|fp16]`` command-line option: a value that is not
    a choice, such as a config given after ``--amp``, is refused saying how to write it."""
    if value not in AMP_CHOICES:
        raise argparse.ArgumentTypeError(
            f"takes {', '.join(AMP_CHOICES)}, not '{value}'"
            + (' (a config? --amp takes an optional value, so write it after the config)'
               if value.endswith('.py') else ''))
    return value


def add_amp_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--amp [auto|bf16|fp16]`` on ``parser``, its help starting with ``what``."""
    parser.add_argument(
        '--amp', nargs='?', const='auto', type=amp_argument, metavar='{auto,bf16,fp16}',
        help=f'{what}. auto (the default of a bare --amp): fp16 on a GPU, bf16 autocast on a CPU '
        'with bf16 units, fp32 with a warning on a CPU without them, where bf16 is emulated and '
        'slower; bf16 or fp16 as named (fp16: GPUs only)')


def amp_dtype(device: str, choice: str = 'auto') -> Tuple[Optional[torch.dtype], str]:
    """The autocast dtype of ``--amp CHOICE`` (training or inference) on ``device`` and a line
    saying what runs, or ``None`` and the reason it runs fp32.

    ``choice`` is 'auto' (fp16 on a GPU; bf16 on a CPU with bf16 units, fp32 on one without),
    'bf16' or 'fp16' (as asked; bf16 on a CPU without bf16 units is emulated, and slower than
    fp32, which the line says; bf16 on a GPU without bf16 support is refused)."""
    if choice not in AMP_CHOICES:
        raise InvalidInputError(f"--amp takes auto, bf16 or fp16, not '{choice}'")
    on_gpu = str(device).startswith('cuda')
    if choice == 'fp16' and not on_gpu:
        raise InvalidInputError('--amp fp16 is for GPUs: CPU autocast runs bf16; use --amp or '
                                '--amp bf16')
    if on_gpu:
        if (choice == 'bf16' and torch.cuda.is_available()
                and not torch.cuda.is_bf16_supported(including_emulation=False)):
            raise InvalidInputError('--amp bf16: this GPU has no bf16 arithmetic; use --amp '
                                    '(fp16)')
        name = 'bf16' if choice == 'bf16' else 'fp16'
        return getattr(torch, 'bfloat16' if name == 'bf16' else 'float16'), (
            f'mixed precision: {name} autocast on the GPU')
    units = cpu_bf16_units()
    if units:
        return torch.bfloat16, f"mixed precision: bf16 autocast (this CPU has {', '.join(units)})"
    missing = (UNKNOWN_BF16_UNITS if units is None else
               f'{NO_BF16_UNITS}: bf16 is emulated here, {EMULATED_BF16_COST}')
    if choice == 'bf16':
        return torch.bfloat16, f'mixed precision: bf16 autocast as asked, but {missing}'
    return None, f'--amp: {missing}; running in fp32 (--amp bf16 forces bf16)'


def log_amp_dtype(device: str, choice: str = 'auto') -> Optional[torch.dtype]:
    """:func:`amp_dtype`, with its line logged: a warning when it runs fp32 or bf16 on a CPU
    that may not have the units."""
    dtype, message = amp_dtype(device, choice)
    doubtful = dtype is None or (not str(device).startswith('cuda') and not cpu_bf16_units())
    print_log(message, logger='current', level=logging.WARNING if doubtful else logging.INFO)
    return dtype
