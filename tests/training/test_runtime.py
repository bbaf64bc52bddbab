"""training/runtime.py in one process: how a global batch is shared, resumable state (an
interrupted run resumed ends where the uninterrupted one does), and the refusals of a resume
that would not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.tiny import sst2_subset, tiny_teacher
from training.dataset import Batch
from training.runtime import RunSettings, Runtime


def _batch(rows: int) -> Batch:
    lengths = torch.arange(rows) % 5 + 3
    width = int(lengths.max())
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return Batch(torch.ones(rows, width, dtype=torch.long) * mask, mask, torch.zeros_like(mask),
                 torch.zeros(rows, dtype=torch.long), torch.arange(rows))


class FakeRank(Runtime):
    """A Runtime that believes it is process `rank` of `world`, to test the split alone."""

    def __init__(self, rank: int, world: int, grad_accum: int = 1):
        self.settings = RunSettings(grad_accum=grad_accum)
        self._rank, self._world = rank, world

    rank = property(lambda self: self._rank)
    world_size = property(lambda self: self._world)
    device = property(lambda self: torch.device("cpu"))


@pytest.mark.parametrize("rows,world,accum", [(16, 2, 1), (17, 2, 1), (16, 2, 4), (7, 3, 2), (1, 2, 1), (2, 4, 1)])
def test_every_row_of_a_global_batch_is_trained_once_with_weights_that_give_its_mean(rows, world, accum):
    batch = _batch(rows)
    seen = []
    for rank in range(world):
        for micro, weight in FakeRank(rank, world, accum).share(batch):
            if weight:
                seen += micro.index.tolist()
            assert micro.attention_mask[:, -1].any()  # padded to its own longest row, no further
    assert sorted(seen) == list(range(rows))
    # The exact property: a loss that is the mean of a per-row value gives the global mean.
    values = torch.randn(rows, dtype=torch.float64)
    combined = sum(weight * values[micro.index].mean().item() / world
                   for rank in range(world) for micro, weight in FakeRank(rank, world, accum).share(batch))
    assert combined == pytest.approx(values.mean().item(), abs=1e-12)


def test_a_process_left_without_rows_still_takes_part_at_weight_zero():
    parts = FakeRank(0, 4).share(_batch(2))  # rows go to ranks 1 and 3
    assert len(parts) == 1 and parts[0][1] == 0.0 and len(parts[0][0].index) == 1


@pytest.fixture(scope="module")
def data_and_teacher(tmp_path_factory):
    from training.data import read_examples

    work = tmp_path_factory.mktemp("resume")
    train, dev = sst2_subset(work, train_rows=96, dev_rows=32)
    teacher = tiny_teacher(work / "teacher", [e.text for e in read_examples(train).examples], layers=2, hidden=16)
    return work, train, dev, teacher


def _command(work, train, dev, teacher, name, *extra):
    return ["train", "fastbert", "--teacher", str(teacher), "--train", str(train), "--dev", str(dev),
            "--out", str(work / "models" / name), "--checkpoint", str(work / "runs" / name),
            "--epochs", "1", "--distill-epochs", "1", "--batch-size", "8", "--max-seq-length", "32",
            "--lr", "1e-3", "--threads", "1", "--log-every", "1", "--device", "cpu", *extra]


def _weights(folder):
    from training.model import EarlyExitModel

    model, _ = EarlyExitModel.load(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(data_and_teacher):
    from app.cli import main

    work, train, dev, teacher = data_and_teacher
    main(_command(work, train, dev, teacher, "whole"))
    return work / "runs" / "whole"


# 96 rows in batches of 8: 12 steps a phase. Interrupted in phase 1 (step 8, last state at 6) and
# in phase 2 (run step 19, state at 18: phase 1 is skipped on resumption, phase 2 resumes at 6).
@pytest.mark.parametrize("stop_at", [8, 19])
def test_an_interrupted_run_resumed_ends_where_the_uninterrupted_one_does(data_and_teacher, uninterrupted,
                                                                          monkeypatch, capsys, stop_at):
    import training.loop as loop
    from app.cli import main

    work, train, dev, teacher = data_and_teacher
    name = f"cut{stop_at}"
    state = work / "states" / name
    real_step, calls = loop._step, []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_step", interrupt)
    with pytest.raises(SystemExit) as stopped:
        main(_command(work, train, dev, teacher, name, "--save-every", "6", "--state-dir", str(state)))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"--resume {state}" in err and "offramp: error: interrupted" in err
    assert not (work / "runs" / name).exists() and not (work / "models" / name).exists()
    saved = json.loads((state / "offramp_state.json").read_text())
    assert saved["global_step"] == (stop_at - 1) // 6 * 6
    monkeypatch.setattr(loop, "_step", real_step)

    main(_command(work, train, dev, teacher, name, "--resume", str(state)))
    resumed, whole = _weights(work / "runs" / name), _weights(uninterrupted)
    assert resumed.keys() == whole.keys()
    worst = max((resumed[k] - whole[k]).abs().max().item() for k in whole)
    assert worst < 1e-6, f"resumed weights differ from the uninterrupted run's by {worst}"
    # The loss log reads as one run's: the same steps, the same losses.
    logs = [[json.loads(line) for line in (work / "runs" / n / "train_log.jsonl").read_text().splitlines()]
            for n in (name, "whole")]
    assert [(e["stage"], e["step"]) for e in logs[0]] == [(e["stage"], e["step"]) for e in logs[1]]
    np.testing.assert_allclose([e["loss"] for e in logs[0]], [e["loss"] for e in logs[1]], atol=1e-6)
    assert not state.exists()  # the finished run removed its state
    manifest = json.loads((work / "models" / name / "manifest.json").read_text())
    assert manifest["provenance"]["distributed"]["resumed_from_step"] == saved["global_step"]


def test_a_resume_with_other_settings_is_refused_naming_them(data_and_teacher, monkeypatch, capsys):
    import training.loop as loop
    from app.cli import main

    work, train, dev, teacher = data_and_teacher
    state = work / "states" / "changed"
    real_step, calls = loop._step, []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_step", interrupt)
    with pytest.raises(SystemExit):
        main(_command(work, train, dev, teacher, "changed", "--save-every", "2", "--state-dir", str(state)))
    monkeypatch.setattr(loop, "_step", real_step)
    capsys.readouterr()
    for extra, expected in ((["--lr", "5e-4"], "recipe"), (["--grad-accum", "2"], "grad_accum")):
        with pytest.raises(SystemExit) as refused:
            main(_command(work, train, dev, teacher, "changed", "--resume", str(state), *extra))
        assert refused.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"offramp: error: --resume {state}: the saved run had other settings") and expected in err
    with pytest.raises(SystemExit):
        main(_command(work, train, dev, teacher, "changed", "--resume", str(work)))
    assert "no offramp_state.json there" in capsys.readouterr().err


def test_a_device_that_is_not_here_is_one_line(data_and_teacher, capsys):
    from app.cli import main

    work, train, dev, teacher = data_and_teacher
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as refused:
        main(_command(work, train, dev, teacher, "nocuda")[:-2] + ["--device", "cuda"])
    assert refused.value.code == 2
    assert "offramp: error: --device cuda: no CUDA device is visible" in capsys.readouterr().err
    assert not (work / "runs" / "nocuda").exists()


def test_sigterm_stops_a_run_cleanly_and_says_how_to_resume(data_and_teacher):
    """What Kubernetes does to an evicted pod: the run stops with its last state kept, no
    half-written checkpoint or bundle, and a line saying how to resume."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    work, train, dev, teacher = data_and_teacher
    state = work / "states" / "term"
    args = _command(work, train, dev, teacher, "term", "--save-every", "5", "--state-dir", str(state))
    args[args.index("--epochs") + 1] = "200"  # long enough to be stopped half-way
    offramp = Path(sys.executable).parent / "offramp"
    run = subprocess.Popen([str(offramp), *args], stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (state / "offramp_state.json").is_file():
        assert run.poll() is None, run.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no resumable state within 2 minutes"
        time.sleep(0.1)
    run.send_signal(signal.SIGTERM)
    err = run.communicate(timeout=60)[1]
    assert run.returncode == 2, err[-2000:]
    assert "offramp: error: interrupted at run step" in err and f"--resume {state}" in err
    assert json.loads((state / "offramp_state.json").read_text())["global_step"] % 5 == 0
    leftovers = [p.name for p in (work / "runs").iterdir() if "term" in p.name]
    assert leftovers == [] and not (work / "models" / "term").exists()


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_an_accelerate_config_asking_for_sharding_is_refused(monkeypatch, kind):
    import accelerate
    from accelerate.utils import DistributedType

    from training.errors import CommandError

    class Sharded:  # what Accelerate would be under `accelerate launch --config_file fsdp.yaml`
        def __init__(self, **kwargs):
            self.distributed_type = getattr(DistributedType, kind)
            self.device = torch.device("cpu")

    monkeypatch.setattr(accelerate, "Accelerator", Sharded)
    with pytest.raises(CommandError, match=f"asks for {kind}: offramp trains data-parallel"):
        Runtime(RunSettings())
