"""Fixtures of the reliability suite: a real `offramp serve` over the tiny bundle, with an API
key and small limits, so that property-based clients reach the authenticated routes and the
413 paths as well as the ordinary ones."""

from __future__ import annotations

import signal
import subprocess
import threading
from dataclasses import dataclass, field

import pytest

from tests.serving import start_server

API_KEY = "reliability-key"
# Small enough for generated requests to cross them now and then (413), large enough for the
# ordinary ones to pass.
LIMITS = {"max_inputs": 8, "max_text_chars": 2000, "max_body_bytes": 65_536}


@dataclass
class Server:
    url: str
    api_key: str
    limits: dict
    proc: subprocess.Popen
    log_lines: list[str] = field(default_factory=list)

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def log(self, last: int = 200) -> str:
        """The tail of the server's log (tracebacks of unexpected errors land there)."""
        return "".join(self.log_lines[-last:])


def _drain(proc: subprocess.Popen, lines: list[str]) -> None:
    # The log is a pipe: read it all the time, or a chatty server would block once it is full.
    for line in proc.stdout:
        lines.append(line)


@pytest.fixture(scope="session")
def reliability_server(tiny_bundle):
    """A real server over the tiny bundle (model "tiny"), behind the key `API_KEY`; stopped
    with SIGTERM (and drained) at the end of the session."""
    proc, url = start_server(tiny_bundle["models"], api_key=API_KEY, log_level="warning", **LIMITS)
    server = Server(url, API_KEY, dict(LIMITS), proc)
    reader = threading.Thread(target=_drain, args=(proc, server.log_lines), daemon=True)
    reader.start()
    try:
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        reader.join(timeout=5)
        # uvicorn re-raises SIGTERM after draining
        assert code in (0, -signal.SIGTERM), f"exit status {code}\n{server.log()}"
