"""The multi-task results table reads what the run recorded, number for number."""

from __future__ import annotations

import json

import pytest

from app.manifest import read_manifest
from bench.multitask_report import main, report


def test_report_of_the_tiny_run(tiny_multitask_bundle, tiny_bundle, tmp_path, capsys):
    checkpoint = tiny_multitask_bundle.parent.parent / "ckpt"
    result = report(tiny_multitask_bundle, checkpoint, single=tiny_bundle["bundle"])
    manifest = read_manifest(tiny_multitask_bundle)
    summary = json.loads((checkpoint / "summary.json").read_text())
    for task in manifest.tasks:
        row = result["tasks"][task.name]
        assert row["student"] == pytest.approx(100 * task.dev_results[-1].metrics[task.metric])
        assert row["student_exits"] == pytest.approx(100 * task.dev_at_recommended[task.metric])
        assert row["single_task_each"] == pytest.approx([100 * d[task.metric] for d in summary["teachers"][task.name]["dev"]])
        assert row["measured_speedup"] == task.dev_at_recommended["measured_speedup"]
    assert result["averages"]["student"] == pytest.approx(sum(r["student"] for r in result["tasks"].values()) / 3)
    assert result["sizes"]["ratio_to_one_single_task"] > 0
    main(["--bundle", str(tiny_multitask_bundle), "--checkpoint", str(checkpoint), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "| multi-task student, distilled (full depth) |" in out and "sim (pearson)" in out
    assert json.loads((tmp_path / "r.json").read_text())["tasks"].keys() == result["tasks"].keys()


def test_rules_side_by_side_on_the_tiny_bundle(tiny_multitask_bundle, tmp_path, capsys):
    from bench.multitask_rules import compare, main as rules_main

    manifest = read_manifest(tiny_multitask_bundle)
    result = compare(tiny_multitask_bundle, ["risk", "tolerance:0.5", "tolerance:100", "dev:0", "dev:100"],
                     timing_rows=32)
    assert set(result) == {"sent", "pair"}  # classification tasks only
    for name, task in result.items():
        head = next(t for t in manifest.tasks if t.name == name)
        risk = task["rules"]["risk"]
        assert risk["threshold"] == head.recommended_threshold
        # the same setting, the same dev figures the export recorded
        assert risk["value"] == pytest.approx(100 * head.dev_at_recommended[head.metric])
        assert risk["mean_exit_layer"] == pytest.approx(head.dev_at_recommended["mean_exit_layer"])
        # 100 points: anything fits, so the fastest setting of the calibration table
        loose = next(p for p in head.calibration if p.threshold == task["rules"]["tolerance:100"]["threshold"])
        assert loose.mean_exit_layer == min(p.mean_exit_layer for p in head.calibration)
        # on dev itself: 100 points lets every row take the first exit; 0 points loses nothing
        assert task["rules"]["dev:100"]["mean_exit_layer"] == 1.0
        assert task["rules"]["dev:0"]["value"] >= task["full_depth"] - 1e-9
        assert task["rules"]["dev:0"]["mean_exit_layer"] >= task["rules"]["dev:100"]["mean_exit_layer"]
    rules_main([str(tiny_multitask_bundle), "--rules", "risk,tolerance:1", "--timing-rows", "16"])
    assert "| sent (accuracy) |" in capsys.readouterr().out
