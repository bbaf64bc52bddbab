"""`offramp train` as several processes on this CPU (gloo), started the ways users start them:
torchrun, and `accelerate launch --cpu --num_processes 2` (through MPI, as Accelerate starts
CPU processes). One bundle, one log, provenance with world_size 2, and the losses of 2 processes
x batch b track those of 1 process x batch 2b; bf16 autocast on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.tiny import sst2_subset, tiny_teacher

BIN = Path(sys.executable).parent
OFFRAMP = shutil.which("offramp", path=str(BIN)) or shutil.which("offramp")
# Without dropout the two runs differ only by float rounding (batches split differently).
LOSS_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from training.data import read_examples

    root = tmp_path_factory.mktemp("ddp")
    train, dev = sst2_subset(root, train_rows=128, dev_rows=32)
    tiny_teacher(root / "teacher", [e.text for e in read_examples(train).examples], layers=2, hidden=16,
                 dropout=0.0)
    return root


def _run(work: Path, launcher: list[str], command: list[str], name: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    args = [*launcher, *command, "--train", str(work / "train.tsv"), "--dev", str(work / "dev.tsv"),
            "--out", str(work / "models" / name), "--checkpoint", str(work / "runs" / name),
            "--max-seq-length", "32", "--threads", "1", "--log-every", "1", "--dropout", "0", *extra]
    out = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _torchrun(port: int) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port), OFFRAMP]


def _losses(work: Path, name: str) -> list[tuple[str, int, float]]:
    lines = (work / "runs" / name / "train_log.jsonl").read_text().splitlines()
    return [(e["stage"], e["step"], e["loss"]) for e in map(json.loads, lines)]


def _check_one_output(work: Path, name: str, out: subprocess.CompletedProcess, world_size: int) -> dict:
    """Exactly one checkpoint, one bundle, one log, written by one process."""
    assert sorted(p.name for p in (work / "runs").iterdir() if p.name.startswith(name)) == [name]
    assert sorted(p.name for p in (work / "models").iterdir() if name in p.name) == [name]
    assert (out.stdout + out.stderr).count("checkpoint written to") == 1
    assert (out.stdout + out.stderr).count("bundle written to") == 1
    manifest = json.loads((work / "models" / name / "manifest.json").read_text())
    distributed = manifest["provenance"]["distributed"]
    assert distributed["world_size"] == world_size
    meta = json.loads((work / "runs" / name / "early_exit.json").read_text())
    assert meta["distributed"] == distributed
    assert manifest["verification"]["passed"]
    return distributed


FASTBERT = ["train", "fastbert", "--teacher", "teacher", "--epochs", "1", "--distill-epochs", "1", "--lr", "1e-3"]


def _one_process_reference(work: Path) -> list[tuple[str, int, float]]:
    """1 process x batch 16: the run two processes x batch 8 must track (run once a module)."""
    if not (work / "runs" / "one").is_dir():
        _run(work, [OFFRAMP], FASTBERT, "one", "--batch-size", "16", "--device", "cpu")
    return _losses(work, "one")


def _assert_tracks(a, b) -> None:
    assert [(s, n) for s, n, _ in a] == [(s, n) for s, n, _ in b] and len(a) == 16  # 8 steps a stage
    np.testing.assert_allclose([l for *_, l in a], [l for *_, l in b], atol=LOSS_TOLERANCE, rtol=LOSS_TOLERANCE)


def test_two_processes_x_batch_b_track_one_process_x_batch_2b(work):
    two = _run(work, _torchrun(29611), FASTBERT, "two", "--batch-size", "8")
    distributed = _check_one_output(work, "two", two, 2)
    assert distributed["backend"] == "gloo" and distributed["device"] == "cpu"
    _assert_tracks(_losses(work, "two"), _one_process_reference(work))


# Each method's smallest settings (their phases, augmentation and teacher caches all run).
DISTILL = {
    "distilbert": ["--student-layers", "1"],
    "pkd-skip": ["--student-layers", "1"],
    "pkd-last": ["--student-layers", "1"],
    "tinybert": ["--student-layers", "1", "--student-hidden", "8", "--aug-copies", "1", "--general-epochs", "1",
                 "--intermediate-epochs", "1"],
    "mobilebert": ["--student-hidden", "8", "--stage-epochs", "1"],
    "bilstm": ["--embedding-size", "16", "--lstm-size", "8", "--head-width", "8", "--aug-copies", "1"],
}


@pytest.mark.parametrize("method", list(DISTILL))
def test_every_distillation_method_under_two_processes(work, method):
    _one_process_reference(work)
    port = 29620 + list(DISTILL).index(method)
    out = _run(work, _torchrun(port), ["train", "distill", "--method", method, "--teacher", str(work / "runs" / "one"),
                                       "--epochs", "1", "--exit-epochs", "1", "--lr", "1e-3", *DISTILL[method]],
               method, "--batch-size", "8")
    _check_one_output(work, method, out, 2)
    assert out.stdout.count("dev accuracy") == 1


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun (apt-get install openmpi-bin): "
                    "Accelerate starts CPU processes through MPI")
def test_accelerate_launch_cpu_two_processes(work):
    hosts = work / "hostfile"
    hosts.write_text("localhost slots=2\n")
    launcher = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "2", "--mpirun_hostfile",
                str(hosts), "--main_process_port", "29613", OFFRAMP]
    out = _run(work, launcher, FASTBERT, "accel", "--batch-size", "8")
    _check_one_output(work, "accel", out, 2)
    _assert_tracks(_losses(work, "accel"), _one_process_reference(work))


def test_bf16_autocast_on_the_cpu(work):
    out = _run(work, [OFFRAMP], FASTBERT, "bf16", "--batch-size", "16", "--mixed-precision", "bf16",
               "--device", "cpu", "--limit-train", "16")
    distributed = _check_one_output(work, "bf16", out, 1)
    assert distributed["mixed_precision"] == "bf16"
    losses = [l for *_, l in _losses(work, "bf16")]
    assert len(losses) == 2 and all(np.isfinite(losses))
