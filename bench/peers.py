"""`python -m bench.peers BUNDLE --data FILE --peers LIST --json OUT.json`: offramp's bundle
against the runtimes a user would pick instead, all at full depth, in one run.

Peers (bench.peer_runtimes; docs/peers.md): torch (transformers, default SDPA attention, + the
teacher head), ort (the whole model as one ONNX graph, BERT-fused by onnxruntime.transformers,
fp32), ort-int8 (that graph + quantize_dynamic, QInt8 weights), openvino (the unfused ONNX graph,
fp32 weights, the CPU's default precision), openvino-int8 (NNCF post-training quantisation on up to 300 calibration rows, the
CPU's default inference precision), ct2-int8 (CTranslate2 int8 encoder + the teacher head).

Methodology: the rows are tokenised once with the bundle's tokenizer; batch size B is the rows in
file order in batches of B, each padded to its own longest row; every system gets the same arrays
(tokenisation is not timed for anyone). Every system runs with the same intra-op thread count and
one inter-op thread / stream, and spin-waiting is set the same way for all, on or off:
  --spin-wait off: ONNX Runtime's `session.intra_op.allow_spinning` is "0" (offramp's engine,
    a pool per session as the server runs with OFFRAMP_SHARED_THREAD_POOL=false, and the ort
    peers), and OMP_WAIT_POLICY=PASSIVE for torch and ctranslate2;
  --spin-wait on (the command's default; `run_peers` defaults to off, which needs no process of
    its own): offramp's engine and the ort peers on ONNX Runtime's global pool, which always
    spin-waits (the server's OFFRAMP_SHARED_THREAD_POOL; once it exists ONNX Runtime refuses
    per-session pools), and OMP_WAIT_POLICY unset: libgomp's default (torch, ctranslate2), which
    spins a while before sleeping, as ONNX Runtime's pools do (ACTIVE would spin for ever, idle
    threads taking a core from whichever system runs next).
The OpenMP policy is set when `run_peers` starts, before torch and ctranslate2 load their OpenMP
runtimes (recorded in "spin_wait"; a runtime loaded earlier keeps the policy it started with, and
ONNX Runtime's shared pool only exists if no session was made before it: run --spin-wait on in a
process of its own, as the command line does). OpenVINO's CPU plugin runs on a TBB pool, which
has no spin setting.
Each system is warmed up on a few batches at every batch size, then the passes are interleaved:
for every repeat, for every batch size, for every system (offramp at each threshold, then each
peer), one timed pass over all rows; rows/s is the median over the repeats, and every pass time is
kept. Accuracy and agreement come from the first repeat, at the largest batch size (per batch
size in "accuracy_by_batch_size": dynamic int8 quantisation makes a row depend on its batch).

JSON layout:
    {"bundle", "data", "rows", "threads", "batch_sizes", "repeats", "provider", "offramp_runtime", "machine",
     "peer_weights": "checkpoint" or "random-head (speed only)", "checkpoint", "spin_wait",
     "offramp": [{"threshold", "accuracy", "mean_exit_layer", "rows_per_s": {"1": .., "32": ..},
                  "pass_seconds": {"1": [...], ...}, "accuracy_by_batch_size", "vs_fastest_peer"}],
     "peers": {name: {"accuracy", "agreement_with_offramp_full", "rows_per_s", "pass_seconds",
                      "accuracy_by_batch_size", "agreement_by_batch_size", "details": {...}}},
     "skipped": {name: reason}, "fastest_peer": {"1": name, ...}, "recommended_threshold"}

This module imports without torch; the peers import their packages when they are built.
"""

from __future__ import annotations

import os
import sys

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from app.backends import shared_thread_pool, use_shared_thread_pool
from app.calibration import make_batches
from app.encoding import TextEncoder
from app.engine import Engine
from app.manifest import Manifest, read_manifest
from app.threads import cpu_quota
from bench.peer_runtimes import (
    INSTALL_HINT, PEERS, RANDOM_HEAD, PeerSkipped, PeerSource, build_peer, ort_peer_pool, peer_weights)
from bench.report import BenchError, load_data, machine_info, write_json
from training.data import read_examples

OPENMP_RUNTIMES = ("torch", "ctranslate2")

DEFAULT_THRESHOLDS = [round(0.1 * i, 1) for i in range(11)]
DEFAULT_BATCH_SIZES = (1, 32)
CALIBRATION_ROWS = 300
WARM_UP_BATCHES = 3


def parse_peers(spec: str | Sequence[str]) -> list[str]:
    names = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    if names == ["all"]:
        return list(PEERS)
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        raise BenchError(f"--peers: unknown peer(s) {unknown or names}; valid: {', '.join(PEERS)} "
                         f"(or 'all')")
    return list(dict.fromkeys(names))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def calibration_rows(path: Path | None, manifest: Manifest, encoder: TextEncoder, data_inputs: Sequence,
                     data: Path) -> tuple[list, dict]:
    """Up to CALIBRATION_ROWS rows, evenly spread over the file, one row per item. Default: the
    bundle's training file if it is still there, else the benchmark rows themselves."""
    source = "--calibration"
    if path is None:
        train = manifest.provenance.train
        if train is not None and Path(train.path).is_file():
            path, source = Path(train.path), "the manifest's provenance.train"
    if path is None:
        inputs, source, path = list(data_inputs), "the benchmark rows (no --calibration, no training file)", data
    else:
        examples = read_examples(path).examples
        if (examples[0].text_pair is not None) != manifest.text_pair:
            raise BenchError(f"--calibration {path}: the bundle expects "
                             f"{'text pairs' if manifest.text_pair else 'single texts'}")
        inputs = [e.text if e.text_pair is None else (e.text, e.text_pair) for e in examples]
    picked = np.unique(np.linspace(0, len(inputs) - 1, min(CALIBRATION_ROWS, len(inputs))).astype(int))
    rows = [encoder.encode([inputs[i]]) for i in picked]
    return rows, {"file": str(path), "source": source, "rows": len(rows)}


def _median_rate(rows: int, seconds: list[float]) -> float:
    return float(statistics.median(rows / s for s in seconds))


def run_peers(bundle_dir: Path, data: Path, peers: str | Sequence[str] = "all",
              checkpoint: Path | None = None, calibration: Path | None = None,
              batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, repeats: int = 3,
              threads: int | None = None, thresholds: Sequence[float] | None = None,
              provider: str = "cpu", limit: int | None = None,
              text_columns: Sequence[str] | None = None, label_column: str | None = None,
              spin_wait: bool = False, log: Callable[[str], None] = _stderr) -> dict:
    """The whole report as a JSON-ready dict (layout in the module docstring)."""
    openmp_loaded = {m: m in sys.modules for m in OPENMP_RUNTIMES}
    # Before OpenMP starts. On: libgomp's own default, spinning a while before sleeping, as ONNX
    # Runtime's pools do; not ACTIVE, whose idle threads spin for ever and would take a core from
    # every system timed after them in this process (measured: 5.0 CPU-s in 5 s idle).
    if spin_wait:
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    names = parse_peers(peers)
    batch_sizes = list(dict.fromkeys(int(b) for b in batch_sizes))
    if not batch_sizes or min(batch_sizes) < 1 or repeats < 1 or (limit is not None and limit < 1):
        raise BenchError("--batch-sizes, --repeats and --limit must be >= 1")
    bundle_dir, data = Path(bundle_dir), Path(data)
    machine = machine_info()
    manifest = read_manifest(bundle_dir)
    inputs, labels = load_data(data, manifest, text_columns, label_column)
    inputs, labels = inputs[:limit], labels[:limit]
    threads = threads or cpu_quota()
    thresholds = sorted({0.0, *(DEFAULT_THRESHOLDS if thresholds is None else thresholds),
                         float(manifest.recommended_threshold)})
    if spin_wait:
        use_shared_thread_pool(threads)
        if shared_thread_pool() != threads:
            raise BenchError(f"--spin-wait on: this process's shared pool has {shared_thread_pool()} "
                             f"threads, not --threads {threads}")
    try:
        engine = Engine(bundle_dir, manifest, provider=provider, intra_op_threads=threads)
    except (ValueError, RuntimeError) as exc:
        raise BenchError(f"--provider {provider}: {exc}") from exc
    encoder = TextEncoder.from_file(bundle_dir / manifest.tokenizer, manifest.max_seq_length)
    batches = {b: make_batches(encoder, inputs, b) for b in batch_sizes}
    calibration_data = None
    if "openvino-int8" in names:  # read it now: a bad file fails before minutes of building
        calibration_data = calibration_rows(calibration, manifest, encoder, inputs, data)

    previous_torch_threads = None
    with tempfile.TemporaryDirectory(prefix="offramp-peers-") as work:
        built, skipped, weights, weights_dir, why = {}, {}, None, None, None
        try:
            import torch  # noqa: F401 - every peer is built from the PyTorch checkpoint
            import transformers  # noqa: F401
        except ImportError as exc:
            skipped = {n: f"{n} is built from the PyTorch checkpoint and needs {exc.name!r} "
                          f"({INSTALL_HINT}): {exc}" for n in names}
        else:
            previous_torch_threads = torch.get_num_threads()
            torch.set_num_threads(threads)  # the torch peer, and the PyTorch head of ct2-int8
            weights_dir, weights, why = peer_weights(manifest, checkpoint, Path(work))
            if weights == RANDOM_HEAD:
                log(f"warning: peers run the bundle's architecture with a random classifier head ({why}): "
                    f"their speed is meaningful, their accuracy is not")
            source = PeerSource(weights_dir, manifest, encoder, bundle_dir / manifest.tokenizer, threads,
                                Path(work), lambda: calibration_data)
            for name in names:
                log(f"building peer {name}")
                try:
                    built[name] = build_peer(name, source)
                except PeerSkipped as exc:
                    skipped[name] = str(exc)
                    log(f"skipped peer {name}: {exc}")
                except Exception as exc:  # noqa: BLE001 - one broken runtime must not lose the others
                    skipped[name] = f"failed to build: {type(exc).__name__}: {exc}"
                    log(f"skipped peer {name}: {skipped[name]}")
        try:
            results = _measure(engine, thresholds, built, batches, repeats, log)
        finally:
            if previous_torch_threads is not None:
                import torch

                torch.set_num_threads(previous_torch_threads)
    report = _report(bundle_dir, data, labels, threads, batch_sizes, repeats, provider, machine,
                     weights, weights_dir, manifest, thresholds, built, skipped, results)
    report["spin_wait"] = spin_settings(spin_wait, openmp_loaded)
    report["offramp_runtime"] = str(getattr(engine, "active_provider", provider))
    return report


def _measure(engine: Engine, thresholds, built: dict, batches: dict, repeats: int, log) -> dict:
    """{system: {"outputs": {batch size: first repeat's outputs}, "seconds": {batch size: [...]}}};
    a system is ("offramp", threshold) or ("peer", name)."""
    systems = {("offramp", t): (lambda b, t=t: engine.run(b, t)) for t in thresholds}
    systems.update({("peer", name): peer.predict for name, peer in built.items()})
    for size, size_batches in batches.items():
        for call in systems.values():
            for batch in size_batches[:WARM_UP_BATCHES]:
                call(batch)
    results = {key: {"outputs": {}, "seconds": {b: [] for b in batches}} for key in systems}
    for repeat in range(repeats):
        for size, size_batches in batches.items():
            log(f"repeat {repeat + 1}/{repeats}, batch size {size}: {len(systems)} systems")
            for key, call in systems.items():
                start = time.perf_counter()
                outputs = [call(batch) for batch in size_batches]
                results[key]["seconds"][size].append(time.perf_counter() - start)
                if repeat == 0:
                    results[key]["outputs"][size] = outputs
    return results


def _report(bundle_dir, data, labels, threads, batch_sizes, repeats, provider, machine, weights,
            weights_dir, manifest, thresholds, built, skipped, results) -> dict:
    rows, largest = len(labels), max(batch_sizes)

    def timing(result: dict) -> dict:
        return {"rows_per_s": {str(b): _median_rate(rows, s) for b, s in result["seconds"].items()},
                "pass_seconds": {str(b): s for b, s in result["seconds"].items()}}

    offramp, full_predictions = [], {}
    for t in thresholds:
        result = results[("offramp", t)]
        accuracy, exits = {}, {}
        for b, outputs in result["outputs"].items():
            predictions = np.concatenate([o.probabilities for o in outputs]).argmax(1)
            accuracy[str(b)] = float((predictions == labels).mean())
            exits[b] = float(np.concatenate([o.exit_layer for o in outputs]).mean())
            if t == 0.0:
                full_predictions[b] = predictions
        offramp.append({"threshold": t, "accuracy": accuracy[str(largest)],
                        "mean_exit_layer": exits[largest], **timing(result),
                        "accuracy_by_batch_size": accuracy})
    peers = {}
    for name, peer in built.items():
        result = results[("peer", name)]
        accuracy, agreement = {}, {}
        for b, outputs in result["outputs"].items():
            predictions = np.concatenate(outputs).argmax(1)
            accuracy[str(b)] = float((predictions == labels).mean())
            agreement[str(b)] = float((predictions == full_predictions[b]).mean())
        peers[name] = {"accuracy": accuracy[str(largest)],
                       "agreement_with_offramp_full": agreement[str(largest)], **timing(result),
                       "accuracy_by_batch_size": accuracy, "agreement_by_batch_size": agreement,
                       "details": peer.details}
    fastest = {str(b): max(peers, key=lambda n: peers[n]["rows_per_s"][str(b)]) if peers else None
               for b in batch_sizes}
    for row in offramp:
        row["vs_fastest_peer"] = {b: (row["rows_per_s"][b] / peers[n]["rows_per_s"][b] if n else None)
                                  for b, n in fastest.items()}
    return {
        "bundle": str(bundle_dir), "data": str(data), "rows": rows, "threads": threads,
        "batch_sizes": batch_sizes, "repeats": repeats, "provider": provider, "machine": machine,
        "peer_weights": weights, "checkpoint": str(weights_dir) if weights == "checkpoint" else None,
        "offramp": offramp, "peers": peers, "skipped": skipped, "fastest_peer": fastest,
        "recommended_threshold": manifest.recommended_threshold,
    }


def spin_settings(spin_wait: bool, openmp_loaded: dict) -> dict:
    # What the engine really ran on: a process may have made the shared pool before (then its
    # sessions are all on it, whatever --spin-wait says).
    engine = ("one shared ONNX Runtime pool, spin-waiting" if shared_thread_pool() is not None
              else "a pool per session, session.intra_op.allow_spinning=0")
    return {"mode": "on" if spin_wait else "off", "offramp": engine,
            "offramp_shared_pool_threads": shared_thread_pool(),
            "ort_peers": ort_peer_pool(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset: libgomp's default, spin then sleep"),
            "omp_policy_set_before_import": {m: not loaded for m, loaded in openmp_loaded.items()},
            "openvino": "TBB pool: no spin setting"}


# -- output -------------------------------------------------------------------------------------

def format_table(report: dict) -> str:
    sizes = [str(b) for b in report["batch_sizes"]]
    peers, fastest = report["peers"], report["fastest_peer"]
    torch_rates = peers.get("torch", {}).get("rows_per_s")
    header = ["system", "accuracy", *(f"rows/s b{b}" for b in sizes)]
    if any(fastest.values()):
        header += [f"x fastest peer b{b}" for b in sizes]
    if torch_rates:
        header += [f"x torch b{b}" for b in sizes]
    recommended = report["recommended_threshold"]
    systems = [(f"offramp t={r['threshold']:.2f}{'*' if abs(r['threshold'] - recommended) < 1e-9 else ''}", r)
               for r in report["offramp"]] + list(peers.items())
    lines = []
    for label, r in systems:
        rates = r["rows_per_s"]
        cells = [label, f"{r['accuracy']:.4f}", *(f"{rates[b]:.1f}" for b in sizes)]
        if any(fastest.values()):
            cells += [f"{rates[b] / peers[fastest[b]]['rows_per_s'][b]:.2f}x" for b in sizes]
        if torch_rates:
            cells += [f"{rates[b] / torch_rates[b]:.2f}x" for b in sizes]
        lines.append(cells)
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(header)]

    def fmt(cells):
        return " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [f"{report['bundle']} on {report['data']}: {report['rows']} rows, {report['threads']} thread(s), "
           f"spin-waiting {report['spin_wait']['mode']} for all, median of {report['repeats']} interleaved pass(es), {report['machine']['cpu']}",
           fmt(header), "-+-".join("-" * w for w in widths), *(fmt(row) for row in lines),
           f"* recommended threshold (manifest): {recommended:.2f}"]
    if any(fastest.values()):
        out.append("fastest peer: " + ", ".join(f"batch {b}: {n}" for b, n in fastest.items()))
    for name, reason in report["skipped"].items():
        out.append(f"skipped {name}: {reason}")
    if report["peer_weights"] == RANDOM_HEAD:
        out.append("peers ran the bundle's architecture with a random classifier head: their accuracy "
                   "is meaningless, only their speed counts")
    load, cores = report["machine"].get("load_average_1m_at_start"), report["machine"].get("cores")
    if load is not None and cores and load >= 0.5 * cores:
        out.append(f"warning: load average {load} on {cores} cores at the start: timings are noisy")
    return "\n".join(out)


def plot(report: dict, path: Path) -> Path:
    """Accuracy against rows/s, one panel per batch size: offramp's sweep as a line, peers as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    sizes = [str(b) for b in report["batch_sizes"]]
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.8), squeeze=False)
    recommended = report["recommended_threshold"]
    for ax, b in zip(axes[0], sizes):
        rows = report["offramp"]
        ax.plot([r["rows_per_s"][b] for r in rows], [r["accuracy"] for r in rows], "-o",
                color="tab:blue", label="offramp (threshold sweep)")
        for r in rows:
            ax.annotate(f"{r['threshold']:.2f}", (r["rows_per_s"][b], r["accuracy"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points", color="tab:blue")
        rec = min(rows, key=lambda r: abs(r["threshold"] - recommended))
        ax.scatter([rec["rows_per_s"][b]], [rec["accuracy"]], marker="*", s=260, color="tab:red",
                   zorder=5, label=f"offramp recommended ({recommended:.2f})")
        for name, peer in report["peers"].items():
            ax.scatter([peer["rows_per_s"][b]], [peer["accuracy"]], marker="s", s=50, zorder=4, label=name)
            ax.annotate(name, (peer["rows_per_s"][b], peer["accuracy"]), fontsize=8,
                        xytext=(4, -10), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="rows/s (log)", ylabel="accuracy", title=f"batch size {b}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    note = " - peers: random head, accuracy meaningless" if report["peer_weights"] == RANDOM_HEAD else ""
    fig.suptitle(f"{Path(report['bundle']).name}: {report['rows']} rows, {report['threads']} thread(s){note}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- command line -------------------------------------------------------------------------------

def run_peers_command(args: argparse.Namespace, prog: str = "offramp bench") -> dict:
    """Shared by `offramp bench --peers` and `python -m bench.peers`."""
    from app.manifest import ManifestError
    from training.data import DataError

    try:
        if args.plot is not None:
            import matplotlib  # noqa: F401 - fail before measuring, not after
        report = run_peers(
            args.bundle, args.data, args.peers, checkpoint=args.checkpoint, calibration=args.calibration,
            batch_sizes=args.batch_sizes or DEFAULT_BATCH_SIZES, repeats=args.repeats or 3,
            threads=args.threads, thresholds=args.thresholds, provider=args.provider or "cpu",
            limit=args.limit, text_columns=args.text_columns.split(",") if args.text_columns else None,
            label_column=args.label_column, spin_wait=args.spin_wait != "off")
    except ImportError as exc:
        raise SystemExit(f"{prog}: error: --plot needs matplotlib ({INSTALL_HINT}): {exc}") from exc
    except (BenchError, DataError, ManifestError) as exc:
        raise SystemExit(f"{prog}: error: {exc}") from exc
    print(format_table(report))
    write_json(report, args.json)
    print(f"wrote {args.json}")
    if args.plot is not None:
        print(f"wrote {plot(report, args.plot)}")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    from bench.cli import add_common_options, add_peers_options

    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    parser.add_argument("--data", required=True, type=Path, help="labelled TSV, CSV or JSONL file")
    parser.add_argument("--json", required=True, type=Path, metavar="OUT.json")
    parser.add_argument("--peers", required=True, help=f"comma-separated: {','.join(PEERS)}, or all")
    add_common_options(parser)
    add_peers_options(parser)
    run_peers_command(parser.parse_args(argv), prog="python -m bench.peers")


if __name__ == "__main__":
    main()
