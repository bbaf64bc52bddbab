"""python -m bench.engines: bundles (a cascade among them) side by side, curves in one run."""

from __future__ import annotations

import json

from bench.engines import main


def test_bundles_and_a_cascade_run_side_by_side_at_every_threshold(tiny_bundle, tiny_cascade, tmp_path):
    out = tmp_path / "engines.json"
    report = main([str(tiny_bundle["bundle"]), f"{tiny_cascade}:groups=none", "--data", str(tiny_bundle["dev"]),
                   "--batch-sizes", "8", "--repeats", "1", "--thresholds", "0.5,1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    by_config = {}
    for run in report["runs"]:
        by_config.setdefault(run["config"], {})[run["threshold"]] = run
    single, cascade = by_config[str(tiny_bundle["bundle"])], by_config[f"{tiny_cascade}:groups=none"]
    assert {0.0, 0.5, 1.0} <= set(single) and {0.0, 0.5, 1.0} <= set(cascade)
    assert cascade[1.0]["mean_exit_layer"] == 1.0  # the BiLSTM answers every row
    assert cascade[0.0]["mean_exit_layer"] == 1 + single[0.0]["mean_exit_layer"]
    assert cascade[0.0]["accuracy"] == single[0.0]["accuracy"]  # full depth is the transformer's answer
    assert sum(run["recommended"] for run in cascade.values()) == 1
    assert all(run["rows_per_s"]["8"] > 0 for run in report["runs"])


def test_shuffled_rows_batch_differently_and_score_the_same(tiny_bundle):
    bundle = str(tiny_bundle["bundle"])
    report = main([bundle, f"{bundle}:order=shuffled", "--data", str(tiny_bundle["dev"]), "--batch-sizes", "1,8",
                   "--repeats", "1"])
    file_order, shuffled = ({r["threshold"]: r for r in report["runs"] if r["config"] == c}
                            for c in (bundle, f"{bundle}:order=shuffled"))
    for threshold in file_order:  # every row gets its own answer, whatever its batch (a row within
        # rounding of its threshold may leave a layer apart: tests/app/test_engine_groups.py)
        assert abs(shuffled[threshold]["accuracy"] - file_order[threshold]["accuracy"]) < 0.03
        assert abs(shuffled[threshold]["mean_exit_layer"] - file_order[threshold]["mean_exit_layer"]) < 0.05
