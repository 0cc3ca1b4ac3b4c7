"""The process heap (glibc): hand freed memory back to the OS, map big allocations on their own.

Used where a run must stay within a memory bound (streamed quantization, row-chunked table rounding);
on other C libraries both calls do nothing.
"""

from __future__ import annotations

import ctypes
import sys


def _libc():
    return ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; elsewhere nothing). Without
    it, glibc's adaptive mmap threshold puts block-sized tensors on the heap, and RSS grows by tens of
    MB per block; with the trim it stays flat."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


MMAP_THRESHOLD = 1 << 20  # bytes; glibc's M_MMAP_THRESHOLD while streaming


def map_big_allocations() -> None:
    """Have glibc give every allocation of ``MMAP_THRESHOLD`` bytes or more its own mapping, unmapped
    when freed (``mallopt(M_MMAP_THRESHOLD)``; elsewhere nothing). Process-wide, and it ends glibc's
    adaptive threshold, under which a block's freed temporaries stay on the heap and the next phase's
    land beside them, raising peak RSS (at no cost in speed)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
