"""The results table of a multi-task run (docs/multitask.md), from what the run recorded.

    python -m bench.multitask_report --bundle runs/bundles/glue-mt --checkpoint runs/glue-mt \\
        [--no-kd-bundle runs/bundles/glue-mt-nokd] [--single-bundle runs/bundles/sst2-minilm-fp32] [--json F]

Per task, GLUE dev: the single-task models (the ensemble members, each fine-tuned alone: their
mean), the ensemble, the multi-task student without distillation (if given), the distilled
student at full depth, and the distilled student with exits at the task's recommended setting
(its score, mean exit layer and wall-time speed-up measured at export); then the five-task
averages of each row's main metrics and the bundle sizes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from app.manifest import read_manifest


def _size(bundle: Path) -> int:
    return sum(f.bytes for f in read_manifest(bundle, verify_files=False).files)


def _main_value(metrics: dict, metric: str) -> float:
    return 100 * metrics[metric]


def report(bundle: Path, checkpoint: Path, no_kd: Path | None = None, single: Path | None = None) -> dict:
    manifest = read_manifest(bundle)
    summary = json.loads((Path(checkpoint) / "summary.json").read_text())
    baseline = read_manifest(no_kd) if no_kd else None
    rows = {}
    for task in manifest.tasks:
        teachers = summary["teachers"].get(task.name)
        metric = task.metric
        row = {"metric": metric,
               "single_task": float(np.mean([_main_value(d, metric) for d in teachers["dev"]])) if teachers else None,
               "single_task_each": [_main_value(d, metric) for d in teachers["dev"]] if teachers else None,
               "ensemble": _main_value(teachers["dev_ensemble"], metric) if teachers else None,
               "student": _main_value(task.dev_results[-1].metrics, metric),
               "student_exits": _main_value(task.dev_at_recommended, metric),
               "recommended_threshold": task.recommended_threshold,
               "recommended_patience": task.recommended_patience,
               "mean_exit_layer": task.dev_at_recommended["mean_exit_layer"],
               "measured_speedup": task.dev_at_recommended["measured_speedup"]}
        if baseline is not None:
            other = next(t for t in baseline.tasks if t.name == task.name)
            row["no_kd_student"] = _main_value(other.dev_results[-1].metrics, metric)
        rows[task.name] = row
    averages = {}
    for key in ("single_task", "ensemble", "no_kd_student", "student", "student_exits"):
        values = [r.get(key) for r in rows.values()]
        if all(v is not None for v in values):
            averages[key] = float(np.mean(values))
    sizes = {"multitask_bytes": _size(bundle)}
    if single:
        sizes["single_task_bytes"] = _size(single)
        sizes["ratio_to_one_single_task"] = sizes["multitask_bytes"] / sizes["single_task_bytes"]
        sizes["ratio_to_all_single_task"] = sizes["multitask_bytes"] / (len(rows) * sizes["single_task_bytes"])
    return {"tasks": rows, "averages": averages, "sizes": sizes, "wall_time_s": summary.get("wall_time_s")}


def markdown(result: dict) -> str:
    tasks = result["tasks"]
    has_no_kd = all("no_kd_student" in r for r in tasks.values())
    names = list(tasks)
    header = "| | " + " | ".join(f"{n} ({tasks[n]['metric']})" for n in names) + " | average |"
    lines = [header, "|---|" + "---:|" * (len(names) + 1)]

    def line(label, key):
        values = [tasks[n].get(key) for n in names]
        average = result["averages"].get(key)
        cells = ["" if v is None else f"{v:.2f}" for v in values]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'' if average is None else f'{average:.2f}'} |")

    line("single-task models (mean of the ensemble's members)", "single_task")
    line("teacher ensemble (averaged probabilities / scores)", "ensemble")
    if has_no_kd:
        line("multi-task student, no distillation", "no_kd_student")
    line("multi-task student, distilled (full depth)", "student")
    line("distilled student with exits (recommended setting)", "student_exits")
    lines.append("| setting (threshold[, patience]) | " + " | ".join(
        f"{tasks[n]['recommended_threshold']:.2f}" + (f", {tasks[n]['recommended_patience']}" if tasks[n]['recommended_patience'] else "")
        for n in names) + " | |")
    lines.append("| mean exit layer | " + " | ".join(f"{tasks[n]['mean_exit_layer']:.2f}" for n in names) + " | |")
    lines.append("| measured speed-up vs full depth | " + " | ".join(f"{tasks[n]['measured_speedup']:.2f}x" for n in names) + " | |")
    sizes = result["sizes"]
    if "single_task_bytes" in sizes:
        lines += ["", f"Bundle size: multi-task {sizes['multitask_bytes'] / 1e6:.1f} MB, one single-task bundle "
                      f"{sizes['single_task_bytes'] / 1e6:.1f} MB ({sizes['ratio_to_one_single_task']:.2f}x one; "
                      f"{sizes['ratio_to_all_single_task']:.2f}x the {len(names)} single-task bundles it replaces)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, required=True, help="the run's checkpoint folder (its summary.json)")
    p.add_argument("--no-kd-bundle", type=Path, help="the same run with --ensemble-size 0")
    p.add_argument("--single-bundle", type=Path, help="a single-task bundle of the same encoder, for the size ratio")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = report(args.bundle, args.checkpoint, args.no_kd_bundle, args.single_bundle)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
