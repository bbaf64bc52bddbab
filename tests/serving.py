"""Start a real `offramp serve` process for tests."""

from __future__ import annotations

import subprocess
import time

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


def slow_engines(client, seconds: float) -> None:
    """Make every engine of an in-process app (a TestClient's) take at least `seconds` a batch."""
    for model in client.app.state.registry.all_loaded():
        run = model.engine.run

        def slow(*args, _run=run, **kw):
            time.sleep(seconds)
            return _run(*args, **kw)

        model.engine.run = slow
