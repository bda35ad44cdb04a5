"""Process-wide allocator tuning that entry points opt into; the library itself never calls it."""

from __future__ import annotations

import ctypes
import functools
import os


@functools.cache
def reuse_freed_memory() -> None:
    """Keep freed activation memory in the process instead of handing it back to the OS after every batch.

    glibc serves large blocks with mmap and unmaps them on free, so each CPU forward page-faults its activations
    in again (zeroed by the kernel): half the CPU time went to the kernel at batch 64. Raising the mmap and trim
    thresholds once makes the allocator reuse those pages; peak memory is unchanged. It is process-wide, so the
    entry points (CLI, app, server, benchmarks) opt in; importing the library never calls it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 31)


def physical_memory() -> int:
    """Bytes of RAM on this machine: what "auto" choices about holding data in memory are sized against."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
