"""glibc's allocator for training on a CPU: keep freed memory for the next step.

A training step frees and re-allocates the same large activations every iteration. By default
glibc serves blocks above its mmap threshold with fresh mmaps and returns them on free, so every
step pays their page faults again; with mmap off and a high trim threshold the freed blocks stay in
the heap and are reused (measured: docs/design.md). Numbers are unchanged: only where memory comes
from. The process then keeps its peak memory until it exits, which a training process does anyway.
"""
import ctypes
import ctypes.util
import os
import sys
from typing import Callable

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc malloc.h
_USER_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
APPLIED = "glibc malloc: freed memory kept for reuse (mmap off, trim threshold 2 GiB)"
_applied = False


def keep_freed_memory() -> str:
    """Apply the setting once per process (Linux with glibc, no MALLOC_* tuning of the user's);
    returns a line saying what was done, for the run's log."""
    global _applied
    if _applied:
        return APPLIED
    user = [v for v in _USER_VARIABLES if os.environ.get(v)]
    if user:
        return f"glibc malloc: left as the environment sets it ({', '.join(user)})"
    if not sys.platform.startswith("linux"):
        return "glibc malloc: not on Linux, allocator left alone"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "glibc malloc: no mallopt in this C library (not glibc), allocator left alone"
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)):
        return "glibc malloc: mallopt refused the setting, allocator left alone"
    _applied = True
    return APPLIED


def for_training_on(device, log: Callable[[str], None]) -> None:
    """The allocator policy both training loops (gemini_pretrain, the trainers) follow: on a CPU keep
    freed memory and log what was done; on a GPU the caching allocator already reuses memory."""
    if getattr(device, "type", device) == "cpu":
        log(keep_freed_memory())
