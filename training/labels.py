"""The label set of a training run: which labels exist, their class ids and served names.

Read before anything is written, so a bad label fails in a second with its file and line
rather than after training. Pure standard library (like `training.data`).

Rules (also in README.md, "Training data"):

- Only labelled files count: the training and dev files. The unlabeled file has no labels.
- Without `--labels`, the label set is every label of the two files, numeric ids in numeric
  order, anything else sorted. A label found in one file only is suspicious:
  - in dev but not in training: refused (the model has no row to learn it from);
  - in training but not in dev: refused when it is rare there (fewer than
    max(RARE_ROWS, RARE_FRACTION x the file's rows) rows: a stray like one `maybe` in a 0/1
    file), otherwise accepted with a warning (dev cannot measure that class).
  A classifier also needs at least two labels.
- With `--labels a,b,c` the set and its class-id order are as given: a label outside it is
  refused with its file and line; a label of the set that a file lacks is fine.
- `--label-names` sets the served names:
  - the file's own labels (the same set) are matched by name, and their order becomes the
    class-id order (with `--labels` it must be the same order);
  - otherwise names rename by position: numeric labels in numeric order, or the `--labels`
    order; a name that is itself a label at another position is refused (that would swap
    classes);
  - anything else (other names for non-numeric labels, no `--labels`) is refused: there is no
    order to rename them by.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from training.data import DataError, Example, TextFile, label_vocabulary, read_examples

__all__ = ["LabelMap", "TaskData", "RARE_ROWS", "RARE_FRACTION", "resolve_labels", "read_task_data",
           "parse_list", "format_counts"]

log = logging.getLogger("offramp.train")

RARE_ROWS = 5
RARE_FRACTION = 0.01
_INTEGER = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class LabelMap:
    source: list[str]  # labels as the files write them, in class-id order
    names: list[str]  # served names, same order
    how: str  # how the names were matched, for the log

    def describe(self) -> str:
        """The log line of the label -> class id -> served name map."""
        pairs = ", ".join(f"{s} -> {n} (class {i})" if s != n else f"{s} (class {i})"
                          for i, (s, n) in enumerate(zip(self.source, self.names)))
        return f"labels ({self.how}): {pairs}"


# The held-out calibration rows do not change with a run's seed, so runs compare on the same rows.
CALIBRATION_SEED = 20261201


def hold_out(rows: list, fraction: float) -> tuple[list, list]:
    """(rows kept for training, rows held out): `fraction` of them, the same ones whatever the
    run's seed (CALIBRATION_SEED)."""
    count = max(1, round(len(rows) * fraction))
    if count >= len(rows):
        raise DataError(f"--calibration-split {fraction}: {len(rows)} training rows leave none to train on")
    held = set(random.Random(CALIBRATION_SEED).sample(range(len(rows)), count))
    return [e for i, e in enumerate(rows) if i not in held], [e for i, e in enumerate(rows) if i in held]


@dataclass
class TaskData:
    """The files of a run as read and checked: what `training.task.load_task` encodes."""
    train: TextFile
    dev: TextFile
    unlabeled: TextFile | None
    train_examples: list[Example]  # the training rows used (--limit-train), less the calibration rows
    labels: LabelMap
    # Rows the export calibrates on, never trained on and not the dev file: a split held out of
    # --train (--calibration-split) or --calibration FILE; none: calibration on dev (in sample).
    calibration_examples: list[Example] | None = None
    calibration_file: TextFile | None = None
    calibration_note: str = ""
    calibration_split: float | None = None  # the fraction held out of the training file, if that is where


def parse_list(value: str | None, option: str) -> list[str] | None:
    """A comma-separated option value; empty entries and duplicates are refused."""
    if value is None:
        return None
    items = [item.strip() for item in value.split(",")]
    if any(not item for item in items):
        raise DataError(f"{option} {value!r}: empty name in the comma-separated list")
    duplicates = sorted({item for item in items if items.count(item) > 1})
    if duplicates:
        raise DataError(f"{option} {value!r}: {', '.join(duplicates)} given more than once")
    return items


def format_counts(counts: Counter, order: Sequence[str] | None = None) -> str:
    order = list(order) if order is not None else label_vocabulary(counts)
    return ", ".join(f"{label} x {counts[label]:,}" for label in order if counts[label])


def _first_line(file: TextFile, label: str) -> str:
    line = next((e.line for e in file.examples if e.label == label), None)
    return f"{file.path} line {line}" if line is not None else str(file.path)


def _counts(file: TextFile) -> Counter:
    return Counter(e.label for e in file.examples if e.label is not None)


def rare_limit(rows: int) -> int:
    """Rows a label found in one file only needs there: max(RARE_ROWS, 1% of the file)."""
    return max(RARE_ROWS, math.ceil(rows * RARE_FRACTION))


def _label_set(train: TextFile, dev: TextFile, labels: Sequence[str] | None,
               labels_origin: str) -> tuple[list[str], list[str]]:
    """The label set in class-id order, and warnings to log."""
    counts = {"train": _counts(train), "dev": _counts(dev)}
    files = {"train": train, "dev": dev}
    warnings: list[str] = []
    if labels is not None:
        allowed = set(labels)
        for key in ("train", "dev"):
            outside = [label for label in counts[key] if label not in allowed]
            if outside:
                # The earliest offending line of the file.
                first = min(outside, key=lambda label: next(
                    e.line or 0 for e in files[key].examples if e.label == label))
                others = sorted(set(outside) - {first})
                more = f" (also {', '.join(repr(o) for o in others)})" if others else ""
                raise DataError(
                    f"{_first_line(files[key], first)}: label {first!r} is not among {labels_origin} "
                    f"{','.join(labels)}{more} (labels of this file: {format_counts(counts[key])})")
        if len(labels) < 2:
            raise DataError(f"{labels_origin} {','.join(labels)}: a classifier needs at least two labels")
        for label in labels:
            if not counts["train"][label]:
                warnings.append(f"label {label!r} of {labels_origin} has no row in {train.path}: "
                                f"the model cannot learn it")
        return list(labels), warnings

    hint = "give --labels to set the label set"
    for key, other in (("dev", "train"), ("train", "dev")):
        only = [label for label in counts[key] if not counts[other][label]]
        for label in sorted(only, key=lambda label: next(
                e.line or 0 for e in files[key].examples if e.label == label)):
            n, rows = counts[key][label], len(files[key].examples)
            where = f"{_first_line(files[key], label)}: label {label!r}"
            listing = f"(labels: {format_counts(counts[key])})"
            if key == "dev":
                raise DataError(
                    f"{where} occurs in no other file: never in the training file {train.path}, so no "
                    f"class can be learnt for it {listing}; {hint}")
            limit = rare_limit(rows)
            if n < limit:
                raise DataError(
                    f"{where} occurs in no other file {listing}; a label of one file only needs at least "
                    f"max({RARE_ROWS}, {RARE_FRACTION:.0%} of its rows) = {limit:,} rows there, this one has "
                    f"{n:,}; {hint}")
            warnings.append(f"label {label!r} occurs in {train.path} only ({n:,} rows), never in "
                            f"{dev.path}: dev accuracy cannot measure that class")
    found = label_vocabulary([*counts["train"], *counts["dev"]])
    if len(found) < 2:
        raise DataError(f"{train.path}: only one label ({', '.join(found)}) in the training and dev "
                        f"files; a classifier needs at least two")
    return found, warnings


def resolve_labels(train: TextFile, dev: TextFile, labels: Sequence[str] | None = None,
                   label_names: Sequence[str] | None = None,
                   labels_origin: str = "--labels") -> tuple[LabelMap, list[str]]:
    """The label set (see the module docstring) and the warnings to log."""
    source, warnings = _label_set(train, dev, labels, labels_origin)
    if label_names is None:
        return LabelMap(source, list(source), "as in the files" if labels is None else f"order of {labels_origin}"), warnings
    names = list(label_names)
    shown = ",".join(names)
    if len(set(names)) != len(names):
        raise DataError(f"--label-names {shown}: a name is given more than once")
    if len(names) != len(source):
        raise DataError(f"--label-names {shown} gives {len(names)} names for {len(source)} labels "
                        f"({', '.join(source)})")
    if set(names) == set(source):
        if labels is not None and names != list(source):
            raise DataError(
                f"--label-names {shown} lists the labels of {labels_origin} {','.join(source)} in another "
                f"order; the class-id order is that of {labels_origin}: give them in the same order or "
                f"leave out --label-names")
        return LabelMap(names, names, "matched by name, class ids in the order of --label-names"), warnings
    numeric = all(_INTEGER.fullmatch(label) for label in source)
    if labels is None and not numeric:
        raise DataError(
            f"--label-names {shown} are not the files' labels ({', '.join(source)}), and those are not "
            f"numeric ids, so there is no order to rename them by: give the labels themselves (in the "
            f"class-id order you want), or --labels {','.join(source)} --label-names {shown} to rename "
            f"in that order")
    for i, name in enumerate(names):
        if name in source and source[i] != name:
            raise DataError(
                f"--label-names {shown} would serve label {source[i]!r} as {name!r}, which is another "
                f"label of the files ({', '.join(source)}); give names that are not labels, or the "
                f"labels themselves")
    how = ("numeric ids renamed by position" if labels is None
           else f"renamed by position in the order of {labels_origin}")
    return LabelMap(list(source), names, how), warnings


def _columns(file: TextFile) -> str:
    names = ", ".join(repr(c) for c in file.text_columns)
    return f"text column{'s' if len(file.text_columns) > 1 else ''} {names}"


def read_task_data(
    train_path: Path,
    dev_path: Path,
    unlabeled_path: Path | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    limit_train: int | None = None,
    labels: Sequence[str] | None = None,
    labels_origin: str = "--labels",
    calibration_path: Path | None = None,
    calibration_split: float = 0.0,
) -> TaskData:
    """Read and check the data files of a run, and log what was read. With calibration_path, its
    rows are the calibration rows; else with calibration_split, that fraction of the training
    rows (the same rows whatever the run's seed) is held out of training for calibration."""
    if not 0.0 <= calibration_split < 1.0:
        raise DataError(f"--calibration-split {calibration_split}: a fraction in [0, 1) is required")
    train = read_examples(train_path, text_columns, label_column, require_labels=True)
    dev = read_examples(dev_path, text_columns, label_column, require_labels=True)
    unlabeled = read_examples(unlabeled_path, text_columns, None) if unlabeled_path is not None else None
    paired = train.examples[0].text_pair is not None
    for other in (dev, unlabeled):
        if other is not None and (other.examples[0].text_pair is not None) != paired:
            raise DataError(
                f"{other.path}: {len(other.text_columns)} text column(s) ({', '.join(other.text_columns)}) but "
                f"the training file {train.path} has {len(train.text_columns)} "
                f"({', '.join(train.text_columns)}); pass --text-columns")
    label_map, warnings = resolve_labels(train, dev, labels, label_names, labels_origin)
    used = train.examples[:limit_train] if limit_train else train.examples

    order = label_map.source
    for role, file in (("train", train), ("dev", dev)):
        log.info("%s %s: %s rows, %s, label column %r: %s", role, file.path, f"{len(file.examples):,}",
                 _columns(file), file.label_column, format_counts(_counts(file), order))
    if len(used) < len(train.examples):
        log.info("train: the first %s rows used (--limit-train): %s", f"{len(used):,}",
                 format_counts(Counter(e.label for e in used), order))
    if unlabeled is not None:
        log.info("unlabeled %s: %s rows, %s (labels, if any, not used)", unlabeled.path,
                 f"{len(unlabeled.examples):,}", _columns(unlabeled))
    log.info("%s", label_map.describe())
    for warning in warnings:
        log.warning("%s", warning)
    data = TaskData(train=train, dev=dev, unlabeled=unlabeled, train_examples=used, labels=label_map)
    if calibration_path is not None:
        file = read_examples(calibration_path, text_columns, label_column, require_labels=True)
        if Path(calibration_path).resolve() == Path(dev_path).resolve():
            raise DataError("--calibration is the --dev file: calibration must not be fitted on the rows it is "
                            "evaluated on (leave it out to hold out part of --train)")
        stray = next((e for e in file.examples if e.label not in label_map.source), None)
        if stray is not None:
            raise DataError(f"{file.path} line {stray.line}: label {stray.label!r} is not among the task's labels "
                            f"{list(label_map.source)}")
        data.calibration_examples, data.calibration_file = file.examples, file
        data.calibration_note = f"all of {file.path}"
    elif calibration_split > 0:
        data.train_examples, data.calibration_examples = hold_out(used, calibration_split)
        data.calibration_file, data.calibration_split = train, calibration_split
        data.calibration_note = (f"{len(data.calibration_examples):,} rows of {train.path} held out of training "
                                 f"(--calibration-split {calibration_split:g})")
    if data.calibration_examples is not None:
        log.info("calibration: %s; %s rows left to train on", data.calibration_note, f"{len(data.train_examples):,}")
    else:
        log.info("calibration: on the dev file (--calibration-split 0): its dev figures are in sample")
    return data
