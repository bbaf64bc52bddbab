"""Calibration rules of a multi-task bundle side by side, on the same weights: for every
classification task, the setting each rule picks from the bundle's own calibration table, and what
it gives on dev (the task's metric, mean exit layer, measured wall-time speed-up).

    python -m bench.multitask_rules runs/bundles/glue-mt --rules risk,tolerance:0.5,tolerance:1 --json F

`risk` is the setting the bundle was exported with when it was calibrated by Learn-then-Test
(training/export_multitask.py CalibrationRule); `tolerance:P` is the fastest setting within P points
on the calibration rows. `dev:P` is the fastest threshold (steps of 0.01) within P points of full
depth on dev itself: not a calibration (it looks at the rows it is scored on) but an upper bound on
what these weights' exits can give at that tolerance. The dev files are the ones the manifest records.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from app.encoding import TextEncoder
from app.manifest import TaskHead, read_manifest
from app.policies import ENTROPY, simulate_exits
from app.uncertainty import softmax
from training.export_multitask import GraphRunner, _inputs, _targets, dev_at_recommended, recommend, task_metrics
from training.multitask_data import TaskFiles, read_part


def best_on_dev(head: TaskHead, runner: GraphRunner, encoder: TextEncoder, part, points: float) -> float:
    """The threshold of fewest mean exit layers whose dev metric is within `points` of full depth."""
    probs = softmax(runner.all_outputs(head.name, encoder, _inputs(part.dev)))
    targets = _targets(part, part.dev)

    def metric(final) -> float:
        return 100 * task_metrics(part.kind, final, targets, part.positive)[head.metric]

    full = metric(probs[-1])
    best, fewest = 0.0, float(probs.shape[0])
    for threshold in np.round(np.arange(0.0, 1.0001, 0.01), 2):
        exit_layer, final = simulate_exits(probs, float(threshold), policy=ENTROPY)
        if metric(final) >= full - points and exit_layer.mean() < fewest:
            best, fewest = float(threshold), float(exit_layer.mean())
    return best


def threshold_for(head: TaskHead, rule: str) -> float:
    if rule == "risk":
        if (head.calibration_rule or {}).get("rule") != "risk":
            raise ValueError(f"task {head.name}: the bundle was not calibrated with the risk rule")
        return head.recommended_threshold
    kind, _, points = rule.partition(":")
    if kind != "tolerance" or not points:
        raise ValueError(f"rule {rule!r}: expected risk, tolerance:POINTS or dev:POINTS")
    return recommend([p for p in head.calibration if p.patience is None], float(points)).threshold


def compare(bundle: Path, rules: list[str], timing_rows: int = 256) -> dict:
    manifest = read_manifest(bundle)
    encoder = TextEncoder.from_file(bundle / "tokenizer.json", manifest.max_seq_length)
    heads = [h for h in manifest.tasks if h.kind == "classification"]
    runner = GraphRunner(bundle, manifest.graphs, [h.name for h in heads])
    result = {}
    for head in heads:
        files = TaskFiles(head.name, Path(head.train.path), Path(head.dev.path))
        part = read_part(files, encoder, calibration_split=0.0, label_names=head.labels)
        rows = {}
        for rule in rules:
            kind, _, points = rule.partition(":")
            threshold = best_on_dev(head, runner, encoder, part, float(points)) if kind == "dev" and points \
                else threshold_for(head, rule)
            at = dev_at_recommended(bundle, manifest, runner, encoder, part,
                                    head.model_copy(update={"recommended_threshold": threshold}), timing_rows)
            rows[rule] = {"threshold": threshold, "metric": head.metric, "value": 100 * at[head.metric],
                          "mean_exit_layer": at["mean_exit_layer"], "measured_speedup": at["measured_speedup"]}
        full = head.dev_results[-1].metrics[head.metric]
        result[head.name] = {"full_depth": 100 * full, "rules": rows}
    return result


def markdown(result: dict) -> str:
    lines = ["| task (metric) | full depth | rule | threshold | dev | change | mean exit layer | speed-up |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, task in result.items():
        for rule, r in task["rules"].items():
            lines.append(f"| {name} ({r['metric']}) | {task['full_depth']:.2f} | {rule} | {r['threshold']:.2f} "
                         f"| {r['value']:.2f} | {r['value'] - task['full_depth']:+.2f} | {r['mean_exit_layer']:.2f} "
                         f"| {r['measured_speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--rules", default="risk,tolerance:0.5,tolerance:1")
    p.add_argument("--timing-rows", type=int, default=256)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = compare(args.bundle, [r.strip() for r in args.rules.split(",") if r.strip()], args.timing_rows)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
