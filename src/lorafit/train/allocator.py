"""Keep glibc from growing the heap with the step's large temporaries (CPU, Linux).

glibc serves an allocation of at least M_MMAP_THRESHOLD bytes with its own mmap, returned to the system
when freed; but after such a block is freed it raises the threshold to that block's size (up to 32 MiB),
so from then on the many few-MiB temporaries of a training step (a 4-bit base dequantizes every weight
on every call) come from the heap, which fragments and does not shrink. Measured on the built-in task
with an NF4 base (bench/precision.py's memory child, 4 steps): peak RSS 1,344 MiB with glibc's dynamic
threshold, 907 MiB with it fixed at 128 KiB (`MALLOC_MMAP_THRESHOLD_=131072`). `mallopt` fixes it from
inside the process; elsewhere (another libc, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value

_done = False


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 128 KiB for this process (once); True if it was set here.

    Leaves it alone when the user chose one (MALLOC_MMAP_THRESHOLD_ in the environment).
    """
    global _done
    if _done or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    return _done
