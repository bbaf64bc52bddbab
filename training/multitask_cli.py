"""`offramp train multitask`: tasks -> teacher ensembles -> multi-task student with exits -> one bundle.

    offramp train multitask --task sst2=SST-2/train.tsv,SST-2/dev.tsv --task stsb=... \\
        --teacher ENCODER --out models/glue-mt [--ensemble-size 3] [--teachers rte=CK1,CK2,CK3]

A recipe (--config) may list the tasks as [tasks.NAME] tables (train, dev, and optionally
label_names, regression). Every file is read and checked before anything is trained. Finished
ensemble members are kept (default runs/NAME-teachers/TASK/seedS) and reused by a rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
import types
from pathlib import Path

from training.cli import (add_recipe_arguments, add_run_arguments, command, interrupted, output_paths,
                          read_config, recipe_values, start_runtime)
from training.config import config_from
from training.errors import CommandError

log = logging.getLogger("offramp.train")


def add_multitask_arguments(p: argparse.ArgumentParser) -> None:
    from training.methods.multitask import MultiTaskConfig

    p.add_argument("--task", action="append", default=[], metavar="NAME=TRAIN,DEV",
                   help="a task and its labelled train and dev files (repeat for each task)")
    p.add_argument("--teacher", required=True, help="local folder or hub id of the BERT-family encoder")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write, e.g. models/NAME")
    p.add_argument("--config", type=Path, help="TOML recipe (may list [tasks.NAME]); options override it")
    p.add_argument("--checkpoint", type=Path, help="where the PyTorch checkpoint goes (default runs/NAME)")
    p.add_argument("--teachers-dir", type=Path, help="where ensemble members go (default runs/NAME-teachers)")
    p.add_argument("--teachers", action="append", default=[], metavar="NAME=DIR,DIR,...",
                   help="a task's ensemble as given checkpoints (`offramp train fastbert --checkpoint` folders "
                        "or members of an earlier run) instead of training them")
    p.add_argument("--student-from", type=Path, metavar="CHECKPOINT",
                   help="take the encoder and classifiers of a finished multi-task checkpoint (its --checkpoint "
                        "folder) and only train the exits afresh (--distill-*), calibrate and export")
    p.add_argument("--label-names", action="append", default=[], metavar="NAME=A,B",
                   help="names to serve for a task's labels (as --label-names of `train fastbert`)")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=N",
                   help="train on the first N rows of the task's training file (overrides --limit-train)")
    p.add_argument("--regression", action="append", default=[], metavar="NAME",
                   help="treat the task as regression whatever its labels look like")
    p.add_argument("--calibration-split", type=float, default=0.1, metavar="F",
                   help="fraction of each task's training rows held out for its exit calibration (default 0.1)")
    p.add_argument("--calibration-tolerance", type=float, default=1.0,
                   help="points each task's recommended setting may lose against full depth (default 1)")
    p.add_argument("--calibration-rule", choices=["risk", "tolerance"], default="risk",
                   help="risk: the setting Learn-then-Test certifies to lose at most the tolerance in "
                        "accuracy with probability 1 - --calibration-epsilon (default); tolerance: the fastest "
                        "setting within the tolerance on the calibration rows")
    p.add_argument("--calibration-epsilon", type=float, default=0.1, metavar="E",
                   help="the risk rule's allowed probability of exceeding the tolerance (default 0.1)")
    p.add_argument("--threads", type=int, help="torch threads per process (default: the CPU quota / processes)")
    add_run_arguments(p)
    add_recipe_arguments(p, MultiTaskConfig)


def _named_lists(values: list[str], option: str) -> dict[str, list[str]]:
    out = {}
    for value in values:
        name, sep, items = value.partition("=")
        if not sep or not name or not items:
            raise CommandError(f"{option} {value!r}: expected NAME=A,B,...")
        out[name] = [x.strip() for x in items.split(",") if x.strip()]
    return out


def task_specs(args: argparse.Namespace) -> tuple[list, dict, set]:
    """The tasks of the command line, else of the recipe: (TaskFiles list, label names, regression)."""
    from training.multitask_data import TaskFiles, parse_task

    specs = [parse_task(v) for v in args.task]
    names = _named_lists(args.label_names, "--label-names")
    regression = set(args.regression)
    if not specs:
        for name, table in (read_config(args.config).get("tasks") or {}).items():
            if not isinstance(table, dict) or "train" not in table or "dev" not in table:
                raise CommandError(f"--config {args.config}: [tasks.{name}] needs train and dev")
            specs.append(TaskFiles(name, Path(table["train"]), Path(table["dev"])))
            if table.get("label_names"):
                names.setdefault(name, list(table["label_names"]))
            if table.get("regression"):
                regression.add(name)
    if not specs:
        raise CommandError("no task: give --task NAME=TRAIN,DEV (or [tasks.NAME] in --config)")
    seen = [s.name for s in specs]
    if len(set(seen)) != len(seen):
        raise CommandError(f"--task: a task name is given twice: {seen}")
    for option, named in (("--label-names", names), ("--teachers", {}), ("--regression", dict.fromkeys(regression))):
        stray = sorted(set(named) - set(seen))
        if stray:
            raise CommandError(f"{option} names {stray}, not among the tasks {seen}")
    return specs, names, regression


def run_multitask(args: argparse.Namespace) -> None:
    from training.methods.multitask import MultiTaskConfig

    try:
        recipe_options = recipe_values(args, MultiTaskConfig)
        recipe_options.pop("tasks", None)
        cfg = config_from(MultiTaskConfig, recipe_options)
    except ValueError as e:
        raise CommandError(str(e)) from None
    specs, label_names, regression = task_specs(args)
    given = {k: [Path(p) for p in v] for k, v in _named_lists(args.teachers, "--teachers").items()}
    stray = sorted(set(given) - {s.name for s in specs})
    if stray:
        raise CommandError(f"--teachers names {stray}, not among the tasks {[s.name for s in specs]}")
    limits = {}
    for name, values in _named_lists(args.limit, "--limit").items():
        if name not in {s.name for s in specs} or len(values) != 1 or not values[0].isdigit() or int(values[0]) < 1:
            raise CommandError(f"--limit {name}={','.join(values)}: expected a task's name = a row count")
        limits[name] = int(values[0])
    checkpoint = output_paths(args)
    if args.student_from and cfg.joint_exits:
        raise CommandError("--joint-exits trains the student, which --student-from keeps: give one of them")
    if args.student_from and args.student_from.resolve() == checkpoint.resolve():
        raise CommandError(f"--student-from {args.student_from}: give another --checkpoint to write to")
    teachers_dir = args.teachers_dir or checkpoint.with_name(checkpoint.name + "-teachers")

    from app.encoding import TextEncoder
    from training.multitask_data import read_part
    from training.staging import Staged
    from training.task import resolve_tokenizer

    with Staged(checkpoint) as staged:
        tokenizer_file = resolve_tokenizer(args.teacher, staged.path)
        encoder = TextEncoder.from_file(tokenizer_file, cfg.max_seq_length)
        parts = [read_part(s, encoder, args.calibration_split, limits.get(s.name, cfg.limit_train), label_names.get(s.name),
                           True if s.name in regression else None) for s in specs]
        recipe = {"method": "multitask", **dataclasses.asdict(cfg),
                  "tasks": {p.name: {"train": p.records["train"].sha256, "dev": p.records["dev"].sha256}
                            for p in parts}}
        if args.student_from:
            recipe["student_from"] = str(args.student_from)
        runtime = start_runtime(args, checkpoint, types.SimpleNamespace(train=None, dev=None, unlabeled=None), recipe)
        try:
            _train_and_export(args, cfg, parts, given, teachers_dir, tokenizer_file, staged, recipe, runtime)
        except KeyboardInterrupt:
            raise interrupted(runtime) from None
    runtime.finish()


def _train_and_export(args, cfg, parts, given, teachers_dir, tokenizer_file, staged, recipe, runtime) -> None:
    import shlex
    import shutil
    import sys
    import datetime

    from app.manifest import Provenance
    from training.export_multitask import CalibrationRule, export_multitask_bundle
    from training.methods.multitask import OneTask, build_ensemble, evaluate, retrain_exits, train_student
    from training.publish import git_commit, versions

    log_file = staged.path / "train_log.jsonl"
    log_file.write_text("")
    start = time.perf_counter()
    ensembles, teachers = {}, {}
    if args.student_from:
        try:
            model, meta = retrain_exits(args.student_from, parts, cfg, runtime, log_file)
        except (OSError, ValueError, KeyError) as e:
            raise CommandError(f"--student-from {args.student_from}: {e}") from None
        teachers = (meta.get("summary") or {}).get("teachers", {})
    elif cfg.ensemble_size > 0 or given:
        for part in parts:
            ensembles[part.name] = build_ensemble(part, args.teacher, cfg, teachers_dir, given.get(part.name, ()),
                                                  runtime)
    teachers_s = time.perf_counter() - start
    if not args.student_from:
        model = train_student(parts, args.teacher, cfg, {n: e.soft_targets for n, e in ensembles.items()}, runtime,
                              log_file)
        teachers = {n: {"members": [str(m) for m in e.members], "dev": e.dev, "dev_ensemble": e.dev_ensemble}
                    for n, e in ensembles.items()}
    dev = {p.name: evaluate(OneTask(model, p.name), p, runtime) for p in parts}
    if not runtime.is_main:
        return
    for p in parts:
        log.info("task %s: dev at full depth %s", p.name, ", ".join(f"{k} {v:.4f}" for k, v in dev[p.name][-1].items()))
    model.cpu()
    summary = {"teachers": teachers,
               "student_dev": {n: d[-1] for n, d in dev.items()},
               "wall_time_s": {"teachers": round(teachers_s, 1), "total": round(time.perf_counter() - start, 1)}}
    model.save(staged.path, {"recipe": recipe, "summary": summary})
    shutil.copyfile(tokenizer_file, staged.path / "tokenizer.json")
    (staged.path / "summary.json").write_text(json.dumps(summary, indent=2))
    final = staged.publish()
    log.info("checkpoint written to %s", final)
    provenance = Provenance(
        teacher=str(args.teacher), command=shlex.join(["offramp", *getattr(args, "argv", sys.argv[1:])]),
        seed=cfg.seed, git_commit=git_commit(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        recipe={**recipe, "ensembles": summary["teachers"]}, versions=versions(),
        wall_time_s=round(time.perf_counter() - start, 1), checkpoint=str(final), distributed=runtime.describe())
    export_multitask_bundle(model, parts, final / "tokenizer.json", args.out, name=args.out.name,
                            max_seq_length=cfg.max_seq_length, provenance=provenance, dev_results=dev,
                            rule=CalibrationRule(args.calibration_rule, args.calibration_tolerance,
                                                 args.calibration_epsilon))
    print(f"bundle written to {args.out} (checkpoint {final})")


def register(methods) -> None:
    p = methods.add_parser("multitask", help="MT-DNN-KD: teacher ensembles per task distilled into one "
                                             "multi-task student with exits for every task")
    add_multitask_arguments(p)
    p.set_defaults(func=command(run_multitask))
