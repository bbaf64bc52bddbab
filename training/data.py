"""Read text-classification data (GLUE TSVs, CSV, JSONL, plain text) into Examples.

Pure standard library on purpose: the benchmark tool imports this module in
environments without torch or transformers.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = [
    "DataError",
    "Example",
    "TextFile",
    "read_examples",
    "label_vocabulary",
    "file_sha256",
    "SINGLE_TEXT_COLUMNS",
    "PAIR_TEXT_COLUMNS",
    "LABEL_COLUMNS",
]

# Header names recognised when no columns are given, compared case-insensitively.
# Pairs are tried first: QNLI-style files have both "question" and "sentence",
# and matching "sentence" alone would silently drop the question.
PAIR_TEXT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("sentence1", "sentence2"),
    ("#1 String", "#2 String"),  # MRPC
    ("question1", "question2"),  # QQP
    ("question", "sentence"),  # QNLI
    ("premise", "hypothesis"),  # SNLI / MNLI-style
)
SINGLE_TEXT_COLUMNS: tuple[str, ...] = ("sentence", "text", "content", "review")
LABEL_COLUMNS: tuple[str, ...] = ("label", "Quality", "score", "gold_label", "labels", "class")

_INTEGER = re.compile(r"-?[0-9]+")
_COLUMNS_HINT = (
    "pass --text-columns with column names, or 0-based column indices for a file without a header"
)


class DataError(ValueError):
    """A data file cannot be used; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None = None
    # Kept as the raw string from the file ("0", "entailment", "3.8"): the caller
    # decides whether it is a class name or a regression target.
    label: str | None = None
    # 1-based line of the file the row starts on (for error messages); not part of equality.
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TextFile:
    path: Path
    sha256: str
    examples: list[Example]
    text_columns: tuple[str, ...]
    label_column: str | None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def label_vocabulary(labels: Iterable[str]) -> list[str]:
    """Distinct labels in a stable order, so label ids do not depend on file order.

    Integer-looking labels sort numerically ("2" before "10"); anything else sorts
    as strings.
    """
    distinct = set(labels)
    if all(_INTEGER.fullmatch(label) for label in distinct):
        # The string breaks ties such as "1" vs "01" deterministically.
        return sorted(distinct, key=lambda label: (int(label), label))
    return sorted(distinct)


def read_examples(
    path: str | Path,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    require_labels: bool = False,
) -> TextFile:
    """Load one data file; the format comes from the extension (.tsv, .csv, .jsonl, .txt).

    ``text_columns`` (one or two) and ``label_column`` are header names, or
    0-based indices as strings for a file without a header. Left out, they are
    detected from the header names (see PAIR_TEXT_COLUMNS, SINGLE_TEXT_COLUMNS,
    LABEL_COLUMNS); GLUE CoLA's headerless layout is recognised too.
    """
    path = Path(path)
    if text_columns is not None:
        text_columns = tuple(text_columns)
        if len(text_columns) not in (1, 2):
            raise DataError(
                f"{path}: expected one or two text columns, got {len(text_columns)}: {list(text_columns)}"
            )
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".csv", ".jsonl", ".txt"):
        raise DataError(f"{path}: unknown file type {path.suffix!r}; expected .tsv, .csv, .jsonl or .txt")

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from e
    text = _decode(path, raw)
    if not text.strip():
        raise DataError(f"{path}: file is empty")

    if suffix == ".txt":
        examples, names, label_name = _read_txt(path, text, text_columns, label_column)
    elif suffix == ".jsonl":
        examples, names, label_name = _read_jsonl(path, text, text_columns, label_column)
    else:
        rows = _tsv_rows(text) if suffix == ".tsv" else _csv_rows(path, text)
        examples, names, label_name = _read_table(
            path, rows, text_columns, label_column, allow_cola=suffix == ".tsv"
        )

    if require_labels and label_name is None:
        raise DataError(
            f"{path}: no label column found (looked for {', '.join(LABEL_COLUMNS)}); pass --label-column"
        )
    return TextFile(
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
        examples=examples,
        text_columns=names,
        label_column=label_name,
    )


def _decode(path: Path, raw: bytes) -> str:
    # utf-8-sig drops the BOM that GLUE MRPC's files start with; otherwise the
    # first header name would be "\ufeffQuality" and never match.
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 ({e.reason})") from e


def _lines(text: str) -> Iterable[tuple[int, str]]:
    # Split on "\n" only: str.splitlines() also breaks on characters such as
    # \x0b or \u2028 that can occur inside a sentence, which would shift line numbers.
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.removesuffix("\r")


def _tsv_rows(text: str) -> list[tuple[int, list[str]]]:
    # No quoting at all: GLUE TSVs are not quoted and their sentences contain
    # '"' characters, which a quoting reader would treat as field delimiters.
    return [(number, line.split("\t")) for number, line in _lines(text) if line]


def _csv_rows(path: Path, text: str) -> list[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[int, list[str]]] = []
    end_of_previous = 0
    try:
        for cells in reader:
            # A quoted field may span lines; report the line the record starts on.
            start = end_of_previous + 1
            end_of_previous = reader.line_num
            if cells:
                rows.append((start, cells))
    except csv.Error as e:
        raise DataError(f"{path} line {end_of_previous + 1}: malformed CSV: {e}") from e
    return rows


def _find(names: Sequence[str], wanted: str) -> int | None:
    lowered = [name.strip().lower() for name in names]
    wanted = wanted.strip().lower()
    return lowered.index(wanted) if wanted in lowered else None


def _detect_text(names: Sequence[str]) -> list[int] | None:
    for first, second in PAIR_TEXT_COLUMNS:
        i, j = _find(names, first), _find(names, second)
        if i is not None and j is not None:
            return [i, j]
    for name in SINGLE_TEXT_COLUMNS:
        i = _find(names, name)
        if i is not None:
            return [i]
    return None


def _columns_from_names(
    names: Sequence[str], text_columns: Sequence[str] | None, label_column: str | None
) -> tuple[list[int], int | None] | None:
    """Positions of the text and label columns among ``names``, or None if they are not all there."""
    if text_columns is None:
        text_idx = _detect_text(names)
    else:
        found = [_find(names, column) for column in text_columns]
        text_idx = None if None in found else [i for i in found if i is not None]
    if text_idx is None:
        return None
    if label_column is not None:
        label_idx = _find(names, label_column)
        if label_idx is None:
            return None
    else:
        candidates = (_find(names, name) for name in LABEL_COLUMNS)
        label_idx = next((i for i in candidates if i is not None and i not in text_idx), None)
    return text_idx, label_idx


def _read_table(
    path: Path,
    rows: list[tuple[int, list[str]]],
    text_columns: Sequence[str] | None,
    label_column: str | None,
    allow_cola: bool,
) -> tuple[list[Example], tuple[str, ...], str | None]:
    first_line, first = rows[0]
    explicit = [*(text_columns or ()), *([label_column] if label_column is not None else [])]
    found = _columns_from_names(first, text_columns, label_column)

    if found is not None:
        text_idx, label_idx = found
        data = rows[1:]
        names = tuple(first[i].strip() for i in text_idx)
        label_name = first[label_idx].strip() if label_idx is not None else None
    elif text_columns is not None and all(_INTEGER.fullmatch(c.strip()) for c in explicit):
        text_idx = [int(c) for c in text_columns]
        label_idx = int(label_column) if label_column is not None else None
        for index in [*text_idx, *([label_idx] if label_idx is not None else [])]:
            if not 0 <= index < len(first):
                raise DataError(
                    f"{path} line {first_line}: column index {index} out of range, "
                    f"the row has {len(first)} columns"
                )
        # Indices are meant for headerless files, but if the first row is a
        # recognisable header it must not become an example.
        data = rows[1:] if _detect_text(first) is not None else rows
        names = tuple(str(i) for i in text_idx)
        label_name = str(label_idx) if label_idx is not None else None
    elif (
        allow_cola
        and text_columns is None
        and label_column is None
        and len(first) == 4
        and _INTEGER.fullmatch(first[1].strip())
    ):
        # GLUE CoLA ships without a header: source, label, original label, sentence.
        text_idx, label_idx = [3], 1
        data = rows
        names, label_name = ("3",), "1"
    elif text_columns is None and _detect_text(first) is None:
        raise DataError(
            f"{path} line {first_line}: no recognised text column in the header {first}; {_COLUMNS_HINT}"
        )
    else:
        missing = [c for c in explicit if _find(first, c) is None]
        raise DataError(
            f"{path} line {first_line}: column(s) {missing} not found in the header {first}; {_COLUMNS_HINT}"
        )

    if not data:
        raise DataError(f"{path}: no examples after the header line")
    width = len(first)
    examples = []
    for number, cells in data:
        if len(cells) != width:
            raise DataError(f"{path} line {number}: expected {width} columns, found {len(cells)}")
        texts = [cells[i] for i in text_idx]
        label = cells[label_idx] if label_idx is not None else None
        examples.append(_example(path, number, texts, names, label, label_name))
    return examples, names, label_name


def _read_jsonl(
    path: Path, text: str, text_columns: Sequence[str] | None, label_column: str | None
) -> tuple[list[Example], tuple[str, ...], str | None]:
    objects: list[tuple[int, dict[str, Any]]] = []
    for number, line in _lines(text):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number}: invalid JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(value, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, found {type(value).__name__}")
        objects.append((number, value))

    # Field names come from the first object; every later object must have them.
    first_line, first = objects[0]
    keys = list(first)
    found = _columns_from_names(keys, text_columns, label_column)
    if found is not None:
        text_idx, label_idx = found
        names = tuple(keys[i] for i in text_idx)
        label_name = keys[label_idx] if label_idx is not None else None
    elif text_columns is None and _detect_text(keys) is None:
        raise DataError(
            f"{path} line {first_line}: no recognised text field among {keys}; pass --text-columns"
        )
    else:
        # Some field is absent from the first object: keep the names (in the
        # file's spelling where it has them) and let the loop below report it.
        detected = _detect_text(keys) or []
        names = (
            tuple(_key(keys, c) for c in text_columns)
            if text_columns is not None
            else tuple(keys[i] for i in detected)
        )
        label_name = _key(keys, label_column) if label_column is not None else None

    examples = []
    for number, obj in objects:
        wanted = [*names, *([label_name] if label_name is not None else [])]
        for field in wanted:
            if field not in obj:
                raise DataError(f"{path} line {number}: missing field {field!r}")
        texts = []
        for field in names:
            if not isinstance(obj[field], str):
                raise DataError(
                    f"{path} line {number}: field {field!r} must be a string, found {type(obj[field]).__name__}"
                )
            texts.append(obj[field])
        label = _json_label(path, number, label_name, obj[label_name]) if label_name is not None else None
        examples.append(_example(path, number, texts, names, label, label_name))
    return examples, names, label_name


def _key(keys: Sequence[str], name: str) -> str:
    i = _find(keys, name)
    return keys[i] if i is not None else name


def _json_label(path: Path, number: int, field: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    # json.dumps keeps the file's spelling for numbers (1 -> "1", 3.8 -> "3.8"),
    # so JSONL and TSV copies of a dataset produce the same label strings.
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    found = "null" if value is None else type(value).__name__
    raise DataError(f"{path} line {number}: field {field!r} must be a string or number, found {found}")


def _read_txt(
    path: Path, text: str, text_columns: Sequence[str] | None, label_column: str | None
) -> tuple[list[Example], tuple[str, ...], str | None]:
    # Refuse rather than ignore: a column option on a .txt file means the
    # caller expected a different format.
    if text_columns is not None or label_column is not None:
        raise DataError(f"{path}: a .txt file holds one unlabeled text per line and has no columns")
    examples = [Example(text=line, line=number) for number, line in _lines(text) if line.strip()]
    return examples, ("text",), None


def _example(
    path: Path,
    number: int,
    texts: list[str],
    names: Sequence[str],
    label: str | None,
    label_name: str | None,
) -> Example:
    for value, name in zip(texts, names):
        if not value.strip():
            raise DataError(f"{path} line {number}: empty text in column {name!r}")
    if label is not None:
        # Surrounding spaces would otherwise make " 1" and "1" different classes.
        label = label.strip()
        if not label:
            raise DataError(f"{path} line {number}: empty label in column {label_name!r}")
    return Example(text=texts[0], text_pair=texts[1] if len(texts) > 1 else None, label=label, line=number)
