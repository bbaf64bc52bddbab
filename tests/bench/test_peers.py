"""bench.peers: offramp against the other runtimes, end to end on the session's tiny trained
bundle (conftest.tiny_bundle) and 40 of its dev rows."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.peer_runtimes import PEERS, RANDOM_HEAD
from bench.peers import main as peers_main, run_peers
from bench.report import BenchError
from tests.tiny import write_rows
from training.data import read_examples

REPO = Path(__file__).resolve().parents[2]
PACKAGE = {"torch": "torch", "ort": "onnxruntime", "ort-int8": "onnxruntime",
           "openvino": "openvino", "openvino-int8": "nncf", "ct2-int8": "ctranslate2"}
TOP_FIELDS = {"bundle", "data", "rows", "threads", "batch_sizes", "repeats", "machine", "peer_weights",
              "offramp", "peers", "skipped", "fastest_peer", "recommended_threshold"}


@pytest.fixture(scope="module")
def rows40(tiny_bundle, tmp_path_factory) -> Path:
    examples = read_examples(tiny_bundle["dev"]).examples[:40]
    return write_rows(tmp_path_factory.mktemp("peers") / "dev40.tsv", [(e.text, e.label) for e in examples])


@pytest.fixture(scope="module")
def peers_run(tiny_bundle, rows40, tmp_path_factory):
    """(report, printed table, plot path): every peer, batch sizes 1 and 4, one repeat, through
    `offramp bench --peers`."""
    from app.cli import main

    out = tmp_path_factory.mktemp("peers-out")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["bench", str(tiny_bundle["bundle"]), "--data", str(rows40), "--json", str(out / "peers.json"),
              "--peers", "all", "--batch-sizes", "1,4", "--repeats", "1", "--threads", "1",
              "--thresholds", "0,0.5,1", "--checkpoint", str(tiny_bundle["checkpoint"]),
              "--calibration", str(tiny_bundle["train"]), "--plot", str(out / "peers.png"),
              "--spin-wait", "off"])  # on makes ONNX Runtime's global pool: not in pytest's process
    return json.loads((out / "peers.json").read_text()), printed.getvalue(), out / "peers.png"


def test_every_peer_ran_or_was_skipped_with_a_reason(peers_run):
    report, _, _ = peers_run
    assert TOP_FIELDS <= set(report)
    assert report["rows"] == 40 and report["batch_sizes"] == [1, 4] and report["repeats"] == 1
    for name in PEERS:
        assert (name in report["peers"]) != (name in report["skipped"]), name
        if name in report["skipped"]:
            assert report["skipped"][name].strip()
            continue
        peer = report["peers"][name]
        assert set(peer["rows_per_s"]) == {"1", "4"} and min(peer["rows_per_s"].values()) > 0
        assert {k: len(v) for k, v in peer["pass_seconds"].items()} == {"1": 1, "4": 1}
        assert 0.0 <= peer["accuracy"] <= 1.0 and 0.0 <= peer["agreement_with_offramp_full"] <= 1.0
    # Where the package is installed the peer must really run, not be skipped.
    installed = [n for n in PEERS if importlib.util.find_spec(PACKAGE[n]) is not None]
    assert not set(installed) & set(report["skipped"]), report["skipped"]


def test_fp32_peers_run_the_same_weights_as_offramp(peers_run):
    report, _, _ = peers_run
    assert report["peer_weights"] == "checkpoint"
    full = report["offramp"][0]
    for name in ("torch", "ort", "openvino"):
        peer = report["peers"][name]
        assert peer["agreement_with_offramp_full"] >= 0.9, (name, peer)
        assert abs(peer["accuracy"] - full["accuracy"]) <= 0.1, (name, peer["accuracy"], full["accuracy"])
    details = report["peers"]["openvino"]["details"]  # as a user gets it: the CPU's default
    assert details["inference_precision_hint"] == details["cpu_default_inference_precision_hint"]
    assert report["peers"]["ort"]["details"]["fused_operators"].get("Attention", 0) >= 1


def test_offramp_rows_and_fastest_peer(peers_run):
    report, _, _ = peers_run
    thresholds = [r["threshold"] for r in report["offramp"]]
    assert thresholds == sorted({0.0, 0.5, 1.0, report["recommended_threshold"]})
    by_threshold = {r["threshold"]: r for r in report["offramp"]}
    assert by_threshold[0.0]["mean_exit_layer"] == 3 and by_threshold[1.0]["mean_exit_layer"] == 1
    for size in ("1", "4"):
        rates = {n: p["rows_per_s"][size] for n, p in report["peers"].items()}
        assert report["fastest_peer"][size] == max(rates, key=rates.get)
        row = report["offramp"][0]
        assert row["vs_fastest_peer"][size] == pytest.approx(row["rows_per_s"][size] / max(rates.values()))


def test_table_and_plot(peers_run):
    _, printed, png = peers_run
    assert "x fastest peer b4" in printed and "x torch b1" in printed
    for name in ("offramp t=0.00", *PEERS):
        assert name in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spin_waiting_off_for_every_system(peers_run):
    report, _, _ = peers_run
    spin = report["spin_wait"]
    assert spin["mode"] == "off" and spin["OMP_WAIT_POLICY"] == "PASSIVE"
    assert spin["offramp_shared_pool_threads"] is None
    assert report["peers"]["ort"]["details"]["thread_pool"] == "per session, no spinning"


def test_spin_waiting_on_for_every_system(tiny_bundle, rows40, peers_run, tmp_path):
    """The command's default, --spin-wait on, in a process of its own as it needs: offramp on the shared
    pool, the ort peer on it too, OpenMP's default wait policy; the answers are those of the run without."""
    out = tmp_path / "spin.json"
    subprocess.run([sys.executable, "-m", "bench.peers", str(tiny_bundle["bundle"]), "--data", str(rows40),
                    "--json", str(out), "--peers", "ort,torch", "--batch-sizes", "1,4", "--repeats", "1",
                    "--threads", "1", "--thresholds", "0,0.5,1", "--checkpoint", str(tiny_bundle["checkpoint"])],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    spin = report["spin_wait"]
    assert spin["mode"] == "on" and spin["OMP_WAIT_POLICY"].startswith("unset")
    assert spin["omp_policy_set_before_import"] == {"torch": True, "ctranslate2": True}
    assert spin["offramp_shared_pool_threads"] == 1
    assert report["peers"]["ort"]["details"]["thread_pool"] == "global, spin-waiting"
    without = {r["threshold"]: r for r in peers_run[0]["offramp"]}
    for row in report["offramp"]:
        assert row["accuracy_by_batch_size"] == without[row["threshold"]]["accuracy_by_batch_size"]
        assert row["mean_exit_layer"] == without[row["threshold"]]["mean_exit_layer"]
    for name in ("ort", "torch"):
        assert report["peers"][name]["accuracy"] == peers_run[0]["peers"][name]["accuracy"]


def test_unknown_peer_is_a_bench_error(tiny_bundle, rows40, tmp_path):
    with pytest.raises(BenchError, match=r"tensorrt.*valid: torch, ort, ort-int8, openvino, openvino-int8, ct2-int8"):
        run_peers(tiny_bundle["bundle"], rows40, "torch,tensorrt")
    with pytest.raises(SystemExit, match="python -m bench.peers: error: .*tensorrt"):
        peers_main([str(tiny_bundle["bundle"]), "--data", str(rows40), "--peers", "tensorrt",
                    "--json", str(tmp_path / "x.json")])


def test_missing_package_is_skipped_and_the_rest_runs(tiny_bundle, rows40, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # `import ctranslate2` raises ImportError
    report = run_peers(tiny_bundle["bundle"], rows40, "ct2-int8,ort", checkpoint=tiny_bundle["checkpoint"],
                       batch_sizes=[4], repeats=1, threads=1, thresholds=[0.0], log=lambda m: None)
    assert set(report["peers"]) == {"ort"} and set(report["skipped"]) == {"ct2-int8"}
    assert "ctranslate2" in report["skipped"]["ct2-int8"] and "offramp[bench]" in report["skipped"]["ct2-int8"]


def test_without_checkpoint_peers_get_a_random_head(tiny_bundle, rows40, tmp_path):
    bundle = shutil.copytree(tiny_bundle["bundle"], tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["provenance"]["checkpoint"] = None  # the manifest is not among its own checksummed files
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    messages = []
    report = run_peers(bundle, rows40, "torch", batch_sizes=[4], repeats=1, threads=1,
                       thresholds=[0.0], log=messages.append)
    assert report["peer_weights"] == RANDOM_HEAD and "torch" in report["peers"]
    assert any("random classifier head" in m for m in messages)
    manifest["provenance"]["teacher"] = str(tmp_path / "no-such-teacher")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BenchError, match="no checkpoint for the peers.*pass --checkpoint"):
        run_peers(bundle, rows40, "torch", batch_sizes=[4], repeats=1, threads=1, thresholds=[0.0])


def test_peers_module_imports_without_torch():
    code = "import sys, bench.peers, bench.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
