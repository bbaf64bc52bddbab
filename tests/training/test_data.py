"""Tests for training.data: real GLUE files (skipped when absent) and small built files."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

import training.data as data_module
from training.data import DataError, Example, file_sha256, label_vocabulary, read_examples


def _glue_dir() -> Path:
    # OFFRAMP_DATA_DIR may name the shared data folder (holding glue/) or glue/ itself.
    override = os.environ.get("OFFRAMP_DATA_DIR")
    if override:
        base = Path(override)
        return base / "glue" if (base / "glue").is_dir() else base
    # parents: [0] tests/training, [1] tests, [2] the repo, [3] the folder beside it that holds shared/
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"


GLUE = _glue_dir()


@pytest.fixture
def glue() -> Path:
    if not GLUE.is_dir():
        pytest.skip(f"GLUE data not found at {GLUE}; set OFFRAMP_DATA_DIR")
    return GLUE


def write(path: Path, text: str) -> Path:
    # newline="" so the test controls line endings exactly.
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_module_does_not_import_torch_or_transformers() -> None:
    tree = ast.parse(Path(data_module.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"torch", "transformers", "numpy", "tokenizers"}


# --- GLUE ---------------------------------------------------------------------

GLUE_FILES = [
    # (file, rows, text columns, label column, labels)
    ("SST-2/train.tsv", 67349, ("sentence",), "label", ["0", "1"]),
    ("SST-2/dev.tsv", 872, ("sentence",), "label", ["0", "1"]),
    ("SST-2/test.tsv", 1821, ("sentence",), None, []),
    ("CoLA/train.tsv", 8551, ("3",), "1", ["0", "1"]),
    ("CoLA/dev.tsv", 1043, ("3",), "1", ["0", "1"]),
    ("MRPC/train.tsv", 3667, ("#1 String", "#2 String"), "Quality", ["0", "1"]),
    ("MRPC/dev.tsv", 408, ("#1 String", "#2 String"), "Quality", ["0", "1"]),
    ("RTE/train.tsv", 2490, ("sentence1", "sentence2"), "label", ["entailment", "not_entailment"]),
    ("RTE/dev.tsv", 277, ("sentence1", "sentence2"), "label", ["entailment", "not_entailment"]),
    ("STS-B/train.tsv", 5749, ("sentence1", "sentence2"), "score", None),
    ("STS-B/dev.tsv", 1500, ("sentence1", "sentence2"), "score", None),
]


@pytest.mark.parametrize("name, rows, text_columns, label_column, labels", GLUE_FILES)
def test_glue_files_load(
    glue: Path,
    name: str,
    rows: int,
    text_columns: tuple[str, ...],
    label_column: str | None,
    labels: list[str] | None,
) -> None:
    loaded = read_examples(glue / name)
    assert len(loaded.examples) == rows
    assert loaded.text_columns == text_columns
    assert loaded.label_column == label_column
    assert loaded.sha256 == file_sha256(glue / name)
    is_pair = len(text_columns) == 2
    assert all((e.text_pair is not None) == is_pair for e in loaded.examples)
    found = label_vocabulary(e.label for e in loaded.examples if e.label is not None)
    if labels is not None:
        assert found == labels
    else:  # STS-B: a float score in 0..5
        assert all(0.0 <= float(label) <= 5.0 for label in found)


def test_glue_quirks(glue: Path) -> None:
    # MRPC starts with a UTF-8 BOM; without utf-8-sig the "Quality" header would not match.
    assert (glue / "MRPC/dev.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    mrpc = read_examples(glue / "MRPC/dev.tsv", require_labels=True)
    assert mrpc.examples[0].text.startswith("He said the foodservice pie business")
    # Unquoted TSV: a sentence that opens with '"' must stay whole.
    assert mrpc.examples[0].text_pair.startswith('" The foodservice pie business')

    cola = read_examples(glue / "CoLA/train.tsv")
    assert cola.examples[0] == Example(
        text="Our friends won't buy this analysis, let alone the next one we propose.", label="1"
    )
    assert read_examples(glue / "STS-B/dev.tsv").examples[0].label == "5.000"
    assert read_examples(glue / "RTE/dev.tsv").examples[0].label == "not_entailment"

    with pytest.raises(DataError, match="test.tsv.*label"):
        read_examples(glue / "SST-2/test.tsv", require_labels=True)


# --- built files ----------------------------------------------------------------


def test_tsv_pair_detection_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_bytes("\ufeffid\tPremise\tHypothesis\tgold_label\n1\tA \"quoted\" cat.\tA cat.\tentailment\n".encode())
    loaded = read_examples(path)
    assert loaded.text_columns == ("Premise", "Hypothesis")
    assert loaded.label_column == "gold_label"
    assert loaded.examples == [Example('A "quoted" cat.', "A cat.", "entailment")]


def test_question_sentence_pair_beats_single_sentence(tmp_path: Path) -> None:
    path = write(tmp_path / "qnli.tsv", "index\tquestion\tsentence\tlabel\n0\tWhy?\tBecause.\tentailment\n")
    assert read_examples(path).examples == [Example("Why?", "Because.", "entailment")]


def test_explicit_columns_override(tmp_path: Path) -> None:
    path = write(tmp_path / "x.tsv", "sentence\tother\tlabel\ty\nfirst\tsecond\t0\tpos\n")
    loaded = read_examples(path, text_columns=["OTHER"], label_column="y")
    assert loaded.text_columns == ("other",)
    assert loaded.label_column == "y"
    assert loaded.examples == [Example("second", None, "pos")]


def test_headerless_with_indices(tmp_path: Path) -> None:
    path = write(tmp_path / "plain.tsv", "good film\tpositive\nbad film\tnegative\n")
    loaded = read_examples(path, text_columns=["0"], label_column="1")
    assert loaded.text_columns == ("0",)
    assert loaded.label_column == "1"
    assert [e.label for e in loaded.examples] == ["positive", "negative"]


def test_headerless_without_indices_explains(tmp_path: Path) -> None:
    path = write(tmp_path / "plain.tsv", "good film\tpositive\n")
    with pytest.raises(DataError, match=r"plain\.tsv line 1: .*--text-columns"):
        read_examples(path)


def test_cola_layout_detected(tmp_path: Path) -> None:
    path = write(tmp_path / "train.tsv", "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.")
    loaded = read_examples(path)
    assert loaded.text_columns == ("3",)
    assert loaded.label_column == "1"
    assert loaded.examples == [Example("The cat sat.", None, "1"), Example("Cat the sat.", None, "0")]


def test_csv_quoting(tmp_path: Path) -> None:
    path = write(
        tmp_path / "reviews.csv",
        'review,label\r\n"Good, really ""good""",positive\r\n"two\nlines",negative\r\nplain,positive\r\n',
    )
    loaded = read_examples(path)
    assert loaded.examples == [
        Example('Good, really "good"', None, "positive"),
        Example("two\nlines", None, "negative"),
        Example("plain", None, "positive"),
    ]


def test_jsonl(tmp_path: Path) -> None:
    lines = [
        {"premise": "A dog runs.", "hypothesis": "An animal moves.", "label": 0},
        {"premise": "A cat.", "hypothesis": "A dog.", "label": "2"},
        {"premise": "x", "hypothesis": "y", "label": 3.8},
    ]
    path = write(tmp_path / "nli.jsonl", "\n".join(json.dumps(o) for o in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    loaded = read_examples(path, require_labels=True)
    assert loaded.text_columns == ("premise", "hypothesis")
    assert loaded.label_column == "label"
    assert [e.label for e in loaded.examples] == ["0", "2", "3.8"]
    assert loaded.examples[0] == Example("A dog runs.", "An animal moves.", "0")


def test_txt(tmp_path: Path) -> None:
    path = write(tmp_path / "extra.txt", "first text\r\n\nsecond, with \"quotes\"\tand a tab\n")
    loaded = read_examples(path)
    assert loaded.examples == [Example("first text"), Example('second, with "quotes"\tand a tab')]
    assert loaded.label_column is None
    with pytest.raises(DataError, match="extra.txt"):
        read_examples(path, require_labels=True)


def test_sha256(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "abc\n")
    expected = "edeaaff3f1774ad2888673770c6d64097e391bc362d7d6fb34982ddf0efd18cb"
    assert file_sha256(path) == expected
    assert read_examples(path).sha256 == expected


# --- malformed files -----------------------------------------------------------

MALFORMED = [
    ("cols.tsv", "sentence\tlabel\ngood\t1\nbad\t0\textra\n", "line 3: expected 2 columns, found 3"),
    ("empty_text.tsv", "sentence\tlabel\ngood\t1\n  \t0\n", "line 3: empty text"),
    ("empty_label.tsv", "sentence\tlabel\ngood\t1\nfine\t\n", "line 3: empty label"),
    # The record starting on line 2 spans lines 2-3, so the bad row starts on line 4.
    ("cols.csv", 'text,label\n"multi\nline",1\na,b,c\n', "line 4: expected 2 columns, found 3"),
    ("quote.csv", 'text,label\nok,1\n"never closed,0\n', "line 3: malformed CSV"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", label: 0}\n', "line 3: invalid JSON"),
    ("missing.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', "line 2: missing field 'label'"),
    ("array.jsonl", '{"text": "a"}\n["b"]\n', "line 2: expected a JSON object"),
    ("number.jsonl", '{"text": "a"}\n{"text": 5}\n', "line 2: field 'text' must be a string"),
    ("nolabel.jsonl", '{"text": "a", "label": null}\n', "line 1: field 'label' must be a string or number"),
    ("unknown.tsv", "foo\tbar\nx\ty\n", "line 1: no recognised text column"),
    ("empty.tsv", "", "file is empty"),
    ("blank.jsonl", "\n \n", "file is empty"),
    ("header_only.tsv", "sentence\tlabel\n", "no examples"),
    ("data.parquet", "x", "unknown file type"),
]


@pytest.mark.parametrize("name, content, message", MALFORMED)
def test_malformed(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as info:
        read_examples(path)
    assert name in str(info.value)
    assert message in str(info.value)


def test_invalid_utf8_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.tsv"
    path.write_bytes(b"sentence\tlabel\ngood\t1\ncaf\xe9\t0\n")
    with pytest.raises(DataError, match=r"latin1\.tsv line 3: not valid UTF-8"):
        read_examples(path)


def test_explicit_column_missing(tmp_path: Path) -> None:
    path = write(tmp_path / "x.tsv", "sentence\tlabel\ngood\t1\n")
    with pytest.raises(DataError, match=r"x\.tsv line 1: column\(s\) \['nope'\] not found"):
        read_examples(path, text_columns=["nope"])
    with pytest.raises(DataError, match=r"y\.tsv line 1: column index 5 out of range"):
        read_examples(write(tmp_path / "y.tsv", "a\tb\n"), text_columns=["5"])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="absent.tsv"):
        read_examples(tmp_path / "absent.tsv")


def test_label_vocabulary() -> None:
    assert label_vocabulary(["10", "2", "0", "1", "2"]) == ["0", "1", "2", "10"]
    assert label_vocabulary(["-1", "1", "0"]) == ["-1", "0", "1"]
    assert label_vocabulary(["not_entailment", "entailment"]) == ["entailment", "not_entailment"]
    # One non-integer label makes the whole set sort as strings.
    assert label_vocabulary(["10", "2", "x"]) == ["10", "2", "x"]
    assert label_vocabulary(["3.8", "10.0", "0"]) == ["0", "10.0", "3.8"]
    assert label_vocabulary([]) == []
