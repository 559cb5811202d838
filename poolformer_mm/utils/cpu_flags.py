"""The x86 CPU flags Linux lists in /proc/cpuinfo (``lscpu``'s Flags), which tell what units a
CPU has: bf16 (``avx512_bf16``, ``amx_bf16``) for ``--amp``, VNNI for int8 ONNX models.

Standard library only: tools that need neither torch nor the OpenMMLab stack load this file by
its path (``tools/deployment/quantize_onnx.py``).
"""
from typing import FrozenSet, Optional

# the flags of native bf16 arithmetic
BF16_CPU_FLAGS = ('avx512_bf16', 'amx_bf16')


def cpu_flags(cpuinfo: str = '/proc/cpuinfo') -> Optional[FrozenSet[str]]:
    """The first CPU's flags, or None where there are none to read (not Linux, or not x86)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith('flags'):
                    return frozenset(line.split(':', 1)[1].split())
    except OSError:
        pass
    return None


def machine_description(cpuinfo: str = '/proc/cpuinfo') -> str:
    """The CPU model and its SIMD / matrix flags, as ``lscpu`` shows them: the machine a speed
    figure was measured on."""
    try:
        with open(cpuinfo) as f:
            model = next((line.split(':', 1)[1].strip() for line in f
                          if line.startswith('model name')), 'unknown CPU')
    except OSError:
        model = 'unknown CPU'
    flags = cpu_flags(cpuinfo) or ()
    shown = [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile') if f in flags]
    return f"{model} ({' '.join(shown) or 'no AVX2/AVX-512/AMX flags'})"
