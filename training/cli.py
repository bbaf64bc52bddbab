"""`offramp train ...`: argument parsing and the data file -> recipe -> bundle pipeline."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from app.manifest import LayerResult, Provenance
from app.threads import cpu_quota
from training.config import FastBertConfig, config_from

log = logging.getLogger("offramp.train")


def add_data_arguments(p: argparse.ArgumentParser, unlabeled_help: str, label_names_help: str) -> None:
    """What every training command takes besides its teacher: data, output, recipe file."""
    p.add_argument("--train", required=True, type=Path, help="TSV, CSV or JSONL training file")
    p.add_argument("--dev", required=True, type=Path, help="labelled dev file (evaluation, calibration)")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write, e.g. models/NAME")
    p.add_argument("--unlabeled", type=Path, help=unlabeled_help)
    p.add_argument("--text-columns", help="comma-separated text column(s): names, or indices for headerless files")
    p.add_argument("--label-column")
    p.add_argument("--label-names", help=label_names_help)
    p.add_argument("--config", type=Path, help="TOML recipe; command-line options override it")
    p.add_argument("--checkpoint", type=Path, help="where the PyTorch checkpoint goes (default runs/NAME)")
    p.add_argument("--calibration-tolerance", type=float, default=0.5,
                   help="accuracy points below full depth the recommended threshold may lose")
    p.add_argument("--threads", type=int, help="torch threads (default: the CPU quota)")


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="local model folder or hub id of a BERT-family encoder")
    add_data_arguments(p, "extra text for self-distillation of the exits",
                       "comma-separated names to serve, in label order (e.g. negative,positive)")
    p.add_argument("--from-checkpoint", type=Path,
                   help="start from a saved early-exit checkpoint (with --epochs 0: retrain the exits only)")


def add_recipe_arguments(p: argparse.ArgumentParser, config_cls) -> None:
    for f in dataclasses.fields(config_cls):
        kind = {"int": int, "float": float, "str": str, "int | None": int}.get(str(f.type), str)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                       help=f"recipe option (default {f.default})")


def recipe_values(args: argparse.Namespace, config_cls) -> dict:
    values = tomllib.loads(args.config.read_text()) if args.config else {}
    for f in dataclasses.fields(config_cls):
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return values


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import onnx
    import torch
    import onnxruntime
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def run_fastbert(args: argparse.Namespace) -> None:
    import torch

    from training.fastbert import train_fastbert
    from training.task import load_task

    cfg = config_from(FastBertConfig, recipe_values(args, FastBertConfig))
    torch.set_num_threads(args.threads or cpu_quota())
    name = args.out.name
    checkpoint = args.checkpoint or Path("runs") / name
    checkpoint.mkdir(parents=True, exist_ok=True)
    task = load_task(
        args.teacher, args.train, args.dev, args.unlabeled,
        args.text_columns.split(",") if args.text_columns else None, args.label_column,
        args.label_names.split(",") if args.label_names else None,
        cfg.max_seq_length, cfg.limit_train, checkpoint,
    )
    task.log_file = checkpoint / "train_log.jsonl"
    task.log_file.write_text("")
    start = time.perf_counter()
    initial = None
    if args.from_checkpoint:
        from training.model import EarlyExitModel

        initial, meta = EarlyExitModel.load(args.from_checkpoint)
        if meta.get("labels") and meta["labels"] != task.labels:
            raise SystemExit(f"{args.from_checkpoint}: labels {meta['labels']} differ from {task.labels}")
    model = train_fastbert(task, cfg, initial)
    save_and_export(args, task, model, checkpoint, cfg.max_seq_length, cfg.seed,
                    {"method": "fastbert", **dataclasses.asdict(cfg)}, time.perf_counter() - start)


def save_and_export(args: argparse.Namespace, task, model, checkpoint: Path, max_seq_length: int, seed: int,
                    recipe: dict, wall_s: float, meta: dict | None = None) -> list[float]:
    """What every recipe does after training: per-layer dev accuracy, the PyTorch checkpoint
    (with its tokenizer, so it can be a teacher on its own), then the verified, calibrated bundle
    with its provenance. Returns the per-layer dev accuracy."""
    from training import loop
    from training.export import export_bundle

    accuracy = loop.layer_accuracy(model, task.dev)
    for layer, acc in enumerate(accuracy, 1):
        log.info("dev accuracy at layer %d: %.4f", layer, acc)
    model.save(checkpoint, {"labels": task.labels, "recipe": recipe, **(meta or {})})
    if task.tokenizer_file.resolve() != (checkpoint / "tokenizer.json").resolve():
        shutil.copyfile(task.tokenizer_file, checkpoint / "tokenizer.json")
    provenance = Provenance(
        teacher=task.teacher, train=task.records["train"], dev=task.records["dev"],
        unlabeled=task.records.get("unlabeled"), command=shlex.join(["offramp", *getattr(args, "argv", sys.argv[1:])]),
        seed=seed, git_commit=git_commit(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        recipe=recipe, versions=versions(), wall_time_s=round(wall_s, 1), checkpoint=str(checkpoint),
    )
    dev_inputs = [e.text if e.text_pair is None else (e.text, e.text_pair) for e in task.dev.examples]
    manifest = export_bundle(
        model, task.tokenizer_file, args.out, name=args.out.name, labels=task.labels,
        source_labels=task.source_labels, text_pair=task.text_pair, max_seq_length=max_seq_length,
        provenance=provenance, dev_results=[LayerResult(layer=i, accuracy=a) for i, a in enumerate(accuracy, 1)],
        calibration_inputs=dev_inputs, calibration_labels=task.dev.labels,
        tolerance_points=args.calibration_tolerance,
    )
    log.info("wrote %s: verification max |diff| %s, recommended threshold %.2f",
             args.out, max(manifest.verification.max_abs_logit_diff), manifest.recommended_threshold)
    print(f"bundle written to {args.out} (checkpoint {checkpoint})")
    return accuracy


def calibration_text(args: argparse.Namespace, manifest) -> list | None:
    """Training rows that fix the static activation scales: --calibration, else the bundle's
    recorded training file; evenly spaced through the file, so not just its first topic."""
    from training.data import read_examples

    if args.method != "static":
        return None
    path = args.calibration
    if path is None:
        recorded = manifest.provenance.train.path if manifest.provenance.train else None
        if not recorded or not Path(recorded).is_file():
            raise SystemExit(f"offramp quantize: error: static quantisation needs training text: pass "
                             f"--calibration FILE (the manifest's training file {recorded!r} is not here)")
        path = Path(recorded)
    text_columns = args.text_columns.split(",") if args.text_columns else None
    examples = read_examples(path, text_columns).examples
    step = max(1, len(examples) // args.calibration_rows)
    chosen = examples[::step][:args.calibration_rows]
    return [e.text if e.text_pair is None else (e.text, e.text_pair) for e in chosen]


def run_quantize(args: argparse.Namespace) -> None:
    from app.manifest import read_manifest
    from training.labelled import load_data
    from training.quantize import quantize_bundle

    text_columns = args.text_columns.split(",") if args.text_columns else None
    manifest = read_manifest(args.bundle)
    inputs, labels = load_data(args.dev, manifest, text_columns, args.label_column)
    quantize_bundle(args.bundle, args.out, inputs, labels, args.calibration_tolerance, args.max_loss,
                    method=args.method, calibration_inputs=calibration_text(args, manifest))
    print(f"int8 bundle written to {args.out}")


def run_card(args: argparse.Namespace) -> None:
    from training.card import write_model_card

    path = write_model_card(args.bundle, args.bench, args.notes)
    print(f"model card written to {path}")


def register(subparsers) -> None:
    quantize = subparsers.add_parser("quantize", help="int8-quantise a bundle, check it on dev, recalibrate")
    quantize.add_argument("bundle", type=Path, help="verified fp32 bundle")
    quantize.add_argument("--out", required=True, type=Path)
    quantize.add_argument("--dev", required=True, type=Path, help="labelled dev file")
    quantize.add_argument("--text-columns")
    quantize.add_argument("--label-column")
    quantize.add_argument("--calibration-tolerance", type=float, default=0.5)
    quantize.add_argument("--max-loss", type=float, default=0.5,
                          help="refuse the int8 bundle if full-depth dev accuracy drops by more points")
    quantize.add_argument("--method", choices=["static", "weight-only"], default="static",
                          help="static: int8 compute, activation scales calibrated offline (default); "
                               "weight-only: 8-bit MatMul weights, fp32 compute")
    quantize.add_argument("--calibration", type=Path,
                          help="training text for static scales (default: the manifest's training file)")
    quantize.add_argument("--calibration-rows", type=int, default=300,
                          help="rows of calibration text, spread through the file (default 300)")
    quantize.set_defaults(func=run_quantize)

    card = subparsers.add_parser("card", help="write a bundle's model card (README.md) and calibration plot")
    card.add_argument("bundle", type=Path)
    card.add_argument("--bench", type=Path, help="JSON of `offramp bench` to include")
    card.add_argument("--notes", type=Path, help="Markdown to append (e.g. how to reproduce)")
    card.set_defaults(func=run_card)

    train = subparsers.add_parser("train", help="train and export a model bundle")
    methods = train.add_subparsers(dest="method", required=True)
    fastbert = methods.add_parser("fastbert", help="FastBERT: fine-tune, then self-distil an exit after every layer")
    add_task_arguments(fastbert)
    add_recipe_arguments(fastbert, FastBertConfig)
    fastbert.set_defaults(func=run_fastbert)

    from training.distill_cli import add_distill_arguments, run_distill

    distill = methods.add_parser("distill", help="distil a fastbert teacher checkpoint into a smaller "
                                 "student (DistilBERT, TinyBERT, PKD, MobileBERT), then give it exits")
    add_distill_arguments(distill)
    distill.set_defaults(func=run_distill)
