"""Process-level settings the batched engine's speed depends on.

The engine allocates and frees a few dozen tensors of 0.1 to 5 MB every epoch. glibc serves blocks that
large with mmap and hands them back with munmap on free, so every epoch re-faults fresh zeroed pages from
the kernel: on the strategic sweep that was about 6 million page faults and 10 s of system time out of
35 s (measured with `bench/engine.py` and getrusage). Raising glibc's mmap and trim thresholds keeps
freed blocks in the heap for reuse instead; the process's peak memory is unchanged (the same blocks are
reused), it just is not returned to the system until exit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks below this size come from the heap and are reused; the engine's largest tensor is ~5 MB. glibc
# before 2.35 refuses thresholds above 32 MiB on 64-bit systems.
_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
_TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024


@functools.cache
def retain_freed_memory() -> bool:
    """Ask glibc to keep freed blocks for reuse; True when the setting took effect.

    Runs once per process (cached), so every entry point of the engine calls it. A no-op returning False
    on platforms without glibc (macOS, Windows, musl), where the allocators behave differently anyway.
    """
    if not sys.platform.startswith("linux"):
        return False
    library = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(library or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Both settings are asked for even if one is refused.
    mmap_set = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    trim_set = bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
    return mmap_set and trim_set
