"""The commands that work on bundles already written: `offramp quantize`, `card`, `calibrate`
and `cascade` (each imports what it runs only when it runs)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from training.cli import command, text_columns_of
from training.data import DataError
from training.errors import CommandError
from training.staging import BUNDLE_MARKER, check_replaceable

log = logging.getLogger("offramp.train")


def calibration_text(args: argparse.Namespace, manifest) -> list | None:
    """Training rows that fix the static activation scales: --calibration, else the bundle's
    recorded training file; evenly spaced through the file, so not just its first topic."""
    from training.data import read_examples

    if args.method not in ("static", "fused"):
        return None
    path = args.calibration
    if path is None:
        recorded = manifest.provenance.train.path if manifest.provenance.train else None
        if not recorded or not Path(recorded).is_file():
            raise CommandError(f"static quantisation needs training text: pass --calibration FILE "
                               f"(the manifest's training file {recorded!r} is not here)")
        path = Path(recorded)
    file = read_examples(path, text_columns_of(args))
    examples = file.examples
    if (examples[0].text_pair is not None) != manifest.text_pair:
        raise DataError(f"{path}: the bundle expects {'text pairs' if manifest.text_pair else 'single texts'} "
                        f"but the file has {len(file.text_columns)} text column(s); pass --text-columns")
    step = max(1, len(examples) // args.calibration_rows)
    chosen = examples[::step][:args.calibration_rows]
    log.info("calibration text %s: %s of its %s rows, evenly spaced, text column(s) %s", path,
             f"{len(chosen):,}", f"{len(examples):,}", ", ".join(file.text_columns))
    return [e.text if e.text_pair is None else (e.text, e.text_pair) for e in chosen]


def held_out_rows(args: argparse.Namespace, manifest):
    """(inputs, class ids, record) the source bundle's exits were calibrated on, when they were
    held out of its training file and that file is here unchanged; else None (dev)."""
    from app.manifest import sha256_of
    from training.labels import read_task_data

    record = manifest.calibration_data
    if record is None or not record.held_out_fraction:
        return None
    path = Path(record.path)
    if not path.is_file() or sha256_of(path) != record.sha256:
        log.warning("the source was calibrated on rows held out of %s, which is not here unchanged: "
                    "recalibrating on --dev (in sample)", path)
        return None
    data = read_task_data(path, args.dev, text_columns=text_columns_of(args), label_column=args.label_column,
                          calibration_split=record.held_out_fraction)
    examples = data.calibration_examples
    if len(examples) != record.rows:
        log.warning("the held-out split of %s gives %d rows, not the %d the source was calibrated on: "
                    "recalibrating on --dev (in sample)", path, len(examples), record.rows)
        return None
    inputs = [e.text if e.text_pair is None else (e.text, e.text_pair) for e in examples]
    import numpy as np

    return inputs, np.array(manifest.label_ids([e.label for e in examples])), record


def run_quantize(args: argparse.Namespace) -> None:
    from app.manifest import read_manifest
    from training.labelled import load_data
    from training.quantize import ROW_TOLERANCE, quantize_bundle

    from collections import Counter

    manifest = read_manifest(args.bundle)
    if manifest.stages:
        raise CommandError(f"{args.bundle} is a cascade: quantise its stages, then cascade them again")
    check_replaceable(args.out, BUNDLE_MARKER, "--out")
    inputs, labels = load_data(args.dev, manifest, text_columns_of(args), args.label_column)
    counts = Counter(labels.tolist())
    log.info("dev %s: %s rows, labels (class: count): %s", args.dev, f"{len(inputs):,}",
             ", ".join(f"{name} x {counts[i]:,}" for i, name in enumerate(manifest.labels) if counts[i]))
    quantize_bundle(args.bundle, args.out, inputs, labels, args.calibration_tolerance, args.max_loss,
                    threshold_rows=held_out_rows(args, manifest),
                    max_batch_dependence=ROW_TOLERANCE if args.max_batch_dependence is None
                    else args.max_batch_dependence,
                    method=args.method, calibration_inputs=calibration_text(args, manifest))
    print(f"int8 bundle written to {args.out}")


def run_card(args: argparse.Namespace) -> None:
    from training.card import write_model_card

    path = write_model_card(args.bundle, args.bench, args.notes)
    print(f"model card written to {path}")


def run_calibrate(args: argparse.Namespace) -> None:
    from training.recalibrate import run_calibrate as calibrate

    calibrate(args)


def run_cascade(args: argparse.Namespace) -> None:
    from training.cascade import run_cascade as build

    build(args)


def register_bundle_commands(subparsers) -> None:
    quantize = subparsers.add_parser("quantize", help="int8-quantise a bundle, check it on dev, recalibrate")
    quantize.add_argument("bundle", type=Path, help="verified fp32 bundle")
    quantize.add_argument("--out", required=True, type=Path)
    quantize.add_argument("--dev", required=True, type=Path, help="labelled dev file")
    quantize.add_argument("--text-columns")
    quantize.add_argument("--label-column")
    quantize.add_argument("--calibration-tolerance", type=float, default=0.5)
    quantize.add_argument("--max-loss", type=float, default=0.5,
                          help="refuse the int8 bundle if full-depth dev accuracy drops by more points")
    quantize.add_argument("--max-batch-dependence", type=float,
                          help="refuse the int8 bundle if a row's probabilities move by more than this "
                               "between two batchings (default: training.quantize.ROW_TOLERANCE, 1e-5)")
    quantize.add_argument("--method", choices=["static", "fused", "weight-only"], default="static",
                          help="static: int8 compute, activation scales calibrated offline (default); "
                               "fused: static int8 with BERT layers rebuilt on fused attention "
                               "(QAttention); weight-only: 8-bit MatMul weights, fp32 compute")
    quantize.add_argument("--calibration", type=Path,
                          help="training text for static scales (default: the manifest's training file)")
    quantize.add_argument("--calibration-rows", type=int, default=300,
                          help="rows of calibration text, spread through the file (default 300)")
    quantize.set_defaults(func=command(run_quantize))

    card = subparsers.add_parser("card", help="write a bundle's model card (README.md) and calibration plot")
    card.add_argument("bundle", type=Path)
    card.add_argument("--bench", type=Path, help="JSON of `offramp bench` to include")
    card.add_argument("--notes", type=Path, help="Markdown to append (e.g. how to reproduce)")
    card.set_defaults(func=command(run_card))

    calibrate = subparsers.add_parser("calibrate", help="fit a bundle's calibration again (every exit policy) "
                                                        "on a labelled file")
    calibrate.add_argument("bundle", type=Path)
    calibrate.add_argument("--data", required=True, type=Path,
                           help="labelled rows held out from training and from what you report on")
    calibrate.add_argument("--calibration-tolerance", type=float, default=0.5,
                           help="recommended settings: the fastest within this many points of full depth")
    calibrate.add_argument("--text-columns")
    calibrate.add_argument("--label-column")
    calibrate.add_argument("--threads", type=int, help="intra-op threads (default: CPU quota)")
    calibrate.set_defaults(func=command(run_calibrate))

    cascade = subparsers.add_parser("cascade", help="chain bundles into one cascade bundle (cheap model first)")
    cascade.add_argument("--stages", required=True, metavar="A,B[,...]",
                         help="bundle folders in the order they run; they must share one label set")
    cascade.add_argument("--dev", required=True, type=Path,
                         help="labelled dev file (accuracy per layer; calibration unless --calibration)")
    cascade.add_argument("--out", required=True, type=Path)
    cascade.add_argument("--calibration", type=Path, metavar="FILE",
                         help="labelled file to fit the calibration on instead of --dev (dev is then out of sample)")
    cascade.add_argument("--calibration-tolerance", type=float, default=0.5,
                         help="recommended threshold: the largest within this many points of full depth")
    cascade.add_argument("--stage-temperature", choices=["fit", "none"], default="fit",
                         help="fit: each stage's exits get the temperature that best calibrates them on the "
                              "calibration rows, so one threshold means one confidence in every stage (default); "
                              "none: every stage's probabilities as it serves them alone")
    cascade.add_argument("--text-columns")
    cascade.add_argument("--label-column")
    cascade.add_argument("--threads", type=int, help="intra-op threads (default: CPU quota)")
    cascade.set_defaults(func=command(run_cascade))
