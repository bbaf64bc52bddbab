"""A bundle's model card (README.md) and calibration plot, written from its manifest and an
`offramp bench` report: every figure in the card is one that was measured."""

from __future__ import annotations

import json
from pathlib import Path

from app.manifest import Manifest, read_manifest

PLOT_NAME = "calibration.png"


def in_sample(manifest: Manifest) -> bool:
    """Whether the calibration was fitted on the dev file (so dev figures at its threshold are in sample)."""
    data, dev = manifest.calibration_data, manifest.provenance.dev
    return data is None or (dev is not None and data.path == dev.path)


def calibration_label(manifest: Manifest) -> str:
    return "dev accuracy" if in_sample(manifest) else "calibration-rows accuracy"


def plot_calibration(manifest: Manifest, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = manifest.calibration
    thresholds = [p.threshold for p in points]
    fig, acc_axis = plt.subplots(figsize=(7, 4), dpi=120)
    label = calibration_label(manifest)
    acc_axis.plot(thresholds, [100 * p.accuracy for p in points], color="tab:blue", label=label)
    acc_axis.set_xlabel("uncertainty threshold")
    acc_axis.set_ylabel(f"{label} (%)", color="tab:blue")
    speed_axis = acc_axis.twinx()
    speed_axis.plot(thresholds, [p.ideal_speedup for p in points], color="tab:orange",
                    linestyle="--", label="ideal speedup (layers / mean exit)")
    timed = [p for p in points if p.measured_speedup is not None]
    speed_axis.plot([p.threshold for p in timed], [p.measured_speedup for p in timed], "o-",
                    color="tab:red", markersize=3, label="measured speedup")
    speed_axis.set_ylabel("speedup over full depth (x)", color="tab:red")
    acc_axis.axvline(manifest.recommended_threshold, color="gray", linestyle=":",
                     label=f"recommended {manifest.recommended_threshold:.2f}")
    lines = acc_axis.get_legend_handles_labels()
    more = speed_axis.get_legend_handles_labels()
    acc_axis.legend(lines[0] + more[0], lines[1] + more[1], loc="lower left", fontsize=8)
    rows = "dev" if in_sample(manifest) else "held-out calibration rows"
    acc_axis.set_title(f"{manifest.name}: accuracy and speed against threshold ({rows})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _teacher_name(teacher: str) -> str:
    """A path inside site-packages is shown from the package on (the rest is this machine's)."""
    return teacher.split("site-packages/", 1)[1] if "site-packages/" in teacher else teacher


def _calibration_rows(manifest: Manifest) -> list[str]:
    rows = [f"| threshold | {calibration_label(manifest)} | mean exit layer | ideal speedup | measured speedup |",
            "|---:|---:|---:|---:|---:|"]
    for p in manifest.calibration:
        if p.measured_speedup is None:
            continue
        mark = " (recommended)" if p.threshold == manifest.recommended_threshold else ""
        rows.append(f"| {p.threshold:.2f}{mark} | {100 * p.accuracy:.2f} | {p.mean_exit_layer:.2f} | "
                    f"{p.ideal_speedup:.2f}x | {p.measured_speedup:.2f}x |")
    return rows


def _bench_rows(report: dict) -> list[str]:
    rows = ["| threshold | accuracy | mean exit | rows/s | speedup_vs_full | ideal_speedup | p50 ms | p95 ms | p99 ms |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lat = r.get("latency_ms") or {}
        rows.append(f"| {r['threshold']:.2f} | {100 * r['accuracy']:.2f} | {r['mean_exit_layer']:.2f} | "
                    f"{r['throughput_rows_per_s']:.0f} | {r['speedup_vs_full']:.2f}x | "
                    f"{r['ideal_speedup']:.2f}x | {lat.get('p50', float('nan')):.2f} | "
                    f"{lat.get('p95', float('nan')):.2f} | {lat.get('p99', float('nan')):.2f} |")
    base = report.get("baseline")
    if base:
        rows.append("")
        rows.append(f"Plain PyTorch/transformers baseline, same model at full depth, same batches "
                    f"({base.get('attn_implementation')} attention, {base['threads']} threads): accuracy "
                    f"{100 * base['accuracy']:.2f}, {base['throughput_rows_per_s']:.0f} rows/s.")
    return rows


def _at_recommended(m: Manifest, report: dict) -> list[str]:
    """The bench's figures at the recommended threshold against full depth, said as what they are."""
    by_threshold = {round(r["threshold"], 4): r for r in report["results"]}
    chosen, full = by_threshold.get(round(m.recommended_threshold, 4)), by_threshold.get(0.0)
    if chosen is None or full is None:
        return []
    kind = "in sample: the threshold was chosen on these rows" if in_sample(m) else \
        "out of sample: the threshold was chosen on other rows"
    return [f"At the recommended threshold {m.recommended_threshold:.2f} ({kind}): accuracy "
            f"{100 * chosen['accuracy']:.2f} against {100 * full['accuracy']:.2f} at full depth "
            f"({100 * (chosen['accuracy'] - full['accuracy']):+.2f} points), {chosen['speedup_vs_full']:.2f}x "
            f"its speed.", ""]


def write_model_card(bundle: Path, bench_json: Path | None = None, notes: Path | None = None) -> Path:
    bundle = Path(bundle)
    m = read_manifest(bundle)
    plot_calibration(m, bundle / PLOT_NAME)
    p = m.provenance
    size = sum(f.bytes for f in m.files)
    lines = [
        f"# {m.name}", "",
        f"Early-exit text classifier: {m.num_layers} layers, an exit after every layer "
        f"({m.exit_head} head), labels {m.labels}, served by `offramp serve`.", "",
        "## Data and teacher",
        f"- Backbone / teacher: `{_teacher_name(p.teacher)}` ({m.num_layers} layers, hidden {m.hidden_size}), "
        "fine-tuned here as the teacher classifier, then its exits self-distilled.",
    ]
    for role in ("train", "dev", "unlabeled"):
        record = getattr(p, role)
        if record:
            lines.append(f"- {role}: `{record.path}` ({record.rows} rows, sha256 `{record.sha256[:16]}...`)")
    lines += ["", "## Recipe", f"- Command: `{p.command}`", f"- Seed {p.seed}; git commit `{p.git_commit}`; "
              f"training wall time {p.wall_time_s:.0f} s on the machine below.",
              "- Settings: " + ", ".join(f"`{k}={v}`" for k, v in p.recipe.items()),
              "- Versions: " + ", ".join(f"{k} {v}" for k, v in p.versions.items()), ""]
    lines += ["## Accuracy per exit (dev, full batch through the ONNX engine)",
              "| layer | " + " | ".join(str(r.layer) for r in m.dev_results) + " |",
              "|---|" + "---:|" * len(m.dev_results),
              "| accuracy | " + " | ".join(f"{100 * r.accuracy:.2f}" for r in m.dev_results) + " |", ""]
    if m.quantization:
        q = m.quantization
        lines += ["## Size and quantisation",
                  f"- {q.method}: {size / 1e6:.1f} MB in all (fp32: {q.source_bytes / 1e6:.1f} MB).",
                  f"- Full-depth dev accuracy: fp32 {100 * q.fp32_dev_accuracy[-1]:.2f}, int8 "
                  f"{100 * q.int8_dev_accuracy[-1]:.2f} ({100 * (q.int8_dev_accuracy[-1] - q.fp32_dev_accuracy[-1]):+.2f} points).", ""]
    if m.verification:
        lines += [f"Export check (fp32 ONNX vs PyTorch, every layer, random and real inputs): max |logit diff| "
                  f"{max(m.verification.max_abs_logit_diff):.2e} (tolerance {m.verification.tolerance:g}).", ""]
    where = "dev, in sample (the dev figures at the recommended threshold are not out-of-sample numbers)"
    if not in_sample(m):
        where = (f"`{m.calibration_data.path}` ({m.calibration_data.rows} rows never trained on; dev is not "
                 "used, so the dev figures are out of sample)")
    lines += ["## Calibration", f"Fitted through the real engine at export on {where}. Recommended threshold "
              f"**{m.recommended_threshold:.2f}**: the largest whose calibration accuracy is within the export's "
              "tolerance of full depth. Requests without a threshold use it.", "",
              f"![accuracy and speedup against threshold]({PLOT_NAME})", "", *_calibration_rows(m), ""]
    if bench_json:
        report = json.loads(Path(bench_json).read_text())
        machine = report.get("machine", {})
        lines += ["## Benchmark", f"`offramp bench` on `{report['data']}` ({report['rows']} rows, batch "
                  f"{report['batch_size']}, {report['threads']} threads, {machine.get('cpu', '')}):", "",
                  *_bench_rows(report), "", *_at_recommended(m, report)]
    lines += ["## Known limits",
              f"- English only; uncased WordPiece vocabulary; inputs longer than {m.max_seq_length} "
              "tokens are truncated (the response says so).",
              "- Trained on movie-review sentences (SST-2): other domains will be less accurate and less "
              "confident, so fewer rows exit early.", ""]
    if notes:
        lines += [Path(notes).read_text()]
    path = bundle / "README.md"
    path.write_text("\n".join(lines))
    return path
