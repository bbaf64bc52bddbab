"""Start a real `offramp serve` process for tests."""

from __future__ import annotations

import subprocess

import pytest

from bench.load import start_server as _start_server


def start_server(models, **settings) -> tuple[subprocess.Popen, str]:
    """`offramp serve` (one intra-op thread unless told) on a free port, once ready; its log
    is readable from proc.stdout."""
    settings.setdefault("intra_op_threads", 1)
    try:
        return _start_server(models, capture_output=True, ready_timeout_s=60, **settings)
    except RuntimeError as exc:
        pytest.fail(str(exc))
