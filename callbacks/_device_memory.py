"""Device memory as this process sees it: the peak of one measured step, and what is left to use.

:class:`MemoryMeter` is what :func:`~epochwise.callbacks.batch_memory.find_max_batch_size` reads.
On a GPU: the CUDA caching allocator's peak and the device's free memory. On CPU: the host's
memory, through the functions below. On Linux the
peak resident set size (``VmHWM``) can be reset by writing ``5`` to ``/proc/self/clear_refs``, so
each trial step gets its own peak; glibc's ``malloc_trim`` hands freed heap back to the system
first, so memory a larger trial freed (and glibc kept) is not counted against a smaller one.
Elsewhere the peak is the lifetime maximum (``getrusage``): never lower than the truth, so a
search only errs on the small side. Available memory is the smaller of the kernel's
``MemAvailable`` and what the process's cgroup (a container's limit) still allows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import sys
from functools import lru_cache

import torch

__all__ = [
    "MemoryMeter",
    "is_out_of_memory",
    "resident_bytes",
    "peak_resident_bytes",
    "reset_peak_resident",
    "available_bytes",
    "trim_heap",
]


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a device running out of memory: ``torch.OutOfMemoryError``, or the CPU
    allocator's ``RuntimeError`` (on Linux the kernel usually ends the process first)."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(err)
    )


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _lifetime_peak() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def resident_bytes() -> int:
    """The process's resident set size now (its lifetime peak where ``/proc`` is missing)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else _lifetime_peak()


def peak_resident_bytes() -> int:
    """Peak resident set size since the last :func:`reset_peak_resident` (or the process start)."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else _lifetime_peak()


def reset_peak_resident() -> bool:
    """Reset the peak to the current resident size; ``False`` where the system cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_bytes() -> int:
    """Memory this process could still take: ``MemAvailable``, capped by a cgroup limit."""
    available: int | None = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 "no limit" is ~2**63
            available = min(available, max(0, limit - usage))
    return int(available)


@lru_cache(maxsize=1)
def _malloc_trim() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    path = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(path), "malloc_trim", None) if path else None
    except OSError:
        return None


def trim_heap() -> bool:
    """Give freed heap memory back to the system (glibc ``malloc_trim(0)``); ``False`` elsewhere.

    Example:
        >>> isinstance(trim_heap(), bool) and resident_bytes() > 0 and available_bytes() > 0
        True
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)  # type: ignore[operator]
    return True


class MemoryMeter:
    """The peak memory of one measured step on ``device``, and the memory a search may use.

    ``processes``: processes sharing the device's memory (DDP ranks on one CPU host each get
    their share of what is available).

    Example:
        >>> meter = MemoryMeter(torch.device("cpu"))
        >>> meter.start(); x = torch.ones(1 << 20); peak = meter.peak()
        >>> 0 < peak <= meter.capacity() <= meter.total() + resident_bytes()
        True
    """

    def __init__(self, device: torch.device, processes: int = 1) -> None:
        self.device, self.cuda, self.processes = device, device.type == "cuda", processes

    def capacity(self) -> int:
        """Bytes this process may hold at its peak: what it holds now plus what is free."""
        if self.cuda:
            torch.cuda.empty_cache()
            return torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device)
        return resident_bytes() + available_bytes() // self.processes

    def total(self) -> int:
        """The device's whole memory (the card; the host's physical memory)."""
        if self.cuda:
            return int(torch.cuda.get_device_properties(self.device).total_memory)
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))

    def start(self) -> None:
        """Free what can be freed and start a new peak."""
        self.release()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_resident()

    def peak(self) -> int:
        """Peak bytes since :meth:`start` (allocated tensors on a GPU; resident memory on CPU)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_resident_bytes()

    def release(self, collect: bool = False) -> None:
        """Give cached memory back (CUDA cache; glibc heap); ``collect``: run the garbage collector
        first (after an error, whose traceback may hold the failed step's tensors in a cycle)."""
        if collect:
            gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        else:
            trim_heap()
