"""The data of a multi-task run: one train/dev pair per task, read and checked like any run's
(training/labels.py), tokenised by the one shared tokenizer, and mini-batches drawn task by task
in proportion to each task's size (MT-DNN: every epoch, all tasks' batches in one random order).

A task is `NAME=TRAIN,DEV` on the command line (or a [tasks.NAME] table of the recipe). Its kind
comes from its labels: all numbers, and not all whole numbers (STS-B's "3.800"), is regression;
anything else is classification. `--regression NAME` says so where the labels cannot.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from app.encoding import TextEncoder
from app.manifest import DataFileRecord
from training.data import DataError, Example, TextFile, read_examples
from training.dataset import Batch, EncodedDataset
from training.glue_metrics import main_metric
from training.labels import hold_out, read_task_data

log = logging.getLogger("offramp.train")

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_WHOLE = re.compile(r"^[-+]?\d+$")


@dataclass(frozen=True)
class TaskFiles:
    name: str
    train: Path
    dev: Path


def parse_task(value: str) -> TaskFiles:
    """`NAME=TRAIN,DEV` (the --task option)."""
    name, sep, files = value.partition("=")
    parts = [p.strip() for p in files.split(",")] if sep else []
    if not sep or len(parts) != 2 or not all(parts):
        raise DataError(f"--task {value!r}: expected NAME=TRAIN,DEV (e.g. rte=glue/RTE/train.tsv,glue/RTE/dev.tsv)")
    if not TASK_NAME.match(name.strip()):
        raise DataError(f"--task {value!r}: the name {name!r} must be letters, digits, '_', '-' or '.'")
    return TaskFiles(name.strip(), Path(parts[0]), Path(parts[1]))


def is_regression(file: TextFile) -> bool:
    labels = {e.label for e in file.examples if e.label is not None}
    return bool(labels) and all(_NUMBER.match(x) for x in labels) and not all(_WHOLE.match(x) for x in labels)


class ScoredDataset(EncodedDataset):
    """A regression task's rows: `targets` float32 [rows]; batches carry them as float labels."""

    def __init__(self, examples: Sequence[Example], encoder: TextEncoder):
        super().__init__(examples, encoder, None)
        self.targets = np.array([float(e.label) for e in self.examples], dtype=np.float32)

    def collate(self, rows: Sequence[int]) -> Batch:
        batch = super().collate(rows)
        batch.labels = torch.from_numpy(self.targets[list(rows)])
        return batch


@dataclass
class TaskPart:
    """One task of the run, encoded."""

    name: str
    kind: str  # "classification" | "regression"
    labels: list[str]  # served names (none for regression)
    source_labels: list[str]
    text_pair: bool
    metric: str
    train: EncodedDataset
    dev: EncodedDataset
    calibration: EncodedDataset | None
    records: dict[str, DataFileRecord] = field(default_factory=dict)
    score_range: tuple[float, float] | None = None

    @property
    def width(self) -> int:
        return 1 if self.kind == "regression" else len(self.labels)

    @property
    def positive(self) -> int:
        """The class F1 is computed for: the one the files write as "1" (GLUE's), else the second."""
        return self.source_labels.index("1") if "1" in self.source_labels else min(1, self.width - 1)


def _record(file: TextFile, rows: int, fraction: float | None = None) -> DataFileRecord:
    return DataFileRecord(path=str(file.path), sha256=file.sha256, rows=rows, held_out_fraction=fraction)


def _scores(file: TextFile, task: str) -> list[Example]:
    for e in file.examples:
        if e.label is None or not _NUMBER.match(e.label):
            raise DataError(f"{file.path} line {e.line}: label {e.label!r} is not a number (task {task} is a "
                            f"regression task)")
    return file.examples


def read_part(files: TaskFiles, encoder: TextEncoder, calibration_split: float, limit_train: int | None = None,
              label_names: Sequence[str] | None = None, regression: bool | None = None) -> TaskPart:
    """One task's files, checked (a bad row is one line naming the file and the line), encoded."""
    train = read_examples(files.train, require_labels=True)
    kind = "regression" if (is_regression(train) if regression is None else regression) else "classification"
    if kind == "regression":
        dev = read_examples(files.dev, require_labels=True)
        used = _scores(train, files.name)[:limit_train] if limit_train else _scores(train, files.name)
        _scores(dev, files.name)
        kept, held = hold_out(used, calibration_split) if calibration_split > 0 else (used, [])
        if (dev.examples[0].text_pair is None) != (train.examples[0].text_pair is None):
            raise DataError(f"{dev.path}: {len(dev.text_columns)} text column(s) but the training file {train.path} "
                            f"has {len(train.text_columns)}")
        targets = np.array([float(e.label) for e in kept])
        part = TaskPart(files.name, kind, [], [], train.examples[0].text_pair is not None, "pearson",
                        ScoredDataset(kept, encoder), ScoredDataset(dev.examples, encoder),
                        ScoredDataset(held, encoder) if held else None,
                        score_range=(float(targets.min()), float(targets.max())))
        if not part.score_range[1] > part.score_range[0]:
            raise DataError(f"{train.path}: every score is {part.score_range[0]}: nothing to learn")
        dev_file, n_train, n_held = dev, len(kept), len(held)
    else:
        data = read_task_data(files.train, files.dev, label_names=label_names, limit_train=limit_train,
                              calibration_split=calibration_split)
        source = list(data.labels.source)
        part = TaskPart(files.name, kind, list(data.labels.names), source,
                        data.train_examples[0].text_pair is not None, main_metric(files.name, kind),
                        EncodedDataset(data.train_examples, encoder, source),
                        EncodedDataset(data.dev.examples, encoder, source),
                        EncodedDataset(data.calibration_examples, encoder, source) if data.calibration_examples else None)
        dev_file, n_train, n_held = data.dev, len(data.train_examples), len(data.calibration_examples or [])
    part.records = {"train": _record(train, n_train), "dev": _record(dev_file, len(dev_file.examples))}
    if n_held:
        part.records["calibration"] = _record(train, n_held, calibration_split)
    log.info("task %s: %s, %s rows to train on, %s dev rows%s, metric %s", files.name, kind, f"{n_train:,}",
             f"{len(part.dev):,}", f", {n_held:,} held out for calibration" if n_held else "", part.metric)
    return part


@dataclass
class TaskBatch(Batch):
    """A training batch of one task's rows (`task`: its index among the run's tasks)."""

    task: int = 0

    def select(self, rows: slice) -> TaskBatch:
        part = super().select(rows)
        return TaskBatch(**vars(part), task=self.task)

    def to(self, device) -> TaskBatch:
        return TaskBatch(**vars(super().to(device)), task=self.task)


class MultiTaskDataset:
    """The training rows of every task: what the one training loop (training/loop.py) iterates.
    Each batch is one task's (its own length buckets); with shuffle, every task's batches of the
    epoch in one random order, so a task is drawn in proportion to its size."""

    def __init__(self, parts: Sequence[EncodedDataset]):
        self.parts = list(parts)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def num_batches(self, batch_size: int) -> int:
        return sum(p.num_batches(batch_size) for p in self.parts)

    def batches(self, batch_size: int, shuffle: bool, seed: int = 0) -> Iterator[TaskBatch]:
        order = [(t, b) for t, part in enumerate(self.parts) for b in range(part.num_batches(batch_size))]
        if shuffle:
            random.Random(seed).shuffle(order)
        streams = [part.batches(batch_size, shuffle, seed + 7919 * t) for t, part in enumerate(self.parts)]
        for t, _ in order:
            yield TaskBatch(**vars(next(streams[t])), task=t)
