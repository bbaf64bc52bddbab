"""`offramp train ...`: argument parsing and the data file -> recipe -> bundle pipeline."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import signal
import sys
import time
import tomllib
from pathlib import Path

from app.manifest import ManifestError
from app.threads import cpu_quota
from training import publish
from training.config import config_from
from training.data import DataError
from training.errors import CommandError
from training.staging import BUNDLE_MARKER, CHECKPOINT_LEFTOVERS, CHECKPOINT_MARKER, Staged, check_replaceable

log = logging.getLogger("offramp.train")

# What a user can fix (training/errors.py): shown as `offramp: error: MESSAGE` on stderr, exit
# code 2, no traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (DataError, ManifestError, CommandError)
EXIT_USER_ERROR = 2


def fail(message: object) -> None:
    """Print `offramp: error: MESSAGE` (one line) to stderr and exit with code 2."""
    line = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"offramp: error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def command(func):
    """Wrap a subcommand: user errors (USER_ERRORS, or SystemExit with a message) become one
    line on stderr and exit code 2."""
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> None:
        try:
            func(args)
        except USER_ERRORS as exc:
            fail(exc)
        except SystemExit as exc:
            if isinstance(exc.code, str):
                fail(exc.code)
            raise
    return run


LABELS_HELP = ("comma-separated labels as the files write them, in class-id order: the label set "
               "(a label outside it is refused; one it has that a file lacks is fine). Default: every "
               "label of --train and --dev, refusing a label found in one file only when it is rare there "
               "or only in --dev")
LABEL_NAMES_HELP = ("comma-separated names to serve. The files' own labels in another order are matched "
                    "by name (and set the class-id order); other names rename numeric labels (0,1,...) "
                    "or the --labels order by position")


def add_data_arguments(p: argparse.ArgumentParser, unlabeled_help: str, label_names_help: str) -> None:
    """What every training command takes besides its teacher: data, output, recipe file."""
    p.add_argument("--train", required=True, type=Path, help="TSV, CSV or JSONL training file")
    p.add_argument("--dev", required=True, type=Path, help="labelled dev file (evaluation, calibration)")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write, e.g. models/NAME")
    p.add_argument("--unlabeled", type=Path, help=unlabeled_help)
    p.add_argument("--text-columns", help="comma-separated text column(s): names, or indices for headerless files")
    p.add_argument("--label-column")
    p.add_argument("--labels", help=LABELS_HELP)
    p.add_argument("--label-names", help=label_names_help)
    p.add_argument("--config", type=Path, help="TOML recipe; command-line options override it")
    p.add_argument("--checkpoint", type=Path, help="where the PyTorch checkpoint goes (default runs/NAME)")
    p.add_argument("--calibration-tolerance", type=float, default=0.5,
                   help="accuracy points below full depth the recommended threshold may lose")
    p.add_argument("--calibration", type=Path, metavar="FILE",
                   help="labelled rows to fit the exit calibration on (not the --dev file)")
    p.add_argument("--calibration-split", type=float, default=0.1, metavar="F",
                   help="without --calibration: this fraction of --train is held out of training and the "
                        "calibration is fitted on it, so dev figures stay out of sample (default 0.1; 0: "
                        "calibrate on dev, in sample)")
    p.add_argument("--threads", type=int, help="torch threads per process (default: the CPU quota / processes)")
    add_run_arguments(p)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Where and how a run trains (training/runtime.py): every training command has them."""
    from training.runtime import DEVICES, MIXED_PRECISION

    g = p.add_argument_group("device, precision, processes, resumption (docs/training.md)")
    g.add_argument("--device", choices=DEVICES, default="auto",
                   help="single-process runs: where to train (auto: CUDA, else Apple MPS, else CPU); "
                        "under accelerate launch / torchrun the launcher decides")
    g.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="no",
                   help="autocast the forward and backward passes (weights, export and bundle stay fp32)")
    g.add_argument("--grad-accum", type=int, default=1, metavar="N",
                   help="split each process's batch into N micro-batches, one optimiser step per batch: "
                        "the recipe's batch in 1/N of the memory")
    g.add_argument("--log-every", type=int, default=50, metavar="N",
                   help="optimiser steps per line of the loss log (train_log.jsonl; default 50)")
    g.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="every N optimiser steps, write a resumable state (model, optimiser, scheduler, "
                        "random states, data position) to --state-dir")
    g.add_argument("--state-dir", type=Path,
                   help="where --save-every writes (default: the checkpoint folder + '-state', or --resume)")
    g.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the interrupted run whose state is in DIR (the same command otherwise)")


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="local model folder or hub id of a BERT-family encoder")
    add_data_arguments(p, "extra text for self-distillation of the exits",
                       LABEL_NAMES_HELP + " (e.g. negative,positive)")
    p.add_argument("--from-checkpoint", type=Path,
                   help="start from a saved early-exit checkpoint (with --epochs 0: retrain the exits only)")


def text_columns_of(args: argparse.Namespace) -> list[str] | None:
    return args.text_columns.split(",") if args.text_columns else None


def read_data(args: argparse.Namespace, limit_train: int | None, labels: list[str] | None = None,
              labels_origin: str = "--labels", label_names: list[str] | None = None):
    """The run's data files, read and checked (labels included) and logged: before anything is
    written. `labels`/`label_names` default to --labels/--label-names."""
    from training.labels import parse_list, read_task_data

    if labels is None:
        labels = parse_list(args.labels, "--labels")
    if label_names is None:
        label_names = parse_list(args.label_names, "--label-names")
    return read_task_data(args.train, args.dev, args.unlabeled, text_columns_of(args), args.label_column,
                          label_names, limit_train, labels, labels_origin,
                          getattr(args, "calibration", None), getattr(args, "calibration_split", 0.0))


def output_paths(args: argparse.Namespace) -> Path:
    """The checkpoint folder (default runs/NAME), after checking that it and --out may be
    replaced: each absent, empty, or written by offramp (a bundle, a checkpoint)."""
    checkpoint = args.checkpoint or Path("runs") / args.out.name
    out, ckpt = args.out.resolve(), checkpoint.resolve()
    if out == ckpt or out in ckpt.parents or ckpt in out.parents:
        raise CommandError(f"--out {args.out} and --checkpoint {checkpoint} must be separate folders")
    check_replaceable(args.out, BUNDLE_MARKER, "--out")
    check_replaceable(checkpoint, CHECKPOINT_MARKER, "--checkpoint", CHECKPOINT_LEFTOVERS)
    return checkpoint


def add_recipe_arguments(p: argparse.ArgumentParser, config_cls) -> None:
    for f in dataclasses.fields(config_cls):
        kind = {"int": int, "float": float, "str": str, "int | None": int}.get(str(f.type), str)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                       help=f"recipe option (default {f.default})")


def read_config(path: Path | None) -> dict:
    """The --config TOML recipe file as a dict ({} without one)."""
    if path is None:
        return {}
    try:
        return tomllib.loads(path.read_text())
    except OSError as e:
        raise CommandError(f"--config {path}: cannot read file: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise CommandError(f"--config {path}: invalid TOML: {e}") from e


def recipe_values(args: argparse.Namespace, config_cls) -> dict:
    values = read_config(args.config)
    for f in dataclasses.fields(config_cls):
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return values


def start_runtime(args: argparse.Namespace, checkpoint: Path, data, recipe: dict):
    """The run's Runtime (device, precision, processes, resumable state) and its torch threads.
    A resumed run must match the saved one in `recipe`, data and precision."""
    import torch

    from training.runtime import RunSettings, Runtime, fingerprint_of

    files = {name: getattr(file, "sha256", None)
             for name, file in (("train", data.train), ("dev", data.dev), ("unlabeled", data.unlabeled))}
    state_dir = args.state_dir or args.resume or checkpoint.with_name(checkpoint.name + "-state")
    settings = RunSettings(
        device=args.device, mixed_precision=args.mixed_precision, grad_accum=args.grad_accum,
        save_every=args.save_every, log_every=args.log_every, state_dir=state_dir, resume=args.resume,
        fingerprint=fingerprint_of({"recipe": recipe, **files, "teacher": str(args.teacher),
                                    "mixed_precision": args.mixed_precision, "grad_accum": args.grad_accum}))
    if args.save_every < 0:
        raise CommandError(f"--save-every {args.save_every}: must be 0 (never) or more")
    if args.log_every < 1:
        raise CommandError(f"--log-every {args.log_every}: must be 1 or more")
    runtime = Runtime(settings)
    # A stop asked for by the system (Kubernetes evicting the pod, torchrun stopping its workers)
    # is handled like Ctrl-C: partial outputs removed, and the way to resume printed.
    signal.signal(signal.SIGTERM, _interrupt)
    torch.set_num_threads(args.threads or max(1, cpu_quota() // runtime.local_world_size))
    if runtime.world_size > 1:
        log.info("process %d of %d on %s (%s)", runtime.rank + 1, runtime.world_size, runtime.device,
                 runtime.describe()["backend"])
    return runtime


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def interrupted(runtime) -> CommandError:
    """What to tell a user whose run stopped: where its last resumable state is."""
    state = runtime.settings.state_dir
    if runtime.settings.save_every and state is not None and Path(state).is_dir():
        return CommandError(f"interrupted at run step {runtime.global_step}; the last resumable state is in "
                            f"{state}: run the same command with --resume {state}")
    return CommandError(f"interrupted at run step {runtime.global_step} (no resumable state: pass --save-every N)")


def run_fastbert(args: argparse.Namespace) -> None:
    try:
        from training.methods.fastbert import FastBertConfig

        cfg = config_from(FastBertConfig, recipe_values(args, FastBertConfig))
    except ValueError as e:  # e.g. an unknown TOML key
        raise CommandError(str(e)) from None
    # Everything that can be refused is checked before anything is written.
    checkpoint = output_paths(args)
    data = read_data(args, cfg.limit_train)

    from training.methods.fastbert import train_fastbert
    from training.task import load_task

    recipe = {"method": "fastbert", **dataclasses.asdict(cfg)}
    runtime = start_runtime(args, checkpoint, data, recipe)
    initial = None
    if args.from_checkpoint:
        from training.model import EarlyExitModel

        initial, meta = EarlyExitModel.load(args.from_checkpoint)
        if meta.get("labels") and meta["labels"] != data.labels.names:
            raise CommandError(f"--from-checkpoint {args.from_checkpoint}: labels {meta['labels']} differ "
                               f"from {data.labels.names}")
        if meta.get("source_labels") and meta["source_labels"] != data.labels.source:
            raise CommandError(f"--from-checkpoint {args.from_checkpoint}: file labels {meta['source_labels']} "
                               f"(in class-id order) differ from {data.labels.source}; give --labels "
                               f"{','.join(meta['source_labels'])}")
    try:
        with Staged(checkpoint, scratch=not runtime.is_main) as staged:
            task = load_task(args.teacher, max_seq_length=cfg.max_seq_length, workdir=staged.path, data=data)
            task.runtime = runtime
            task.log_file = staged.path / "train_log.jsonl"
            task.log_file.write_text("")
            runtime.restore_log(task.log_file)
            start = time.perf_counter()
            model = train_fastbert(task, cfg, initial)
            publish.save_and_export(args, task, model, staged, cfg.max_seq_length, cfg.seed, recipe,
                            time.perf_counter() - start)
    except KeyboardInterrupt:
        raise interrupted(runtime) from None
    runtime.finish()


def register(subparsers, train_methods: bool = True) -> None:
    from training.bundle_cli import register_bundle_commands

    register_bundle_commands(subparsers)
    if train_methods:
        register_train(subparsers)
    else:  # `offramp serve` and friends never import torch: `train` is built when it runs
        subparsers.add_parser("train", help=TRAIN_HELP, add_help=False)


TRAIN_HELP = "train and export a model bundle (offramp train --help lists the methods)"


def register_train(subparsers) -> None:
    """`offramp train METHOD ...`: one command per method with a command of its own, and
    `distill --method` for the rest, each with its recipe's options (training/methods/)."""
    from training.distill_cli import add_distill_arguments, run_distill
    from training.methods import METHODS, distill_methods

    train = subparsers.add_parser("train", help=TRAIN_HELP)
    methods = train.add_subparsers(dest="method", required=True)
    fastbert = METHODS["fastbert"]
    p = methods.add_parser("fastbert", help=fastbert.summary)
    add_task_arguments(p)
    add_recipe_arguments(p, fastbert.config)
    p.set_defaults(func=command(run_fastbert))

    names = ", ".join(distill_methods())
    distill = methods.add_parser("distill", help=f"distil a fastbert teacher checkpoint into a smaller "
                                 f"student ({names}), then give it exits")
    add_distill_arguments(distill)
    distill.set_defaults(func=command(run_distill))

    from training.multitask_cli import register as register_multitask

    register_multitask(methods)

    from training.generation_cli import register as register_generation

    register_generation(methods)
