"""`offramp bench BUNDLE_DIR --data FILE --json OUT.json`: the threshold-sweep benchmark."""

from __future__ import annotations

import argparse
from pathlib import Path


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


def run_bench_command(args: argparse.Namespace) -> None:
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
            batch_size=args.batch_size, repeats=args.repeats, latency_rows=args.latency_rows,
            threads=args.threads, baseline=args.baseline, checkpoint=args.checkpoint,
            text_columns=args.text_columns.split(",") if args.text_columns else None,
            label_column=args.label_column, progress=progress, reference=args.reference,
        )
    except (BenchError, DataError, ManifestError) as exc:
        raise SystemExit(f"offramp bench: error: {exc}") from exc
    print(format_table(report))
    write_json(report, args.json)
    print(f"wrote {args.json}")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="sweep exit thresholds: accuracy, exit depth, measured speed and latency",
        description="Measure a bundle at every threshold on one labelled file, in one run: "
                    "accuracy, mean exit layer, throughput, speed-up over full depth, "
                    "single-row latency; optionally against plain PyTorch.")
    p.add_argument("bundle", type=Path, metavar="BUNDLE_DIR", help="bundle folder (manifest.json)")
    p.add_argument("--data", required=True, type=Path, help="labelled TSV, CSV or JSONL file")
    p.add_argument("--json", required=True, type=Path, metavar="OUT.json", help="report file to write")
    p.add_argument("--thresholds", type=_thresholds, default=None,
                   help="comma-separated thresholds, or a range START,NEXT,...,END "
                        "(default 0,0.05,...,1); threshold 0 is always measured")
    p.add_argument("--batch-size", type=_positive, default=32, help="rows per batch for throughput (default 32)")
    p.add_argument("--baseline", choices=["pytorch"],
                   help="also measure the same model at full depth under plain PyTorch/transformers")
    p.add_argument("--checkpoint", type=Path,
                   help="PyTorch checkpoint for --baseline (default: the manifest's provenance.checkpoint)")
    p.add_argument("--reference", type=Path, metavar="BUNDLE_DIR",
                   help="another bundle (e.g. the teacher) measured at full depth in the same run; "
                        "adds speedup_vs_reference to every threshold")
    p.add_argument("--latency-rows", type=_non_negative, default=200,
                   help="rows timed one at a time for latency percentiles (default 200; 0 skips)")
    p.add_argument("--repeats", type=_positive, default=2,
                   help="throughput passes per threshold; the best wall time counts (default 2)")
    p.add_argument("--threads", type=_positive, help="engine intra-op threads (default: the CPU quota)")
    p.add_argument("--text-columns", help="comma-separated text column(s): names, or indices for headerless files")
    p.add_argument("--label-column")
    p.set_defaults(func=run_bench_command)
