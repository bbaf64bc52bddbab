"""`offramp train distill --method METHOD --teacher CHECKPOINT ...`: teacher checkpoint + data
-> distilled student with FastBERT exits -> checkpoint + verified, calibrated ONNX bundle.

Kept out of torch's way: importing this module (to register the command) loads no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import time
import tomllib
from pathlib import Path

from training.cli import add_data_arguments
from training.config import DISTILL_METHODS, config_from

log = logging.getLogger("offramp.train")

_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}


def _recipe_options() -> dict[str, dict[str, object]]:
    """{option: {method: default}} over every method's config (each option listed once)."""
    options: dict[str, dict[str, object]] = {}
    for method, config_cls in DISTILL_METHODS.items():
        for f in dataclasses.fields(config_cls):
            options.setdefault(f.name, {})[method] = f.default
    return options


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=list(DISTILL_METHODS))
    p.add_argument("--teacher", required=True, type=Path,
                   help="early-exit checkpoint folder written by `offramp train fastbert` (its --checkpoint)")
    p.add_argument("--tokenizer", type=Path,
                   help="the teacher's tokenizer.json (default: the one in the teacher folder)")
    add_data_arguments(p, "extra text: exit self-distillation, TinyBERT general distillation, MobileBERT transfer",
                       "comma-separated names to serve, in label order (default: the teacher's)")
    types = {}
    for config_cls in DISTILL_METHODS.values():
        for f in dataclasses.fields(config_cls):
            types.setdefault(f.name, _TYPES.get(str(f.type), str))
    for name, defaults in _recipe_options().items():
        shared = len(defaults) == len(DISTILL_METHODS) and len({repr(d) for d in defaults.values()}) == 1
        where = (f"every method, default {next(iter(defaults.values()))}" if shared
                 else "; ".join(f"{m} {'auto' if d is None else d}" for m, d in defaults.items()))
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=types[name], default=None,
                       help=f"recipe option ({where})")


def distill_values(args: argparse.Namespace) -> dict:
    """The chosen method's settings: the TOML file, then the command line; an option another
    method has but this one does not is an error rather than silently ignored."""
    config_cls = DISTILL_METHODS[args.method]
    known = {f.name for f in dataclasses.fields(config_cls)}
    values = tomllib.loads(args.config.read_text()) if args.config else {}
    for name in _recipe_options():
        if getattr(args, name, None) is not None:
            if name not in known:
                raise SystemExit(f"--{name.replace('_', '-')} is not an option of --method {args.method}")
            values[name] = getattr(args, name)
    return values


def run_distill(args: argparse.Namespace) -> None:
    import torch

    from app.threads import cpu_quota
    from training import loop
    from training.cli import save_and_export
    from training.distill import distil, find_tokenizer, load_teacher
    from training.task import load_task

    try:
        cfg = config_from(DISTILL_METHODS[args.method], distill_values(args))
    except ValueError as e:  # e.g. a TOML key of another method
        raise SystemExit(f"--method {args.method}: {e}") from None
    torch.set_num_threads(args.threads or cpu_quota())
    try:
        teacher, teacher_meta = load_teacher(args.teacher)
        tokenizer = find_tokenizer(args.teacher, args.tokenizer)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    name = args.out.name
    checkpoint = args.checkpoint or Path("runs") / name
    if checkpoint.resolve() == Path(args.teacher).resolve():
        raise SystemExit(f"--checkpoint {checkpoint} is the teacher's folder: the student would overwrite it")
    checkpoint.mkdir(parents=True, exist_ok=True)
    # The student checkpoint carries the tokenizer, so it can itself be a teacher later; the
    # task reads it from there.
    if tokenizer.resolve() != (checkpoint / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer, checkpoint / "tokenizer.json")
    task = load_task(
        str(checkpoint), args.train, args.dev, args.unlabeled,
        args.text_columns.split(",") if args.text_columns else None, args.label_column,
        args.label_names.split(",") if args.label_names else None,
        cfg.max_seq_length, cfg.limit_train, checkpoint,
    )
    task.teacher = str(args.teacher)
    if len(task.labels) != teacher.num_labels:
        raise SystemExit(f"{args.train}: {len(task.labels)} labels {task.labels}, but the teacher has "
                         f"{teacher.num_labels} classes")
    if not args.label_names and teacher_meta.get("labels"):
        task.labels = list(teacher_meta["labels"])  # serve the teacher's label names
    task.log_file = checkpoint / "train_log.jsonl"
    task.log_file.write_text("")
    teacher_accuracy = loop.layer_accuracy(teacher, task.dev)[-1]
    log.info("teacher dev accuracy (last layer): %.4f", teacher_accuracy)

    start = time.perf_counter()
    model = distil(args.method, teacher, task, cfg)
    recipe = {"method": args.method, **dataclasses.asdict(cfg), "exits": "fastbert self-distillation",
              "teacher_dev_accuracy": teacher_accuracy}
    accuracy = save_and_export(args, task, model, checkpoint, cfg.max_seq_length, cfg.seed, recipe,
                               time.perf_counter() - start, {"teacher": str(args.teacher)})
    print(f"dev accuracy {accuracy[-1]:.4f} at full depth, teacher {teacher_accuracy:.4f}")
