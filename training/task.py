"""A task: the teacher, its tokenizer, the label mapping and the encoded data files."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from app.encoding import TextEncoder
from app.manifest import DataFileRecord
from training.data import TextFile
from training.dataset import EncodedDataset
from training.labels import TaskData, read_task_data
from training.runtime import Runtime


@dataclass
class Task:
    teacher: str
    labels: list[str]  # served names
    source_labels: list[str]  # as the training file writes them, same order
    text_pair: bool
    encoder: TextEncoder
    tokenizer_file: Path
    train: EncodedDataset
    dev: EncodedDataset
    distill_data: EncodedDataset  # train rows plus any unlabeled text
    calibration: EncodedDataset | None = None  # held-out rows the export calibrates on; None: dev
    records: dict[str, DataFileRecord] = field(default_factory=dict)
    log_file: Path | None = None
    runtime: Runtime | None = None  # where it trains (training/runtime.py); None: one local process


def resolve_tokenizer(teacher: str, workdir: Path) -> Path:
    """The teacher's tokenizer.json; converted with transformers when it only has vocab files."""
    local = Path(teacher) / "tokenizer.json"
    if local.is_file():
        return local
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher, use_fast=True)
    out = Path(workdir) / "tokenizer"
    tokenizer.save_pretrained(out)
    if not (out / "tokenizer.json").is_file():
        raise ValueError(f"{teacher}: no fast tokenizer (tokenizer.json) can be made")
    return out / "tokenizer.json"


def _record(file: TextFile, rows: int) -> DataFileRecord:
    return DataFileRecord(path=str(file.path), sha256=file.sha256, rows=rows)


def load_task(
    teacher: str,
    train_path: Path | None = None,
    dev_path: Path | None = None,
    unlabeled_path: Path | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    max_seq_length: int = 128,
    limit_train: int | None = None,
    workdir: Path | None = None,
    *,
    labels: Sequence[str] | None = None,
    data: TaskData | None = None,
) -> Task:
    """The task of a run: `data` as read and checked by `read_task_data` (read here from the
    paths when not given), tokenised with the teacher's tokenizer."""
    if data is None:
        data = read_task_data(train_path, dev_path, unlabeled_path, text_columns, label_column,
                              label_names, limit_train, labels)
    train_examples = data.train_examples
    raw_labels = list(data.labels.source)

    workdir = Path(workdir or tempfile.mkdtemp(prefix="offramp-"))
    tokenizer_file = resolve_tokenizer(teacher, workdir)
    encoder = TextEncoder.from_file(tokenizer_file, max_seq_length)
    text_pair = train_examples[0].text_pair is not None
    train = EncodedDataset(train_examples, encoder, raw_labels)
    dev = EncodedDataset(data.dev.examples, encoder, raw_labels)
    records = {"train": _record(data.train, len(train_examples)),
               "dev": _record(data.dev, len(data.dev.examples))}
    distill = train
    if data.unlabeled is not None:
        distill = EncodedDataset(train_examples + data.unlabeled.examples, encoder, raw_labels)
        records["unlabeled"] = _record(data.unlabeled, len(data.unlabeled.examples))
    calibration = None
    if data.calibration_examples:
        calibration = EncodedDataset(data.calibration_examples, encoder, raw_labels)
        records["calibration"] = _record(data.calibration_file, len(data.calibration_examples))
        records["calibration"].held_out_fraction = data.calibration_split
    return Task(teacher=str(teacher), labels=list(data.labels.names), source_labels=raw_labels,
                text_pair=text_pair, encoder=encoder, tokenizer_file=tokenizer_file, train=train, dev=dev,
                distill_data=distill, calibration=calibration, records=records)
