"""`offramp bench`: the report's fields and its numbers, checked against an independent
computation on a tiny bundle trained and exported in the fixture (a few seconds)."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.encoding import TextEncoder
from app.engine import Engine
from app.manifest import read_manifest
from app.policies import simulate_exits
from app.uncertainty import normalized_entropy
from bench.report import (
    BenchError,
    format_table,
    label_ids,
    parse_thresholds,
    run_bench,
    write_json,
)
from app.calibration import layer_probabilities, make_batches
from tests.tiny import SST2, sst2_subset, tiny_teacher, write_rows
from training.data import read_examples

REPO = Path(__file__).resolve().parents[2]
LABEL_NAMES = ["negative", "positive"]
TOP_FIELDS = {"bundle", "data", "rows", "batch_size", "threads", "num_layers", "machine",
              "results", "baseline", "recommended_threshold", "reference"}
ROW_FIELDS = {"threshold", "accuracy", "mean_exit_layer", "exit_histogram",
              "throughput_rows_per_s", "speedup_vs_full", "ideal_speedup", "latency_ms"}


# -- label mapping and threshold parsing (no model) ---------------------------------------------

class _Labels:
    """Just the manifest's label mapping (app.manifest.Manifest.label_ids)."""

    def __init__(self, labels, source_labels=None):
        from app.manifest import Manifest

        self.labels, self.source_labels = labels, source_labels
        self.label_ids = lambda raw: Manifest.label_ids(self, raw)


def test_label_ids_served_names_and_source_labels():
    renamed = _Labels(LABEL_NAMES, ["0", "1"])
    assert label_ids(["positive", "negative", "positive"], renamed).tolist() == [1, 0, 1]
    # Trained with --label-names negative,positive over "0"/"1": "0" -> negative.
    assert label_ids(["1", "0", "0"], renamed).tolist() == [1, 0, 0]
    assert label_ids(["10", "2"], _Labels(["low", "high"], ["2", "10"])).tolist() == [1, 0]


def test_label_ids_unmappable():
    with pytest.raises(BenchError, match="cannot map.*'maybe'"):
        label_ids(["maybe", "0"], _Labels(LABEL_NAMES, ["0", "1"]))
    with pytest.raises(BenchError, match="cannot map"):
        label_ids(["0"], _Labels(LABEL_NAMES))


def test_parse_thresholds():
    assert parse_thresholds("0,0.25,...,1") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_thresholds("0.5, 0.1,0.5") == [0.1, 0.5]
    assert len(parse_thresholds("0,0.05,...,1")) == 21
    for bad in ("0,1.5", "a,b", "0,...,1", ""):
        with pytest.raises(BenchError):
            parse_thresholds(bad)


def test_bench_modules_import_without_torch():
    code = "import sys, bench.report, bench.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# -- a tiny trained bundle ----------------------------------------------------------------------

def _data(directory: Path) -> tuple[Path, Path]:
    if (SST2 / "train.tsv").is_file():
        return sst2_subset(directory, train_rows=120, dev_rows=48)
    rng = random.Random(0)
    good, bad = ["good", "great", "fine", "lovely"], ["bad", "awful", "dull", "poor"]
    rows = [(f"a {rng.choice(bad if y else good)} {rng.choice(['film', 'movie', 'story'])}", str(1 - y))
            for y in (rng.randint(0, 1) for _ in range(168))]
    return (write_rows(directory / "train.tsv", rows[:120]),
            write_rows(directory / "dev.tsv", rows[120:]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(bundle dir, checkpoint dir, dev file) of a 3-layer model served as negative/positive."""
    import torch

    from training.cli import register

    work = tmp_path_factory.mktemp("bench")
    train, dev = _data(work)
    teacher = tiny_teacher(work / "teacher", [e.text for e in read_examples(train).examples])
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args([
        "train", "fastbert", "--teacher", str(teacher), "--train", str(train), "--dev", str(dev),
        "--out", str(work / "bundle"), "--checkpoint", str(work / "ckpt"),
        "--label-names", ",".join(LABEL_NAMES), "--epochs", "1", "--distill-epochs", "1",
        "--max-seq-length", "32", "--threads", "1",
    ])
    threads = torch.get_num_threads()
    try:
        args.func(args)
    finally:
        torch.set_num_threads(threads)
    return work / "bundle", work / "ckpt", dev


def _independent(bundle: Path, dev: Path, batch_size: int):
    """Every layer's probabilities and the file's labels, without bench.report."""
    manifest = read_manifest(bundle)
    engine = Engine(bundle, manifest, intra_op_threads=1)
    encoder = TextEncoder.from_file(bundle / manifest.tokenizer, manifest.max_seq_length)
    examples = read_examples(dev).examples
    probs = layer_probabilities(engine, make_batches(encoder, [e.text for e in examples], batch_size))
    return probs, np.array([int(e.label) for e in examples])  # "0" -> negative, "1" -> positive


def _mixed_threshold(layer_probs: np.ndarray) -> float:
    """A threshold that sends some rows out at layer 1 and keeps others, well away from any
    row's uncertainty (so float noise cannot move a row across it)."""
    u = np.sort(normalized_entropy(layer_probs[0]))
    lo, hi = len(u) // 4, 3 * len(u) // 4
    k = lo + int(np.argmax(np.diff(u[lo:hi + 1])))
    return float((u[k] + u[k + 1]) / 2)


@pytest.fixture(scope="module")
def report(tiny):
    bundle, _, dev = tiny
    probs, _ = _independent(bundle, dev, batch_size=16)
    mixed = _mixed_threshold(probs)
    # Threshold 0 is deliberately not listed: the bench must add it.
    return run_bench(bundle, dev, thresholds=[mixed, 1.0], batch_size=16, repeats=1,
                     latency_rows=5, threads=1, baseline="pytorch"), mixed


def test_report_has_every_field(report, tmp_path):
    data, _ = report
    loaded = json.loads(write_json(data, tmp_path / "out" / "bench.json").read_text())
    assert TOP_FIELDS <= set(loaded)
    assert {"cpu", "cores"} <= set(loaded["machine"])
    assert loaded["rows"] == 48 and loaded["batch_size"] == 16 and loaded["threads"] == 1
    assert loaded["num_layers"] == 3
    for row in loaded["results"]:
        assert ROW_FIELDS <= set(row)
        assert set(row["latency_ms"]) == {"p50", "p95", "p99"}
        assert row["latency_ms"]["p50"] <= row["latency_ms"]["p95"] <= row["latency_ms"]["p99"]
        assert len(row["exit_histogram"]) == 3 and sum(row["exit_histogram"]) == 48
        assert row["throughput_rows_per_s"] > 0
    assert {"accuracy", "throughput_rows_per_s", "onnx_full_vs_pytorch"} <= set(loaded["baseline"])
    assert loaded["recommended_threshold"] == read_manifest(Path(loaded["bundle"])).recommended_threshold


def test_threshold_zero_is_measured_and_is_the_reference(report):
    data, mixed = report
    assert [r["threshold"] for r in data["results"]] == [0.0, mixed, 1.0]
    full = data["results"][0]
    assert full["speedup_vs_full"] == 1.0
    assert full["mean_exit_layer"] == 3 and full["exit_histogram"] == [0, 0, 48]
    for row in data["results"]:
        assert row["speedup_vs_full"] == pytest.approx(
            row["throughput_rows_per_s"] / full["throughput_rows_per_s"])
        assert row["ideal_speedup"] == pytest.approx(3 / row["mean_exit_layer"])


def test_threshold_one_exits_at_the_first_layer(report):
    last = report[0]["results"][-1]
    assert last["threshold"] == 1.0
    assert last["mean_exit_layer"] == 1.0 and last["exit_histogram"] == [48, 0, 0]
    assert last["ideal_speedup"] == 3.0


def test_accuracy_matches_simulated_exits(report, tiny):
    data, _ = report
    bundle, _, dev = tiny
    probs, labels = _independent(bundle, dev, batch_size=16)
    for row in data["results"]:
        exit_layer, final = simulate_exits(probs, row["threshold"])
        assert row["accuracy"] == pytest.approx(float((final.argmax(1) == labels).mean()))
        assert row["mean_exit_layer"] == pytest.approx(float(exit_layer.mean()))
        assert row["exit_histogram"] == np.bincount(exit_layer - 1, minlength=3).tolist()
    mixed = data["results"][1]["exit_histogram"]
    assert mixed[0] > 0 and mixed[2] > 0  # the mixed threshold really splits the rows


def test_pytorch_baseline_is_the_same_model(report):
    data, _ = report
    base, full = data["baseline"], data["results"][0]
    assert abs(base["accuracy"] - full["accuracy"]) * data["rows"] <= 1
    assert base["agreement_with_onnx_full"] >= 1 - 1 / data["rows"]
    assert base["onnx_full_vs_pytorch"] == pytest.approx(
        full["throughput_rows_per_s"] / base["throughput_rows_per_s"])


def test_reference_bundle_is_measured_at_full_depth_in_the_same_run(tiny):
    bundle, _, dev = tiny
    data = run_bench(bundle, dev, thresholds=[1.0], batch_size=16, repeats=1, latency_rows=0,
                     threads=1, reference=bundle)
    ref, full = data["reference"], data["results"][0]
    assert ref["bundle"] == str(bundle) and ref["num_layers"] == 3
    assert ref["accuracy"] == full["accuracy"]  # the same model on the same rows
    for row in data["results"]:
        assert row["speedup_vs_reference"] == pytest.approx(
            row["throughput_rows_per_s"] / ref["throughput_rows_per_s"])
    assert "vs reference" in format_table(data) and "reference " in format_table(data)


def test_missing_checkpoint_is_a_clear_error_before_measuring(tiny, tmp_path):
    bundle, _, dev = tiny
    with pytest.raises(BenchError, match="checkpoint .* not found"):
        run_bench(bundle, dev, baseline="pytorch", checkpoint=tmp_path / "nowhere")


def test_cli_prints_the_table_and_writes_json(tiny, tmp_path, capsys):
    from bench.cli import register

    bundle, _, dev = tiny
    parser = argparse.ArgumentParser(prog="offramp")
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "bench.json"
    args = parser.parse_args(["bench", str(bundle), "--data", str(dev), "--thresholds", "0.5,1",
                              "--batch-size", "8", "--repeats", "1", "--latency-rows", "3",
                              "--threads", "1", "--json", str(out)])
    args.func(args)
    printed = capsys.readouterr().out
    assert "speedup_vs_full" in printed and "p99" in printed
    assert [r["threshold"] for r in json.loads(out.read_text())["results"]] == [0.0, 0.5, 1.0]
    assert json.loads(out.read_text())["baseline"] is None
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", str(bundle), "--data", str(dev), "--thresholds", "2",
                           "--json", str(out)])


def test_format_table_lists_every_threshold(report):
    table = format_table(report[0])
    assert table.count("\n") >= 5
    assert "pytorch baseline" in table and "onnx" in table.lower()


@pytest.mark.parametrize("policy", ["patience", "max_prob"])
def test_any_policy_is_swept_through_the_engine(tiny, policy):
    from app.policies import policy_code

    bundle, _, dev = tiny
    manifest = read_manifest(bundle)
    report = run_bench(bundle, dev, thresholds=[0.3, 0.9], batch_size=16, repeats=1, latency_rows=2,
                       threads=1, policy=policy)
    assert report["policy"] == policy
    full, *rows = report["results"]
    assert full["threshold"] == 0.0 and full["policy"] == "entropy" and full["speedup_vs_full"] == 1.0
    probs, labels = _independent(bundle, dev, batch_size=16)
    for row in rows:
        assert row["policy"] == policy
        exit_layer, final = simulate_exits(probs, row["threshold"] or 0.0, policy=policy_code(policy, row["threshold"]),
                                           patience=row["patience"] or 0, temperatures=manifest.exit_temperatures)
        assert row["mean_exit_layer"] == pytest.approx(exit_layer.mean())
        assert row["accuracy"] == pytest.approx((final.argmax(1) == labels).mean())
    if policy == "patience":
        assert [r["patience"] for r in rows] == list(range(1, manifest.num_layers)) and \
            all(r["threshold"] is None for r in rows)
        assert "patience" in format_table(report).splitlines()[1]
    else:
        assert {0.3, 0.9} <= {r["threshold"] for r in rows}
