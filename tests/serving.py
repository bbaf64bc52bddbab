"""Start and stop a real `offramp serve` process for tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models, **env) -> tuple[subprocess.Popen, str]:
    """`offramp serve` on a free port, once /health/ready answers 200."""
    port = free_port()
    environ = {**os.environ, "OFFRAMP_MODEL_DIR": str(models), "OFFRAMP_INTRA_OP_THREADS": "1",
               **{f"OFFRAMP_{k.upper()}": str(v) for k, v in env.items()}}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            pytest.fail("server exited:\n" + proc.stdout.read())
        time.sleep(0.2)
    proc.kill()
    pytest.fail("server not ready within 60 s")
