"""Shared fixtures: one tiny teacher and one tiny trained bundle per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import SST2, TINY_INT8_ROW_TOLERANCE, sst2_subset, tiny_teacher


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    if not SST2.is_dir():
        pytest.skip(f"shared data not found at {SST2}")
    return sst2_subset(tmp_path_factory.mktemp("data"), train_rows=300, dev_rows=64)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_data) -> Path:
    from training.data import read_examples

    texts = [e.text for e in read_examples(tiny_data[0]).examples]
    return tiny_teacher(tmp_path_factory.mktemp("teacher") / "bert", texts)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_teacher_dir, tiny_data) -> dict[str, Path]:
    """A FastBERT bundle trained and exported through the real `offramp train` command."""
    from app.cli import main

    from training.data import read_examples

    root = tmp_path_factory.mktemp("trained")
    bundle, checkpoint = root / "models" / "tiny", root / "ckpt"
    unlabeled = root / "unlabeled.txt"  # SST-2 test sentences: domain text without labels
    unlabeled.write_text("".join(e.text + "\n" for e in read_examples(SST2 / "test.tsv").examples[:100]))
    main(["train", "fastbert", "--teacher", str(tiny_teacher_dir), "--train", str(tiny_data[0]),
          "--dev", str(tiny_data[1]), "--unlabeled", str(unlabeled), "--out", str(bundle), "--checkpoint", str(checkpoint),
          "--epochs", "2", "--distill-epochs", "2", "--lr", "1e-3", "--distill-lr", "1e-3",
          "--batch-size", "16", "--threads", "2"])
    return {"bundle": bundle, "models": bundle.parent, "checkpoint": checkpoint,
            "train": tiny_data[0], "dev": tiny_data[1]}


@pytest.fixture(scope="session")
def tiny_int8_bundle(tmp_path_factory, tiny_bundle) -> Path:
    """The tiny bundle through `offramp quantize` (static int8, calibrated on its training file)."""
    from app.cli import main

    out = tmp_path_factory.mktemp("int8") / "models" / "tiny-int8"
    # A random tiny model's accuracy is noise: the accuracy gate is tested on its own; its rows
    # are held to the tiny-model bound (tests/tiny.py), the shipped bundle to the default 1e-5.
    main(["quantize", str(tiny_bundle["bundle"]), "--out", str(out), "--dev", str(tiny_bundle["dev"]),
          "--max-loss", "100", "--calibration-rows", "64", "--max-batch-dependence", str(TINY_INT8_ROW_TOLERANCE)])
    return out


@pytest.fixture(scope="session")
def tiny_fused_bundle(tmp_path_factory, tiny_bundle) -> Path:
    """The tiny bundle through `offramp quantize --method fused` (BERT layers rebuilt on fused
    int8 attention, calibrated on its training file)."""
    from app.cli import main

    out = tmp_path_factory.mktemp("fused") / "models" / "tiny-fused-int8"
    main(["quantize", str(tiny_bundle["bundle"]), "--out", str(out), "--dev", str(tiny_bundle["dev"]),
          "--max-loss", "100", "--calibration-rows", "64", "--method", "fused",
          "--max-batch-dependence", str(TINY_INT8_ROW_TOLERANCE)])
    return out


@pytest.fixture(scope="session")
def tiny_bilstm(tmp_path_factory, tiny_bundle) -> dict[str, Path]:
    """A BiLSTM distilled from the tiny teacher through `offramp train distill --method bilstm`."""
    from app.cli import main

    root = tmp_path_factory.mktemp("bilstm")
    out, checkpoint, cache = root / "models" / "words", root / "runs" / "words", root / "cache"
    main(["train", "distill", "--method", "bilstm", "--teacher", str(tiny_bundle["checkpoint"]),
          "--train", str(tiny_bundle["train"]), "--dev", str(tiny_bundle["dev"]), "--out", str(out),
          "--checkpoint", str(checkpoint), "--epochs", "2", "--embedding-size", "24", "--lstm-size", "12",
          "--head-width", "16", "--batch-size", "16", "--threads", "2", "--aug-copies", "2",
          "--cache-dir", str(cache)])
    return {"bundle": out, "checkpoint": checkpoint, "cache": cache}


@pytest.fixture(scope="session")
def tiny_cascade(tmp_path_factory, tiny_bilstm, tiny_bundle) -> Path:
    """`offramp cascade` of the tiny BiLSTM, then the tiny early-exit transformer."""
    from app.cli import main

    out = tmp_path_factory.mktemp("cascade") / "models" / "tiny-cascade"
    main(["cascade", "--stages", f"{tiny_bilstm['bundle']},{tiny_bundle['bundle']}",
          "--dev", str(tiny_bundle["dev"]), "--out", str(out), "--threads", "2"])
    return out


@pytest.fixture(scope="session")
def tiny_multitask_data(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Three tiny tasks from the shared GLUE files: sent (SST-2), pair (MRPC), sim (STS-B)."""
    from tests.tiny import glue_subset

    if not SST2.is_dir():
        pytest.skip(f"shared data not found at {SST2}")
    root = tmp_path_factory.mktemp("mt-data")
    return {"sent": glue_subset(root, "SST-2", 200, 48), "pair": glue_subset(root, "MRPC", 160, 40),
            "sim": glue_subset(root, "STS-B", 160, 40)}


@pytest.fixture(scope="session")
def tiny_multitask_bundle(tmp_path_factory, tiny_multitask_data) -> Path:
    """A multi-task bundle (tasks sent, pair, sim; 3 shared layers) trained with 2-member
    teacher ensembles and exported through the real `offramp train multitask` command."""
    from app.cli import main
    from training.data import read_examples

    root = tmp_path_factory.mktemp("mt")
    texts = [t for train, _ in tiny_multitask_data.values() for e in read_examples(train).examples
             for t in (e.text, e.text_pair) if t]
    encoder = tiny_teacher(root / "bert", texts)
    out = root / "models" / "tiny-mt"
    args = ["train", "multitask", "--teacher", str(encoder), "--out", str(out), "--checkpoint", str(root / "ckpt"),
            "--ensemble-size", "2", "--teacher-epochs", "1", "--epochs", "2", "--distill-epochs", "1",
            "--lr", "1e-3", "--teacher-lr", "1e-3", "--distill-lr", "1e-3", "--batch-size", "16",
            "--head-width", "16", "--threads", "2"]
    for name, (train, dev) in tiny_multitask_data.items():
        args += ["--task", f"{name}={train},{dev}"]
    main(args)
    return out
