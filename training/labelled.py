"""A labelled data file as a bundle takes it: model inputs and class ids through the manifest's
one label mapping. Used by quantisation here and by every benchmark in `bench/`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from app.manifest import Manifest
from training.data import DataError, read_examples


class LabelError(DataError):
    """The file does not fit the bundle: labels it does not know, or the wrong number of texts."""


def label_ids(file_labels: Sequence[str], manifest: Manifest) -> np.ndarray:
    """Class ids of a data file's raw labels, through the manifest's one label mapping."""
    try:
        return np.array(manifest.label_ids(file_labels), dtype=np.int64)
    except ValueError as exc:
        raise LabelError(f"cannot map the file's labels: {exc}") from exc


def load_data(path: Path, manifest: Manifest, text_columns: Sequence[str] | None = None,
              label_column: str | None = None) -> tuple[list, np.ndarray]:
    """Model inputs (texts, or (text, pair) tuples) and class ids of a labelled file."""
    examples = read_examples(path, text_columns, label_column, require_labels=True).examples
    paired = examples[0].text_pair is not None
    if paired != manifest.text_pair:
        raise LabelError(
            f"{path}: the bundle expects {'text pairs' if manifest.text_pair else 'single texts'} "
            f"but the file has {'two' if paired else 'one'} text column(s); pass --text-columns"
        )
    inputs = [e.text if e.text_pair is None else (e.text, e.text_pair) for e in examples]
    known = {*manifest.labels, *(manifest.source_labels or [])}
    stray = next((e for e in examples if e.label not in known), None)
    if stray is not None:
        where = f"{path} line {stray.line}" if stray.line is not None else str(path)
        raise LabelError(f"{where}: cannot map the file's labels: label {stray.label!r} is not among the "
                         f"model's labels {manifest.source_labels or manifest.labels}")
    return inputs, label_ids([e.label for e in examples], manifest)
