"""`offramp train distill --method METHOD --teacher CHECKPOINT ...`: teacher checkpoint + data
-> distilled student with FastBERT exits -> checkpoint + verified, calibrated ONNX bundle.

Its options are built from the registry of methods (training/methods/).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import time
from pathlib import Path

from training.cli import LABEL_NAMES_HELP, add_data_arguments, read_config
from training.config import config_from
from training.methods import distill_methods

log = logging.getLogger("offramp.train")

_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}


def _recipe_options() -> dict[str, dict[str, object]]:
    """{option: {method: default}} over every method's config (each option listed once)."""
    options: dict[str, dict[str, object]] = {}
    for method, spec in distill_methods().items():
        for f in dataclasses.fields(spec.config):
            options.setdefault(f.name, {})[method] = f.default
    return options


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    methods = distill_methods()
    p.add_argument("--method", required=True, choices=list(methods),
                   help="; ".join(f"{name}: {m.summary}" for name, m in methods.items()))
    p.add_argument("--teacher", required=True, type=Path,
                   help="early-exit checkpoint folder written by `offramp train fastbert` (its --checkpoint)")
    p.add_argument("--tokenizer", type=Path,
                   help="the teacher's tokenizer.json (default: the one in the teacher folder)")
    add_data_arguments(p, "extra text: exit self-distillation, TinyBERT general distillation, MobileBERT transfer",
                       LABEL_NAMES_HELP + " (default: the teacher's names; the label set and class-id "
                       "order are always the teacher's)")
    types = {}
    for spec in methods.values():
        for f in dataclasses.fields(spec.config):
            types.setdefault(f.name, _TYPES.get(str(f.type), str))
    for name, defaults in _recipe_options().items():
        shared = len(defaults) == len(methods) and len({repr(d) for d in defaults.values()}) == 1
        where = (f"every method, default {next(iter(defaults.values()))}" if shared
                 else "; ".join(f"{m} {'auto' if d is None else d}" for m, d in defaults.items()))
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=types[name], default=None,
                       help=f"recipe option ({where})")


def distill_values(args: argparse.Namespace) -> dict:
    """The chosen method's settings: the TOML file, then the command line; an option another
    method has but this one does not is an error rather than silently ignored."""
    config_cls = distill_methods()[args.method].config
    known = {f.name for f in dataclasses.fields(config_cls)}
    values = read_config(args.config)
    for name in _recipe_options():
        if getattr(args, name, None) is not None:
            if name not in known:
                raise SystemExit(f"--{name.replace('_', '-')} is not an option of --method {args.method}")
            values[name] = getattr(args, name)
    return values


def teacher_labels(args: argparse.Namespace, teacher_meta: dict, num_labels: int,
                   limit_train: int | None = None):
    """The run's data, read and checked against the teacher's label set: a student's class ids
    must be its teacher's. Teachers that record their file labels (`source_labels`) fix the label
    set and its order; older ones only their served names (the files' labels then sort as they
    did when the teacher was trained)."""
    from training.cli import CommandError, read_data
    from training.labels import LabelMap, parse_list

    given = parse_list(args.labels, "--labels")
    names = parse_list(args.label_names, "--label-names")
    served = list(teacher_meta.get("labels") or [])
    recorded = teacher_meta.get("source_labels")
    if recorded:
        if given is not None and given != list(recorded):
            raise CommandError(f"--labels {args.labels}: the teacher {args.teacher} was trained on labels "
                               f"{','.join(recorded)} (in class-id order); a student keeps them")
        data = read_data(args, limit_train, list(recorded), f"the teacher's labels ({args.teacher})",
                         names if names is not None else (served or None))
    else:
        data = read_data(args, limit_train, given, "--labels", names)
        if names is None and served and len(served) == len(data.labels.source):
            data.labels = LabelMap(data.labels.source, served, "served as the teacher's names, by position")
            log.info("%s", data.labels.describe())
    if len(data.labels.source) != num_labels:
        raise CommandError(f"{args.train}: {len(data.labels.source)} labels {data.labels.source}, but the "
                           f"teacher has {num_labels} classes")
    return data


def run_distill(args: argparse.Namespace) -> None:
    from training.cli import CommandError, output_paths

    try:
        cfg = config_from(distill_methods()[args.method].config, distill_values(args))
    except ValueError as e:  # e.g. a TOML key of another method
        raise CommandError(f"--method {args.method}: {e}") from None
    checkpoint = output_paths(args)
    if checkpoint.resolve() == Path(args.teacher).resolve():
        raise CommandError(f"--checkpoint {checkpoint} is the teacher's folder: the student would overwrite it")

    from training import loop
    from training.cli import interrupted, start_runtime
    from training.publish import save_and_export
    from training.distill import distil
    from training.progress import phase
    from training.staging import Staged
    from training.task import load_task
    from training.teacher import find_tokenizer, load_teacher

    try:
        teacher, teacher_meta = load_teacher(args.teacher)
        tokenizer = find_tokenizer(args.teacher, args.tokenizer)
    except ValueError as e:
        raise CommandError(str(e)) from None
    # Everything that can be refused is checked before anything is written.
    data = teacher_labels(args, teacher_meta, teacher.num_labels, cfg.limit_train)
    recipe = {"method": args.method, **dataclasses.asdict(cfg), "exits": "fastbert self-distillation"}
    runtime = start_runtime(args, checkpoint, data, recipe)
    teacher.to(runtime.device)
    try:
        with Staged(checkpoint, scratch=not runtime.is_main) as staged:
            # The student checkpoint carries the tokenizer, so it can itself be a teacher later; the
            # task reads it from there.
            shutil.copyfile(tokenizer, staged.path / "tokenizer.json")
            task = load_task(str(staged.path), max_seq_length=cfg.max_seq_length, workdir=staged.path, data=data)
            task.teacher = str(args.teacher)
            task.runtime = runtime
            task.log_file = staged.path / "train_log.jsonl"
            task.log_file.write_text("")
            runtime.restore_log(task.log_file)
            with phase("teacher dev accuracy", f"{len(task.dev):,} rows") as p:
                teacher_accuracy = loop.layer_accuracy(teacher, task.dev, runtime)[-1]
                p.result = f"last layer {teacher_accuracy:.4f}"
            log.info("teacher dev accuracy (last layer): %.4f", teacher_accuracy)

            start = time.perf_counter()
            model = distil(args.method, teacher, task, cfg)
            accuracy = save_and_export(args, task, model, staged, cfg.max_seq_length, cfg.seed,
                                       {**recipe, "teacher_dev_accuracy": teacher_accuracy},
                                       time.perf_counter() - start, {"teacher": str(args.teacher)})
    except KeyboardInterrupt:
        raise interrupted(runtime) from None
    runtime.finish()
    if runtime.is_main:
        print(f"dev accuracy {accuracy[-1]:.4f} at full depth, teacher {teacher_accuracy:.4f}")
