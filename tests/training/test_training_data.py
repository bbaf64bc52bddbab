"""Training data as `offramp train` reads it: the label set (rare and one-file labels, --labels),
--label-names by name or by position, one-line errors with exit code 2, nothing half-written,
and the log of what was read."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main
from tests.tiny import write_rows
from training.data import DataError
from training.labels import read_task_data

ROOT = Path(__file__).resolve().parents[2]
AG = ["World", "Sports", "Business", "Sci/Tech"]  # sorted: Business, Sci/Tech, Sports, World
WORDS = {"World": "election minister treaty", "Sports": "match goal league",
         "Business": "shares profit market", "Sci/Tech": "software chip research"}


def binary(directory: Path, rows: int = 200, dev_rows: int = 20, stray: tuple[int, str] | None = None,
           dev_stray: tuple[int, str] | None = None, labels=("0", "1")) -> tuple[Path, Path]:
    """A two-label train and dev file; `stray` = (row index, label) puts one odd label in."""
    train = [(f"train text {i}", labels[i % 2]) for i in range(rows)]
    dev = [(f"dev text {i}", labels[i % 2]) for i in range(dev_rows)]
    if stray:
        train.insert(stray[0], ("a stray row", stray[1]))
    if dev_stray:
        dev.insert(dev_stray[0], ("a stray dev row", dev_stray[1]))
    return write_rows(directory / "train.tsv", train), write_rows(directory / "dev.tsv", dev)


def train_args(train: Path, dev: Path, out: Path, *extra: str, teacher: str = "no-teacher-needed") -> list[str]:
    # Data errors come before the teacher is touched: a path that does not exist is fine.
    return ["train", "fastbert", "--teacher", teacher, "--train", str(train), "--dev", str(dev),
            "--out", str(out / "models" / "x"), "--checkpoint", str(out / "runs" / "x"), *extra]


def one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("offramp: error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


# -- the label set -----------------------------------------------------------------------------

def test_rare_label_is_refused_in_one_line_with_exit_2_and_nothing_written(tmp_path):
    train, dev = binary(tmp_path, stray=(122, "maybe"))  # header is line 1: row 122 is line 124
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "app.cli", *train_args(train, dev, out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("offramp: error: ")
    assert f"{train} line 124: label 'maybe' occurs in no other file" in lines[0]
    assert "0 x 100, 1 x 100, maybe x 1" in lines[0] and "--labels" in lines[0]
    assert not out.exists()  # neither the bundle, the checkpoint nor their parent folders


def test_a_dev_label_never_seen_in_training_is_refused(tmp_path, capsys):
    train, dev = binary(tmp_path, dev_stray=(4, "2"))
    error = one_line_error(capsys, train_args(train, dev, tmp_path / "out"))
    assert f"{dev} line 6: label '2'" in error and str(train) in error
    assert not (tmp_path / "out").exists()


def test_a_common_label_of_the_training_file_only_is_accepted_with_a_warning(tmp_path, caplog):
    rows = [(f"t {i}", str(i % 3)) for i in range(60)]  # label 2: 20 rows, a third of the file
    train = write_rows(tmp_path / "train.tsv", rows)
    dev = write_rows(tmp_path / "dev.tsv", [(f"d {i}", str(i % 2)) for i in range(10)])
    with caplog.at_level(logging.INFO):
        data = read_task_data(train, dev)
    assert data.labels.source == ["0", "1", "2"]
    assert "label '2' occurs in" in caplog.text and "dev accuracy cannot measure" in caplog.text
    # The same label in 4 of 60 rows (fewer than 5) is a stray.
    rows = [(t, "2" if label == "2" and i < 12 else str(i % 2)) for i, (t, label) in enumerate(rows)]
    write_rows(train, rows)
    with pytest.raises(DataError, match=r"train\.tsv line 4: label '2' occurs in no other file"):
        read_task_data(train, dev)


def test_labels_option_sets_the_label_set_and_refuses_labels_outside_it(tmp_path, capsys):
    train, dev = binary(tmp_path, stray=(10, "maybe"))
    data = read_task_data(train, dev, labels=["1", "0", "maybe"])
    assert data.labels.source == data.labels.names == ["1", "0", "maybe"]  # class ids as given
    # "maybe" is in the set but not in dev: fine. A label outside the set names file and line.
    error = one_line_error(capsys, train_args(train, dev, tmp_path / "out", "--labels", "0,1"))
    assert f"{train} line 12: label 'maybe' is not among --labels 0,1" in error
    assert not (tmp_path / "out").exists()


# -- --label-names -----------------------------------------------------------------------------

def test_label_names_that_are_the_files_labels_map_by_name(tmp_path, caplog, tiny_teacher_dir):
    """End to end: AG-News-style string labels given in an order other than sorted."""
    from app.manifest import read_manifest
    from training.labelled import label_ids
    from training.model import CHECKPOINT_META

    rows = [(f"{WORDS[AG[i % 4]]} {i}", AG[i % 4]) for i in range(32)]
    train = write_rows(tmp_path / "train.tsv", rows)
    dev = write_rows(tmp_path / "dev.tsv", rows[:8])
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        main(train_args(train, dev, out, "--label-names", ",".join(AG), "--epochs", "1",
                        "--distill-epochs", "1", "--batch-size", "16", "--max-seq-length", "16",
                        "--threads", "1", teacher=str(tiny_teacher_dir)))
    manifest = read_manifest(out / "models" / "x")
    assert manifest.labels == AG and manifest.source_labels == AG
    assert label_ids(["Business", "World", "Sci/Tech"], manifest).tolist() == [2, 0, 3]
    meta = json.loads((out / "runs" / "x" / CHECKPOINT_META).read_text())
    assert meta["labels"] == AG and meta["source_labels"] == AG
    # What was read, before training: rows, columns, labels with counts, the label -> id map.
    log = caplog.text
    assert f"train {train}: 32 rows, text column 'sentence', label column 'label': " \
           "World x 8, Sports x 8, Business x 8, Sci/Tech x 8" in log
    assert f"dev {dev}: 8 rows" in log
    assert "labels (matched by name, class ids in the order of --label-names): World (class 0), " \
           "Sports (class 1), Business (class 2), Sci/Tech (class 3)" in log
    assert log.index("labels (matched by name") < log.index("stage 1: fine-tune: started")
    for name in ("ONNX export", "verification against PyTorch", "dev calibration sweep"):
        assert f"{name}: started" in log and f"{name}: done in" in log
    assert not [p.name for p in (out / "models").iterdir() if p.name != "x"]  # no staging left


def test_numeric_labels_are_renamed_by_position(tmp_path, caplog):
    train, dev = binary(tmp_path)
    with caplog.at_level(logging.INFO):
        data = read_task_data(train, dev, label_names=["negative", "positive"])
    assert data.labels.source == ["0", "1"] and data.labels.names == ["negative", "positive"]
    assert "labels (numeric ids renamed by position): 0 -> negative (class 0), 1 -> positive (class 1)" in caplog.text
    # Numeric order, not string order.
    train, dev = binary(tmp_path, labels=("10", "2"))
    assert read_task_data(train, dev, label_names=["low", "high"]).labels.source == ["2", "10"]


def test_other_names_for_non_numeric_labels_are_refused(tmp_path, capsys):
    train, dev = binary(tmp_path, labels=("neg", "pos"))
    error = one_line_error(capsys, train_args(train, dev, tmp_path / "out", "--label-names", "negative,positive"))
    assert "--label-names negative,positive are not the files' labels (neg, pos)" in error
    assert not (tmp_path / "out").exists()
    # With --labels giving the order, renaming by position is unambiguous.
    data = read_task_data(train, dev, labels=["pos", "neg"], label_names=["positive", "negative"])
    assert data.labels.source == ["pos", "neg"] and data.labels.names == ["positive", "negative"]
    # A name that is another label would swap classes.
    train, dev = binary(tmp_path)
    with pytest.raises(DataError, match="would serve label '0' as '1'"):
        read_task_data(train, dev, label_names=["1", "2"])
    with pytest.raises(DataError, match="gives 3 names for 2 labels"):
        read_task_data(train, dev, label_names=["a", "b", "c"])


# -- errors: one line, exit code 2; bugs keep their traceback -----------------------------------

def test_malformed_file_and_missing_bundle_are_one_line_errors(tmp_path, capsys):
    train, dev = binary(tmp_path)
    dev.write_text("sentence\tlabel\nfine\t0\nbroken row without a tab\n")
    error = one_line_error(capsys, train_args(train, dev, tmp_path / "out"))
    assert f"{dev} line 3: expected 2 columns, found 1" in error
    error = one_line_error(capsys, ["quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "q"),
                                    "--dev", str(dev)])
    assert "nope" in error and "manifest.json" in error
    assert "nope" in one_line_error(capsys, ["card", str(tmp_path / "nope")])


def test_command_wrapper_keeps_the_traceback_of_a_bug(capsys):
    from training.cli import command

    def multi_line(args):
        raise DataError("first\n  second")

    with pytest.raises(SystemExit) as info:
        command(multi_line)(None)
    assert info.value.code == 2 and capsys.readouterr().err == "offramp: error: first; second\n"
    with pytest.raises(ZeroDivisionError):
        command(lambda args: 1 / 0)(None)


def test_an_out_folder_that_is_not_a_bundle_is_not_replaced(tmp_path, capsys):
    train, dev = binary(tmp_path)
    precious = tmp_path / "out" / "models" / "x"
    precious.mkdir(parents=True)
    (precious / "notes.txt").write_text("mine")
    error = one_line_error(capsys, train_args(train, dev, tmp_path / "out"))
    assert "--out" in error and "not an offramp bundle" in error
    assert (precious / "notes.txt").read_text() == "mine" and not (tmp_path / "out" / "runs").exists()


def test_a_failed_export_leaves_the_old_bundle_and_no_staging(tmp_path, monkeypatch):
    import torch

    import training.export as export
    from app.manifest import Provenance
    from tests.tiny import wordpiece_tokenizer
    from training.model import EarlyExitModel, backbone_from_config

    tokenizer = tmp_path / "tokenizer.json"
    wordpiece_tokenizer(["a small text to train on"], vocab_size=60).save(str(tokenizer))
    torch.manual_seed(0)
    backbone = backbone_from_config(vocab_size=60, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    model = EarlyExitModel(backbone, num_labels=2, exit_head="fastbert", head_width=8).eval()
    out = tmp_path / "models" / "b"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text("the complete old bundle")

    def broken(*args, **kwargs):
        raise RuntimeError("verification blew up")

    monkeypatch.setattr(export, "verify", broken)
    with pytest.raises(RuntimeError, match="blew up"):
        export.export_bundle(model, tokenizer, out, name="b", labels=["a", "b"], source_labels=None,
                             text_pair=False, max_seq_length=16, provenance=Provenance(teacher="t"), dev_results=[])
    assert [p.name for p in out.parent.iterdir()] == ["b"]
    assert (out / "manifest.json").read_text() == "the complete old bundle"


def test_distill_keeps_the_teachers_label_set_and_refuses_others(tmp_path, capsys):
    import torch

    from training.distill_cli import teacher_labels
    from training.model import EarlyExitModel, backbone_from_config

    torch.manual_seed(0)
    backbone = backbone_from_config(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    teacher = tmp_path / "teacher"
    EarlyExitModel(backbone, num_labels=2, exit_head="fastbert", head_width=8).save(
        teacher, {"labels": ["positive", "negative"], "source_labels": ["1", "0"]})
    (teacher / "tokenizer.json").write_text("{}")
    train, dev = binary(tmp_path)
    args = ["train", "distill", "--method", "distilbert", "--teacher", str(teacher), "--train", str(train),
            "--dev", str(dev), "--out", str(tmp_path / "out" / "models" / "s"),
            "--checkpoint", str(tmp_path / "out" / "runs" / "s")]
    # The class ids are the teacher's ("1" is class 0), served under the teacher's names.
    import argparse

    from training.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    data = teacher_labels(parser.parse_args(args), json.loads((teacher / "early_exit.json").read_text()), 2)
    assert data.labels.source == ["1", "0"] and data.labels.names == ["positive", "negative"]
    # A label the teacher does not know: its file and line, exit code 2, nothing written.
    write_rows(dev, [("fine", "0"), ("odd", "2")])
    error = one_line_error(capsys, args)
    assert f"{dev} line 3: label '2' is not among the teacher's labels ({teacher}) 1,0" in error
    assert not (tmp_path / "out").exists()


def test_a_dev_file_with_a_label_the_bundle_lacks_names_its_line(tmp_path):
    from app.manifest import Manifest
    from training.labelled import LabelError, load_data

    manifest = Manifest.model_construct(labels=["negative", "positive"], source_labels=["0", "1"], text_pair=False)
    dev = write_rows(tmp_path / "dev.tsv", [("a", "0"), ("b", "positive"), ("c", "maybe")])
    with pytest.raises(LabelError, match=r"dev\.tsv line 4: cannot map the file's labels: label 'maybe'"):
        load_data(dev, manifest)
    write_rows(dev, [("a", "0"), ("b", "positive")])
    assert load_data(dev, manifest)[1].tolist() == [0, 1]
