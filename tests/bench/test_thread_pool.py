"""The shared thread pool: the same answers as a pool per session, and the A/B bench runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from bench.thread_pool import main

ANSWERS = """
import json, sys
from app.backends import shared_thread_pool, use_shared_thread_pool
if sys.argv[2] == "shared":
    use_shared_thread_pool(2)
from app.registry import load_model
model = load_model(sys.argv[1])
texts = ["a fine film", "dull", "not good at all , and far too long for what it says"]
batch = model.engine.run(model.encoder.encode(texts), 0.0)
alone = [model.engine.run(model.encoder.encode([t]), 0.0).probabilities[0].tolist() for t in texts]
print(json.dumps({"pool": shared_thread_pool(), "batch": batch.probabilities.tolist(), "alone": alone}))
"""


def _answers(bundle, mode):
    out = subprocess.run([sys.executable, "-c", ANSWERS, str(bundle), mode], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_shared_pool_gives_every_row_the_answer_of_a_pool_per_session(tiny_bundle):
    bundle = tiny_bundle["bundle"]
    per_session, shared = _answers(bundle, "per-session"), _answers(bundle, "shared")
    assert per_session["pool"] is None and shared["pool"] == 2
    for run in (per_session, shared):
        np.testing.assert_allclose(run["alone"], run["batch"], atol=1e-5)
    np.testing.assert_allclose(shared["batch"], per_session["batch"], atol=1e-5)


def test_thread_pool_bench_runs_both_settings(tiny_bundle, tmp_path):
    report = main([str(tiny_bundle["bundle"]), "--data", str(tiny_bundle["dev"]), "--batch-sizes", "4",
                   "--pairs", "1", "--json", str(tmp_path / "pool.json")])
    assert set(report["pairs"][0]) == {"per_session", "shared"}
    assert all(v["ratio"] > 0 for v in report["summary"].values())
    assert json.loads((tmp_path / "pool.json").read_text())["summary"] == report["summary"]
