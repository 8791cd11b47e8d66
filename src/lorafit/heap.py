"""The C heap under PyTorch's CPU tensors: giving freed memory back to the system (glibc; elsewhere nothing).

PyTorch's CPU allocator takes its memory from the C library's malloc. glibc keeps freed blocks resident
in its heap for reuse, so a process that frees as much as it keeps — a tensor-by-tensor load, the probes
and the held-out evaluation before training — goes on holding memory no tensor uses, a different amount
each run. `release_freed_memory` hands those pages back (malloc_trim); `free_large_blocks_at_once` makes
every large block its own mapping, returned the moment it is freed (FSDP2 on CPU, see train/fsdp.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's M_MMAP_THRESHOLD (mallopt parameter -3): blocks at least this large get their own mapping.
_M_MMAP_THRESHOLD = -3


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    Measured on the default model: identical NF4 loads left 181 to 474 MiB resident at random, 171-175 MiB
    after trimming; the loop's layout probes and the evaluation before training left 15-30 MiB more, at
    random, until the loop trimmed after them (bench/memory_plan.py, lorafit issue 16).
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def free_large_blocks_at_once(from_bytes: int = 1 << 20) -> None:
    """Give every block of at least `from_bytes` its own mapping, returned to the system when it is freed.

    glibc raises that threshold each time a large block is freed (up to 32 MiB), so the later ones come
    from the heap, which it rarely shrinks. Fixing it costs page faults (FSDP2 on CPU: 25% more step time,
    half the memory; train/fsdp.py).
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, from_bytes)
