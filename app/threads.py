"""How many CPUs this process may really use: the cgroup quota, not the host's core count
(ONNX Runtime would otherwise size its pool for every core of a large node)."""

from __future__ import annotations

import functools
import math
import os
import threading
from pathlib import Path


def _cgroup_quota(root: Path) -> float | None:
    cpu_max = root / "cpu.max"  # cgroup v2: "max 100000" or "200000 100000"
    if cpu_max.is_file():
        quota, _, period = cpu_max.read_text().strip().partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota_file, period_file = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
    if quota_file.is_file() and period_file.is_file():  # cgroup v1
        quota = int(quota_file.read_text())
        if quota > 0:
            return quota / int(period_file.read_text())
    return None


def cpu_quota(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Whole CPUs available: min(affinity, cgroup quota rounded up), at least 1."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    try:
        quota = _cgroup_quota(cgroup_root)
    except (OSError, ValueError):
        quota = None
    if quota is not None:
        available = min(available, math.ceil(quota))
    return max(1, available)


# Worker threads (engine, tokeniser, loading, large parses) run at a lower priority than the
# event loop's thread, so that on a busy machine the loop (health probes, admission, answers)
# is scheduled first; threads those workers create (ONNX Runtime's and the tokeniser's pools)
# inherit it. Set once by the server (OFFRAMP_WORKER_NICE); 0 leaves priorities alone.
_worker_nice = 0
_lowered = threading.local()


def set_worker_nice(nice: int) -> None:
    global _worker_nice
    _worker_nice = nice


def _at_worker_priority(function):
    def run(*args):
        if _worker_nice and not getattr(_lowered, "done", False):
            _lowered.done = True
            try:  # a thread's own niceness on Linux; raising it needs no privilege
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                               os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + _worker_nice)
            except (AttributeError, OSError):
                pass
        return function(*args)

    return run


async def in_worker(function, *args, limiter=None):
    """function(*args) in a worker thread, at the workers' priority."""
    from anyio import to_thread

    return await to_thread.run_sync(_at_worker_priority(function), *args, limiter=limiter)


M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> None:
    """At most `arenas` glibc malloc arenas. By default glibc gives each thread that allocates
    its own arena (up to 8 a core) and each keeps what its thread freed; with ONNX Runtime,
    tokenizer and HTTP threads all allocating, the server's RSS then grows several-fold. Call
    before threads start; a no-op off glibc."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(M_ARENA_MAX, arenas)


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_free_memory() -> None:
    """Give the pages malloc holds free back to the system (glibc's malloc_trim): RSS then
    follows the memory in use instead of the highest it ever was. A no-op off glibc."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
