"""Scratch tensors that inference reuses from call to call instead of allocating them again.

Why: on a CPU, PyTorch's default allocator (glibc's ``malloc``) returns large tensors to the
operating system when they are freed and maps fresh pages for the next one, and the first write
to each 4 KiB page is a page fault. The folded S12 backbone at 512x512 took 8-11 thousand of
them per call, about a fifth of its time on the machines measured (2-3 µs each). A buffer kept
here is faulted in once, on the first call.
"""
import math
import threading
from typing import Sequence

import torch
from torch import Tensor


class ScratchBuffers:
    """Named scratch tensors, one set per thread, each grown to the largest size asked for.

    One set serves every folded block of a backbone: the blocks run one after another and each
    uses its buffers only inside its own forward pass, never in what it returns. Threads that run
    the same model at the same time each get their own set. The memory stays allocated between
    calls (for S12 at 512x512, batch 1: 21 MB, stage 1's hidden activations and normalised
    tokens) until :meth:`clear` or until the owner is deleted. A copy or a pickle of the owner
    starts with an empty set.
    """

    def __init__(self):
        self._local = threading.local()

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype,
            device: torch.device) -> Tensor:
        """An uninitialised tensor of ``shape`` for the role ``name``; the same memory as the
        previous call's for that role, dtype and device whenever it is large enough."""
        if torch.jit.is_tracing():  # a trace would keep this thread's buffer as a constant
            return torch.empty(shape, dtype=dtype, device=device)
        buffers = self._buffers()
        key = (name, dtype, torch.device(device))
        numel = math.prod(shape)
        buffer = buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffers.pop(key, None)  # free the smaller buffer before allocating its successor
            # a normal tensor even under torch.inference_mode(): an inference tensor could not
            # be written by later calls made under no_grad
            with torch.inference_mode(False):
                buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    def clear(self) -> None:
        """Free this thread's buffers."""
        self._buffers().clear()

    def nbytes(self) -> int:
        """Bytes held for this thread."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers().values())

    def _buffers(self) -> dict:
        buffers = getattr(self._local, 'buffers', None)
        if buffers is None:
            buffers = self._local.buffers = {}
        return buffers

    def __reduce__(self):
        # thread-local storage cannot be copied or pickled, and scratch contents mean nothing
        return (ScratchBuffers, ())

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.nbytes()} bytes in this thread)'
