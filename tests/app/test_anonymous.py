"""`offramp serve` refuses an address others can reach without an API key (app.auth.anonymous_exposure),
unless OFFRAMP_ALLOW_ANONYMOUS=true says so on purpose."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.auth import anonymous_exposure
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_offramp_environment(monkeypatch):
    """Only what a test passes counts, not OFFRAMP_* variables of the shell running pytest."""
    for name in list(os.environ):
        if name.startswith("OFFRAMP_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "10.0.0.7", "::", "[::]", "example.org"])
def test_reachable_address_without_a_key_is_refused(host):
    refusal = anonymous_exposure(Settings(host=host))
    assert refusal and "OFFRAMP_API_KEY" in refusal and "OFFRAMP_ALLOW_ANONYMOUS" in refusal
    assert host in refusal and "\n" not in refusal


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_without_a_key_is_allowed(host):
    assert anonymous_exposure(Settings(host=host)) is None


def test_the_default_host_is_loopback_and_allowed():
    assert anonymous_exposure(Settings()) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20"])
def test_a_key_allows_any_address(host):
    assert anonymous_exposure(Settings(host=host, api_key="s3cr3t")) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20"])
def test_allow_anonymous_allows_any_address(host):
    assert anonymous_exposure(Settings(host=host, allow_anonymous=True)) is None


def test_environment_variables_decide(monkeypatch):
    monkeypatch.setenv("OFFRAMP_HOST", "0.0.0.0")
    assert anonymous_exposure(Settings()) is not None
    monkeypatch.setenv("OFFRAMP_ALLOW_ANONYMOUS", "true")
    assert anonymous_exposure(Settings()) is None
    monkeypatch.setenv("OFFRAMP_ALLOW_ANONYMOUS", "false")
    monkeypatch.setenv("OFFRAMP_API_KEY", "s3cr3t")
    assert anonymous_exposure(Settings()) is None


def test_serve_on_every_interface_without_a_key_exits_2_at_once(tmp_path):
    """The real command, as the image and the pods start it (OFFRAMP_HOST=0.0.0.0): it stops
    before loading any model (the model folder does not even exist) or binding the port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFRAMP_")}
    env.update(OFFRAMP_HOST="0.0.0.0", OFFRAMP_PORT="0", OFFRAMP_MODEL_DIR=str(tmp_path / "no-models"))
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got:\n{result.stderr}"
    assert "OFFRAMP_API_KEY" in lines[0] and "0.0.0.0" in lines[0], lines[0]
    assert result.stdout == ""
    assert elapsed < 15, f"took {elapsed:.1f} s to refuse"
