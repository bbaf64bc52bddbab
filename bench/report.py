"""`offramp bench`: one run that measures a bundle at every threshold, on one labelled file.

For each threshold: accuracy, mean exit layer and its histogram, throughput (all rows through
`Engine.run` in fixed batches, best of N wall times), single-row latency percentiles (tokenisation
included), measured speed-up against threshold 0 from the same run, and the ideal speed-up
(num_layers / mean exit layer). Optionally the same model at full depth under plain
PyTorch/transformers, as a baseline for the ONNX engine itself.

JSON layout (see `run_bench`):
    {"bundle", "data", "rows", "batch_size", "threads", "num_layers", "machine": {...},
     "results": [{"threshold", "accuracy", "mean_exit_layer",
                  "exit_histogram": [rows leaving at layer 1, ..., at layer num_layers],
                  "throughput_rows_per_s", "speedup_vs_full", "ideal_speedup",
                  "latency_ms": {"p50", "p95", "p99"} or null}],
     "baseline": {...} or null, "recommended_threshold",
     "reference": {"bundle", "num_layers", "accuracy", "throughput_rows_per_s"} or null}
With a reference bundle (e.g. the teacher a student was distilled from), that bundle is measured
at full depth on the same rows, batch size and threads in the same run, and every row gains
"speedup_vs_reference" (its throughput over the reference's).

This module imports without torch; only the PyTorch baseline imports it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from app.bundle import open_encoder, open_engine
from app.encoding import TextEncoder
from app.engine import Engine
from app.manifest import Manifest, read_manifest
from app.policies import policy_code
from app.threads import cpu_quota
from app.calibration import fine_grid, make_batches, timed_run
from training import labelled

DEFAULT_THRESHOLDS = fine_grid(0.05)


class BenchError(ValueError):
    """The benchmark cannot run with these inputs; the message says why."""


# -- inputs -------------------------------------------------------------------------------------

def parse_thresholds(spec: str) -> list[float]:
    """"0,0.1,0.5" -> [0.0, 0.1, 0.5]; "0,0.05,...,1" -> 0 to 1 in steps of 0.05."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    try:
        if "..." in parts:
            if len(parts) != 4 or parts[2] != "...":
                raise BenchError(f"--thresholds {spec!r}: a range is written START,NEXT,...,END")
            start, following, end = float(parts[0]), float(parts[1]), float(parts[3])
            step = following - start
            if step <= 0 or end < start:
                raise BenchError(f"--thresholds {spec!r}: the range must increase")
            count = int(round((end - start) / step))
            values = [round(start + i * step, 6) for i in range(count + 1)]
        else:
            values = [float(p) for p in parts]
    except ValueError as exc:
        if isinstance(exc, BenchError):
            raise
        raise BenchError(f"--thresholds {spec!r}: not a comma-separated list of numbers") from exc
    if not values:
        raise BenchError("--thresholds: no thresholds given")
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise BenchError(f"--thresholds: {bad} outside [0, 1]")
    return sorted(set(values))


def label_ids(file_labels: Sequence[str], manifest: Manifest) -> np.ndarray:
    try:
        return labelled.label_ids(file_labels, manifest)
    except labelled.LabelError as exc:
        raise BenchError(str(exc)) from exc


def load_data(path: Path, manifest: Manifest, text_columns: Sequence[str] | None = None,
              label_column: str | None = None) -> tuple[list, np.ndarray]:
    """`training.labelled.load_data`, with a file that does not fit the bundle as a BenchError."""
    try:
        return labelled.load_data(path, manifest, text_columns, label_column)
    except labelled.LabelError as exc:
        raise BenchError(str(exc)) from exc


# -- measurements -------------------------------------------------------------------------------

def percentiles_ms(seconds: Sequence[float]) -> dict[str, float] | None:
    if len(seconds) == 0:
        return None
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


def measure_latency(engine: Engine, encoder: TextEncoder, inputs: Sequence, threshold: float,
                    rows: int, policy: int = 0, patience: int = 0) -> dict[str, float] | None:
    """p50/p95/p99 of one row at a time, tokenisation included, over the first `rows` inputs."""
    times = []
    for item in inputs[:rows]:
        start = time.perf_counter()
        engine.run(encoder.encode([item]), threshold, policy=policy, patience=patience)
        times.append(time.perf_counter() - start)
    return percentiles_ms(times)


def measure_threshold(engine: Engine, encoder: TextEncoder, batches, inputs: Sequence,
                      labels: np.ndarray, threshold: float | None, repeats: int = 2,
                      latency_rows: int = 200, policy: str = "entropy", patience: int | None = None) -> dict:
    """One row of the report (speedup_vs_full is filled in by `sweep`)."""
    code = policy_code(policy, threshold)
    result, seconds = timed_run(engine, batches, threshold or 0.0, repeats, code, patience or 0)
    exit_layer = result.exit_layer
    mean_exit = float(exit_layer.mean())
    histogram = np.bincount(exit_layer - 1, minlength=engine.num_layers)
    return {
        "threshold": None if threshold is None else float(threshold),
        "policy": policy,
        "patience": patience,
        "accuracy": float((result.probabilities.argmax(axis=1) == labels).mean()),
        "mean_exit_layer": mean_exit,
        "exit_histogram": [int(n) for n in histogram],
        "throughput_rows_per_s": len(labels) / seconds,
        "speedup_vs_full": None,
        "ideal_speedup": engine.num_layers / mean_exit,
        "latency_ms": measure_latency(engine, encoder, inputs, threshold or 0.0, latency_rows, code, patience or 0),
        "_predictions": result.probabilities.argmax(axis=1),
    }


def warm_up(engine: Engine, encoder: TextEncoder, batches, inputs: Sequence) -> None:
    """First runs allocate ONNX Runtime's buffers and thread pool; keep them out of the timings."""
    engine.run(batches[0], 0.0)
    for item in inputs[:5]:
        engine.run(encoder.encode([item]), 0.0)


def sweep(engine: Engine, encoder: TextEncoder, inputs: Sequence, labels: np.ndarray,
          thresholds: Sequence[float], batch_size: int = 32, repeats: int = 2,
          latency_rows: int = 200, progress: Callable | None = None, policy: str = "entropy",
          patiences: Sequence[int] = ()) -> list[dict]:
    """Report rows for full depth (threshold 0, always first) and every given threshold of the
    policy, sorted; for the patience policy, every given patience instead."""
    if len(inputs) != len(labels) or not inputs:
        raise BenchError("no rows to measure")
    batches = make_batches(encoder, inputs, batch_size)
    warm_up(engine, encoder, batches, inputs)
    if policy == "patience":
        settings = [(0.0, "entropy", None), *((None, "patience", p) for p in sorted(set(patiences)))]
    else:
        settings = [(0.0, "entropy", None),
                    *((t, policy, None) for t in sorted(set(float(t) for t in thresholds) - {0.0}))]
    rows = []
    for threshold, name, patience in (progress(settings) if progress else settings):
        rows.append(measure_threshold(engine, encoder, batches, inputs, labels, threshold,
                                      repeats, latency_rows, name, patience))
    full = rows[0]["throughput_rows_per_s"]
    for row in rows:
        row["speedup_vs_full"] = row["throughput_rows_per_s"] / full
    return rows


def resolve_checkpoint(manifest: Manifest, checkpoint: Path | None) -> Path:
    recorded = manifest.provenance.checkpoint
    if checkpoint is None and not recorded:
        raise BenchError("the bundle's manifest records no PyTorch checkpoint "
                         "(provenance.checkpoint); pass --checkpoint DIR")
    path = Path(checkpoint or recorded)
    source = "--checkpoint" if checkpoint is not None else "the manifest's provenance.checkpoint"
    try:
        from training.model import CHECKPOINT_META
    except ImportError as exc:
        raise BenchError(f"--baseline pytorch needs torch and transformers "
                         f"(pip install 'offramp[train]'): {exc}") from exc

    if not (path / CHECKPOINT_META).is_file():
        raise BenchError(f"PyTorch checkpoint {path} (from {source}) not found: no "
                         f"{CHECKPOINT_META} there; pass --checkpoint DIR")
    return path


def pytorch_classifier(checkpoint: Path, manifest: Manifest, attn_implementation: str | None = None):
    """(module, meta): the checkpoint at full depth as one torch module,
    (input_ids, attention_mask, token_type_ids) -> the teacher classifier's logits, under the
    standard transformers forward (`backbone(...).last_hidden_state`). `attn_implementation`
    None is transformers' default (SDPA), as a user would load it, not the eager attention the
    layer-by-layer export path uses. A student that is not a transformers model (MobileBERT)
    runs its own PyTorch forward. Checked against the bundle: same labels, layers and classes."""
    import transformers
    from torch import nn

    from training.model import EarlyExitModel

    model, meta = EarlyExitModel.load(checkpoint)
    if meta.get("labels") and list(meta["labels"]) != list(manifest.labels):
        raise BenchError(f"{checkpoint}: labels {meta['labels']} differ from the bundle's "
                         f"{manifest.labels}: not the bundle's checkpoint")
    if model.num_layers != manifest.num_layers or model.num_labels != len(manifest.labels):
        raise BenchError(f"{checkpoint}: {model.num_layers} layers / {model.num_labels} labels, "
                         f"the bundle has {manifest.num_layers} / {len(manifest.labels)}")
    plain_transformers = not meta.get("backbone_kind")
    if plain_transformers:
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model.backbone = transformers.AutoModel.from_pretrained(str(checkpoint), **kwargs).eval()

    class FullDepth(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.plain_transformers = plain_transformers

        def forward(self, input_ids, attention_mask, token_type_ids):
            if self.plain_transformers:
                hidden = self.model.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                             token_type_ids=token_type_ids).last_hidden_state
            else:
                hidden = self.model.hidden_states(input_ids, attention_mask, token_type_ids)[-1]
            return self.model.heads[-1](hidden, attention_mask)

    return FullDepth().eval(), meta


def pytorch_baseline(checkpoint: Path, manifest: Manifest, batches, labels: np.ndarray,
                     threads: int, repeats: int = 2) -> dict:
    """Full-depth accuracy and throughput of the checkpoint under the standard transformers
    forward (`backbone(...).last_hidden_state`) and the teacher classifier, on the same batches."""
    import torch
    import transformers

    module, _ = pytorch_classifier(checkpoint, manifest)
    tensors = [(torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask),
                torch.from_numpy(b.token_type_ids)) for b in batches]

    def classify(input_ids, attention_mask, token_type_ids):
        return module(input_ids, attention_mask, token_type_ids).argmax(-1)

    def run_all() -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        predictions = [classify(*batch) for batch in tensors]
        seconds = time.perf_counter() - start
        return torch.cat(predictions).numpy(), seconds

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            classify(*tensors[0])  # warm-up
            runs = [run_all() for _ in range(max(1, repeats))]
    finally:
        torch.set_num_threads(previous)
    predictions, seconds = runs[0][0], min(s for _, s in runs)
    return {
        "framework": "pytorch",
        "checkpoint": str(checkpoint),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": getattr(module.model.backbone.config, "_attn_implementation", None),
        "threads": threads,
        "accuracy": float((predictions == labels).mean()),
        "throughput_rows_per_s": len(labels) / seconds,
        "onnx_full_vs_pytorch": None,
        "_predictions": predictions,
    }


def reference_full_depth(reference_dir: Path, manifest: Manifest, inputs: Sequence, labels: np.ndarray,
                         batch_size: int, threads: int, repeats: int) -> dict:
    """Another bundle (a student's teacher) at full depth on the same rows: accuracy and throughput."""
    reference_dir = Path(reference_dir)
    ref_manifest = read_manifest(reference_dir)
    if list(ref_manifest.labels) != list(manifest.labels):
        raise BenchError(f"--reference {reference_dir}: labels {ref_manifest.labels} differ from the "
                         f"bundle's {manifest.labels}")
    engine = open_engine(reference_dir, ref_manifest, intra_op_threads=threads)
    encoder = open_encoder(reference_dir, ref_manifest)
    batches = make_batches(encoder, inputs, batch_size)
    warm_up(engine, encoder, batches, inputs)
    row = measure_threshold(engine, encoder, batches, inputs, labels, 0.0, repeats, latency_rows=0)
    return {"bundle": str(reference_dir), "num_layers": engine.num_layers,
            "accuracy": row["accuracy"], "throughput_rows_per_s": row["throughput_rows_per_s"]}


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    # Timings are only as good as the machine is quiet: record how busy it was at the start.
    return {"cpu": cpu, "cores": os.cpu_count(), "cpu_quota": cpu_quota(),
            "load_average_1m_at_start": load}


def recommended_setting(manifest: Manifest, policy: str) -> float | int | None:
    """What a request of this policy that sets nothing gets: a threshold, or a patience."""
    if policy == "entropy":
        return manifest.recommended_threshold
    table = manifest.policies.get(policy)
    if table is None:
        return None
    return table.recommended_patience if policy == "patience" else table.recommended_threshold


def run_bench(bundle_dir: Path, data: Path, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
              batch_size: int = 32, repeats: int = 2, latency_rows: int = 200,
              threads: int | None = None, baseline: str | None = None,
              checkpoint: Path | None = None, text_columns: Sequence[str] | None = None,
              label_column: str | None = None, progress: Callable | None = None,
              reference: Path | None = None, policy: str = "entropy",
              patiences: Sequence[int] | None = None) -> dict:
    """The whole report as a JSON-ready dict (one policy's sweep; app/policies.py)."""
    if batch_size < 1 or repeats < 1 or latency_rows < 0:
        raise BenchError("--batch-size and --repeats must be >= 1, --latency-rows >= 0")
    if baseline not in (None, "pytorch"):
        raise BenchError(f"--baseline must be 'pytorch', not {baseline!r}")
    bundle_dir = Path(bundle_dir)
    machine = machine_info()
    manifest = read_manifest(bundle_dir)
    inputs, labels = load_data(Path(data), manifest, text_columns, label_column)
    # Fail on a missing checkpoint before minutes of measuring, not after.
    checkpoint_dir = resolve_checkpoint(manifest, checkpoint) if baseline else None
    engine = open_engine(bundle_dir, manifest, intra_op_threads=threads or cpu_quota())
    encoder = open_encoder(bundle_dir, manifest)
    if policy not in engine.policies:
        raise BenchError(f"--policy {policy}: the bundle runs {list(engine.policies)}")
    # The recommended setting is what requests get by default: always measure it.
    recommended = recommended_setting(manifest, policy)
    if policy == "patience":
        patiences = list(patiences or range(1, manifest.num_layers)) + ([recommended] if recommended else [])
    elif recommended is not None:
        thresholds = [*thresholds, recommended]
    results = sweep(engine, encoder, inputs, labels, thresholds, batch_size, repeats,
                    latency_rows, progress, policy, patiences or ())
    full = results[0]
    base = None
    if checkpoint_dir is not None:
        batches = make_batches(encoder, inputs, batch_size)
        base = pytorch_baseline(checkpoint_dir, manifest, batches, labels,
                                engine.intra_op_threads, repeats)
        base["onnx_full_vs_pytorch"] = full["throughput_rows_per_s"] / base["throughput_rows_per_s"]
        base["agreement_with_onnx_full"] = float(
            (base.pop("_predictions") == full["_predictions"]).mean())
    for row in results:
        row.pop("_predictions")
    ref = None
    if reference is not None:
        ref = reference_full_depth(reference, manifest, inputs, labels, batch_size,
                                   engine.intra_op_threads, repeats)
        for row in results:
            row["speedup_vs_reference"] = row["throughput_rows_per_s"] / ref["throughput_rows_per_s"]
    return {
        "bundle": str(bundle_dir),
        "data": str(data),
        "rows": len(labels),
        "batch_size": batch_size,
        "threads": engine.intra_op_threads,
        "num_layers": engine.num_layers,
        "provider": engine.active_provider,
        "repeats": repeats,
        "latency_rows": min(latency_rows, len(labels)),
        "machine": machine,
        "results": results,
        "baseline": base,
        "policy": policy,
        "recommended_threshold": recommended if policy != "patience" else None,
        "recommended_patience": recommended if policy == "patience" else None,
        "reference": ref,
    }


# -- output -------------------------------------------------------------------------------------

def format_table(report: dict) -> str:
    by_patience = report.get("policy") == "patience"
    header = ["patience" if by_patience else "threshold", "accuracy", "mean exit", "ideal speedup", "rows/s",
              "speedup_vs_full", "p50 ms", "p95 ms", "p99 ms"]
    recommended = report.get("recommended_patience" if by_patience else "recommended_threshold")
    ref = report.get("reference")
    if ref:
        header.insert(6, "vs reference")
    lines = []
    for r in report["results"]:
        lat = r["latency_ms"] or {}
        setting = r.get("patience") if by_patience else r["threshold"]
        mark = "*" if recommended is not None and setting is not None and abs(setting - recommended) < 1e-9 else ""
        label = ("full" if setting is None else str(setting)) if by_patience else f"{setting:.2f}"
        lines.append([
            f"{label}{mark}", f"{r['accuracy']:.4f}", f"{r['mean_exit_layer']:.2f}",
            f"{r['ideal_speedup']:.2f}x", f"{r['throughput_rows_per_s']:.1f}",
            f"{r['speedup_vs_full']:.2f}x",
            *([f"{r['speedup_vs_reference']:.2f}x"] if ref else []),
            *(f"{lat[k]:.2f}" if k in lat else "-" for k in ("p50", "p95", "p99")),
        ])
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(header)]

    def fmt(cells):
        return " | ".join(c.rjust(w) for c, w in zip(cells, widths))

    out = [
        f"{report['bundle']} on {report['data']}: {report['rows']} rows, batch size "
        f"{report['batch_size']}, {report['threads']} thread(s), {report['num_layers']} layers, "
        f"{report['machine']['cpu']}",
        fmt(header), "-+-".join("-" * w for w in widths), *(fmt(row) for row in lines),
    ]
    load, cores = report["machine"].get("load_average_1m_at_start"), report["machine"].get("cores")
    if load is not None and cores and load >= 0.5 * cores:
        out.append(f"warning: load average {load} on {cores} cores at the start: other work was "
                   f"running, timings are pessimistic and noisy")
    if recommended is not None:
        out.append(f"* recommended {'patience' if by_patience else 'threshold'} of policy "
                   f"{report.get('policy', 'entropy')} (manifest): {recommended:g}")
    if ref:
        out.append(f"reference {ref['bundle']} at full depth ({ref['num_layers']} layers), same rows and "
                   f"run: accuracy {ref['accuracy']:.4f}, {ref['throughput_rows_per_s']:.1f} rows/s")
    base = report.get("baseline")
    if base:
        out.append(
            f"pytorch baseline (full depth, transformers forward, {base['attn_implementation']} "
            f"attention, {base['threads']} thread(s)): accuracy {base['accuracy']:.4f}, "
            f"{base['throughput_rows_per_s']:.1f} rows/s; ONNX full depth is "
            f"{base['onnx_full_vs_pytorch']:.2f}x PyTorch "
            f"(predictions agree on {base['agreement_with_onnx_full']:.2%} of rows)"
        )
    return "\n".join(out)


def write_json(report: dict, path: Path) -> Path:
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
