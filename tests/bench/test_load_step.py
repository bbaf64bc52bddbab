"""bench.load_step: the load step against servers with the latency controller off and on."""

from __future__ import annotations

import json

from bench.load_step import main


def test_a_load_step_runs_both_servers_and_reports_each_phase(tiny_bundle, tmp_path):
    out, picture = tmp_path / "step.json", tmp_path / "step.png"
    # A 1 us target: every request is over it, so the controller climbs to its budget's limit.
    report = main(["--model-dir", str(tiny_bundle["models"]), "--model", "tiny", "--data", str(tiny_bundle["dev"]),
                   "--schedule", "2:1,6:1,2:1", "--target-p99-ms", "0.001", "--max-accuracy-drop", "100",
                   "--threads", "1", "--bin-s", "0.5", "--json", str(out), "--plot", str(picture)])
    assert json.loads(out.read_text())["runs"].keys() == {"controller off", "controller on"}
    assert picture.stat().st_size > 0
    off, on = report["runs"]["controller off"], report["runs"]["controller on"]
    assert [p["clients"] for p in off["phases"]] == [2, 6, 2] and all(p["requests"] > 0 for p in on["phases"])
    from app.controller import threshold_steps
    from app.manifest import read_manifest

    manifest = read_manifest(tiny_bundle["bundle"])
    recommended, steps = manifest.recommended_threshold, threshold_steps(manifest, 100)
    assert all(abs(p["mean_threshold"] - recommended) < 1e-9 for p in off["phases"])  # nobody moves it
    highest = max(b["threshold"] for b in on["timeline"] if b["threshold"] is not None)
    if len(steps) > 1:  # the controller climbed (unless this tiny model's recommendation is its ceiling)
        assert highest > recommended + 1e-6
    else:
        assert abs(highest - recommended) < 1e-9
    assert all(b["errors"] == 0 for b in on["timeline"])
