"""How many CPUs this process may really use: the cgroup quota, not the host's core count
(ONNX Runtime would otherwise size its pool for every core of a large node)."""

from __future__ import annotations

import math
import os
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
