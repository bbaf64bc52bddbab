"""`offramp bench BUNDLE_DIR --data FILE --json OUT.json`: the threshold-sweep benchmark; with
`--peers LIST`, the peer-runtime comparison of bench.peers instead."""

from __future__ import annotations

import argparse
from pathlib import Path

PEERS_ONLY = ("calibration", "batch_sizes", "plot", "limit", "provider", "spin_wait")
SWEEP_ONLY = ("batch_size", "baseline", "reference", "latency_rows", "policy", "patience")


def _thresholds(spec: str) -> list[float]:
    from bench.report import BenchError, parse_thresholds

    try:
        return parse_thresholds(spec)
    except BenchError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {number}")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {number}")
    return number


def _batch_sizes(spec: str) -> list[int]:
    try:
        sizes = [_positive(p) for p in spec.split(",") if p.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{spec!r}: not a comma-separated list of integers") from exc
    if not sizes:
        raise argparse.ArgumentTypeError("no batch sizes given")
    return list(dict.fromkeys(sizes))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def run_bench_command(args: argparse.Namespace) -> None:
    if args.peers is not None:
        used = [_flag(n) for n in SWEEP_ONLY if getattr(args, n) is not None]
        if used:
            raise SystemExit(f"offramp bench: error: {', '.join(used)} cannot be used with --peers "
                             f"(batch sizes: --batch-sizes)")
        from bench.peers import run_peers_command

        run_peers_command(args)
        return
    used = [_flag(n) for n in PEERS_ONLY if getattr(args, n) is not None]
    if used:
        raise SystemExit(f"offramp bench: error: {', '.join(used)} can only be used with --peers")

    from app.manifest import ManifestError
    from bench.report import BenchError, DEFAULT_THRESHOLDS, format_table, run_bench, write_json
    from training.data import DataError

    try:
        from tqdm import tqdm

        def progress(items):
            return tqdm(items, desc="thresholds", unit="threshold", disable=None, leave=False)
    except ImportError:
        progress = None
    try:
        report = run_bench(
            args.bundle, args.data,
            thresholds=args.thresholds if args.thresholds is not None else DEFAULT_THRESHOLDS,
            batch_size=args.batch_size or 32, repeats=args.repeats or 2,
            latency_rows=200 if args.latency_rows is None else args.latency_rows,
            threads=args.threads, baseline=args.baseline, checkpoint=args.checkpoint,
            text_columns=args.text_columns.split(",") if args.text_columns else None,
            label_column=args.label_column, progress=progress, reference=args.reference,
            policy=args.policy or "entropy", patiences=args.patience,
        )
    except (BenchError, DataError, ManifestError) as exc:
        raise SystemExit(f"offramp bench: error: {exc}") from exc
    print(format_table(report))
    write_json(report, args.json)
    print(f"wrote {args.json}")


def add_common_options(p: argparse.ArgumentParser) -> None:
    """Options of both the threshold sweep and the peers report."""
    p.add_argument("--thresholds", type=_thresholds, default=None,
                   help="comma-separated thresholds, or a range START,NEXT,...,END (default "
                        "0,0.05,...,1; with --peers 0,0.1,...,1); threshold 0 and the manifest's "
                        "recommended threshold are always measured")
    p.add_argument("--checkpoint", type=Path,
                   help="PyTorch checkpoint for --baseline and --peers (default: the manifest's "
                        "provenance.checkpoint)")
    p.add_argument("--repeats", type=_positive, default=None,
                   help="throughput passes per system: the best counts (default 2); with --peers "
                        "interleaved passes, the median counts (default 3)")
    p.add_argument("--threads", type=_positive,
                   help="intra-op threads of every runtime (default: the CPU quota)")
    p.add_argument("--text-columns", help="comma-separated text column(s): names, or indices for headerless files")
    p.add_argument("--label-column")


def add_peers_options(p: argparse.ArgumentParser) -> None:
    """Options of the peers report only (bench.peers)."""
    p.add_argument("--calibration", type=Path, metavar="FILE",
                   help="text for openvino-int8's NNCF calibration, up to 300 rows (default: the "
                        "manifest's training file if present, else the --data rows)")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=None, metavar="LIST",
                   help="comma-separated batch sizes (default 1,32); 1 runs every row alone")
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="accuracy against rows/s, a panel per batch size")
    p.add_argument("--limit", type=_positive, metavar="N", help="only the first N rows of --data")
    p.add_argument("--provider", choices=["cpu", "openvino", "cuda"], default=None,
                   help="offramp engine's runtime (default cpu); the peers always run on the CPU")
    p.add_argument("--spin-wait", choices=["off", "on"], default=None,
                   help="thread pools of every system spin a while between calls (on, default: each "
                        "runtime's own default, and how offramp serves: one shared ONNX Runtime pool) or "
                        "sleep at once (off; docs/peers.md)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="sweep exit thresholds: accuracy, exit depth, measured speed and latency",
        description="Measure a bundle at every threshold on one labelled file, in one run: "
                    "accuracy, mean exit layer, throughput, speed-up over full depth, "
                    "single-row latency; optionally against plain PyTorch. With --peers, measure "
                    "it against other runtimes at full depth instead (docs/peers.md).")
    p.add_argument("bundle", type=Path, metavar="BUNDLE_DIR", help="bundle folder (manifest.json)")
    p.add_argument("--data", required=True, type=Path, help="labelled TSV, CSV or JSONL file")
    p.add_argument("--json", required=True, type=Path, metavar="OUT.json", help="report file to write")
    p.add_argument("--batch-size", type=_positive, default=None, help="rows per batch for throughput (default 32)")
    p.add_argument("--baseline", choices=["pytorch"],
                   help="also measure the same model at full depth under plain PyTorch/transformers")
    p.add_argument("--reference", type=Path, metavar="BUNDLE_DIR",
                   help="another bundle (e.g. the teacher) measured at full depth in the same run; "
                        "adds speedup_vs_reference to every threshold")
    p.add_argument("--policy", choices=["entropy", "max_prob", "patience"], default=None,
                   help="the exit policy to sweep (default entropy; app/policies.py)")
    p.add_argument("--patience", type=_batch_sizes, default=None, metavar="LIST",
                   help="with --policy patience: the patiences to run (default 1..layers-1)")
    p.add_argument("--latency-rows", type=_non_negative, default=None,
                   help="rows timed one at a time for latency percentiles (default 200; 0 skips)")
    p.add_argument("--peers", metavar="LIST",
                   help="compare against other runtimes at full depth instead of the plain sweep: "
                        "comma-separated torch,ort,ort-int8,openvino,openvino-int8,ct2-int8, or all")
    add_common_options(p)
    add_peers_options(p)
    p.set_defaults(func=run_bench_command)
