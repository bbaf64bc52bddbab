"""A task: the teacher, its tokenizer, the label mapping and the encoded data files."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from app.encoding import TextEncoder
from app.manifest import DataFileRecord
from training.data import TextFile, label_vocabulary, read_examples
from training.dataset import EncodedDataset


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
    records: dict[str, DataFileRecord] = field(default_factory=dict)
    log_file: Path | None = None


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
    train_path: Path,
    dev_path: Path,
    unlabeled_path: Path | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    max_seq_length: int = 128,
    limit_train: int | None = None,
    workdir: Path | None = None,
) -> Task:
    train_file = read_examples(train_path, text_columns, label_column, require_labels=True)
    dev_file = read_examples(dev_path, text_columns, label_column, require_labels=True)
    train_examples = train_file.examples[:limit_train] if limit_train else train_file.examples
    raw_labels = label_vocabulary(e.label for e in train_file.examples)
    labels = list(raw_labels)
    if label_names:
        if len(label_names) != len(raw_labels):
            raise ValueError(f"--label-names gives {len(label_names)} names for "
                             f"{len(raw_labels)} labels {raw_labels}")
        labels = list(label_names)
    unseen = sorted({e.label for e in dev_file.examples} - set(raw_labels))
    if unseen:
        raise ValueError(f"{dev_path}: labels {unseen} do not occur in {train_path}")

    workdir = Path(workdir or tempfile.mkdtemp(prefix="offramp-"))
    tokenizer_file = resolve_tokenizer(teacher, workdir)
    encoder = TextEncoder.from_file(tokenizer_file, max_seq_length)
    text_pair = train_examples[0].text_pair is not None
    train = EncodedDataset(train_examples, encoder, raw_labels)
    dev = EncodedDataset(dev_file.examples, encoder, raw_labels)
    records = {"train": _record(train_file, len(train_examples)),
               "dev": _record(dev_file, len(dev_file.examples))}
    distill = train
    if unlabeled_path is not None:
        extra = read_examples(unlabeled_path, text_columns, None)
        distill = EncodedDataset(train_examples + extra.examples, encoder, raw_labels)
        records["unlabeled"] = _record(extra, len(extra.examples))
    return Task(teacher=str(teacher), labels=labels, source_labels=raw_labels, text_pair=text_pair, encoder=encoder,
                tokenizer_file=tokenizer_file, train=train, dev=dev, distill_data=distill,
                records=records)
