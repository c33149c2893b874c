"""Process-level tuning for training on CPU: keep glibc from returning big buffers every step."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["tune_malloc", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

# glibc mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # allocations below 32 MiB come from the heap, not fresh mmaps
TRIM_THRESHOLD = 1024 * 1024 * 1024  # keep up to 1 GiB of freed heap instead of trimming it


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds so activations are reused instead of re-faulted.

    With the defaults, glibc serves each large activation with a fresh ``mmap`` and unmaps it
    when freed: every training step then page-faults its activations in again (measured here at
    about 40% of CPU time for a small CNN at batch 64). Equivalent to starting the process with
    ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``. Forked DataLoader
    workers inherit the setting.

    Returns ``True`` if applied, ``False`` on a C library without ``mallopt`` (non-glibc: macOS,
    Windows, musl), where nothing is changed.

    Example:
        >>> isinstance(tune_malloc(), bool)
        True
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    libc = ctypes.CDLL(path)
    if not hasattr(libc, "mallopt"):
        return False
    ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(ok_mmap and ok_trim)
