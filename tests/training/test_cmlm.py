"""C-MLM: data, conditional masking, the teacher's cached top-K, the loss, and the tiny run from
data files to a bundle that generates over HTTP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import DataError
from training.losses import cmlm_loss, label_smoothed_nll, topk_soft_cross_entropy
from training.methods.cmlm_teacher import mask_targets, teacher_inputs
from training.seq2seq_data import (encode_pairs, normalise, plain_tokenizer, read_pairs, special_ids,
                                   student_tokenizer)

GIGAWORD = Path(__file__).resolve().parents[3] / "shared" / "data" / "gigaword"


def write_prefix(directory: Path, name: str, sources: list[str], targets: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.src").write_text("".join(s + "\n" for s in sources))
    (directory / f"{name}.tgt").write_text("".join(t + "\n" for t in targets))
    return directory / name


def gigaword_subset(directory: Path, rows: dict[str, int]) -> dict[str, Path]:
    if not GIGAWORD.is_dir():
        pytest.skip(f"shared data not found at {GIGAWORD}")
    out = {}
    for split, n in rows.items():
        src = (GIGAWORD / f"{split}.src").read_text().splitlines()[:n]
        tgt = (GIGAWORD / f"{split}.tgt").read_text().splitlines()[:n]
        out[split] = write_prefix(directory, split, src, tgt)
    return out


@pytest.fixture(scope="module")
def giga(tmp_path_factory) -> dict[str, Path]:
    return gigaword_subset(tmp_path_factory.mktemp("giga"), {"train": 48, "dev": 8, "test": 8})


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, giga) -> Path:
    from tests.tiny import tiny_teacher

    texts = [p.source for p in read_pairs(giga["train"])] + [p.target for p in read_pairs(giga["train"])]
    return tiny_teacher(tmp_path_factory.mktemp("enc") / "bert", texts, layers=2, hidden=32)


def test_normalise_maps_unknowns_and_brackets():
    assert normalise("a <unk> b UNK c -lrb- d -rrb-") == "a [UNK] b [UNK] c ( d )"
    assert normalise("UNKNOWN stays") == "UNKNOWN stays"


def test_read_pairs_names_file_and_line(tmp_path):
    prefix = write_prefix(tmp_path, "x", ["one", "two", "three"], ["a", "b"])
    with pytest.raises(DataError, match=r"x\.tgt:3: file ends here"):
        read_pairs(prefix)
    prefix = write_prefix(tmp_path, "y", ["one", "  ", "three"], ["a", "b", "c"])
    with pytest.raises(DataError, match=r"y\.src:2: empty line"):
        read_pairs(prefix)
    with pytest.raises(DataError, match=r"z\.src: no such file"):
        read_pairs(tmp_path / "z")


def test_student_vocabulary_splits_training_words_as_the_teacher(giga, encoder_dir):
    pairs = read_pairs(giga["train"])
    teacher = plain_tokenizer(encoder_dir / "tokenizer.json")
    student, mapping = student_tokenizer(encoder_dir / "tokenizer.json", pairs)
    assert student.get_vocab_size() <= teacher.get_vocab_size()
    for p in pairs:
        t = teacher.encode(p.target, add_special_tokens=False)
        s = student.encode(p.target, add_special_tokens=False)
        assert t.tokens == s.tokens
        assert [int(mapping[i]) for i in t.ids] == s.ids
    assert student.encode("x").tokens[0] == "[CLS]" and student.encode("x").tokens[-1] == "[SEP]"
    assert list(special_ids(student).values()) == [0, 1, 2, 3, 4]


def test_conditional_masking_touches_only_target_tokens():
    sources, targets = [[7, 8, 9, 10], [11, 12]], [[20, 21, 22, 23, 24, 25, 26], [30]]
    ids, types, attention, positions = teacher_inputs(sources, targets, cls_id=2, sep_id=3, pad_id=0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        masked, labels = mask_targets(ids, positions, 0.15, mask_id=4, rng=rng)
        for row, pos in enumerate(positions):
            changed = set(np.flatnonzero(masked[row] != ids[row]))
            assert changed and changed <= set(pos)  # at least one, never a source token or padding
            assert len(changed) == max(1, round(0.15 * len(pos)))
            assert set(np.flatnonzero(labels[row] != -100)) == changed
            assert (labels[row][sorted(changed)] == ids[row][sorted(changed)]).all()
    # the target (and its final [SEP]) are segment 1; the source segment 0
    assert types[0].tolist() == [0] * 6 + [1] * 8 and attention[1].tolist() == [1] * 6 + [0] * 8


def test_losses_against_hand_computed_values():
    logits = torch.tensor([[[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, -100]])
    log_p = torch.log_softmax(logits[0, 0], -1)
    hand_nll = 0.9 * -log_p[0] + 0.1 * -log_p.mean()
    assert label_smoothed_nll(logits, labels, 0.1).item() == pytest.approx(hand_nll.item(), rel=1e-6)
    # teacher top-2 ids 0 and 3 with logits 20 and 10 at T = 10: p = softmax([2, 1])
    ids, top = torch.tensor([[0, 3]]), torch.tensor([[20.0, 10.0]])
    p0 = math.exp(2) / (math.exp(2) + math.exp(1))
    hand_soft = -(p0 * log_p[0] + (1 - p0) * log_p[3])
    assert topk_soft_cross_entropy(logits[0, :1], ids, top, 10.0).item() == pytest.approx(hand_soft.item(), rel=1e-6)
    hand = 0.5 * hand_nll + 0.5 * hand_soft
    assert cmlm_loss(logits, labels, ids, top, alpha=0.5, temperature=10.0).item() == pytest.approx(hand.item(), rel=1e-6)
    # an id the student lacks (-1) is dropped and the rest renormalised
    only = topk_soft_cross_entropy(logits[0, :1], torch.tensor([[0, -1]]), top, 10.0)
    assert only.item() == pytest.approx(-log_p[0].item(), rel=1e-6)
    assert cmlm_loss(logits, labels, None, None).item() == pytest.approx(hand_nll.item(), rel=1e-6)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, giga, encoder_dir) -> Path:
    from app.cli import main

    out = tmp_path_factory.mktemp("cmlm") / "teacher"
    main(["train", "cmlm-teacher", "--teacher", str(encoder_dir), "--train", str(giga["train"]), "--out", str(out),
          "--epochs", "1", "--batch-size", "16", "--lr", "1e-3"])
    return out


def test_cached_topk_matches_a_fresh_teacher_pass(teacher_dir, giga):
    from transformers import AutoModelForMaskedLM

    cache = np.load(teacher_dir / "teacher_topk.npz")
    meta = json.loads((teacher_dir / "cmlm_teacher.json").read_text())
    cfg = meta["config"]
    tok = plain_tokenizer(teacher_dir / "tokenizer.json")
    specials = special_ids(tok)
    data = encode_pairs(tok, read_pairs(giga["train"]), cfg["max_source"], cfg["max_target"])
    model = AutoModelForMaskedLM.from_pretrained(teacher_dir).eval()
    passes = math.ceil(1 / cfg["mask_rate"])
    mapping = np.load(teacher_dir / "teacher_to_student.npy")
    for pair in (0, 5, 17):
        ids, types, attention, positions = teacher_inputs([data.sources[pair]], [data.targets[pair]],
                                                          specials["bos"], specials["eos"], specials["pad"])
        for j, position in enumerate(positions[0]):
            masked = ids.copy()
            masked[0, positions[0][j % passes::passes]] = specials["mask"]  # the pass that predicted j
            with torch.no_grad():
                logits = model(input_ids=torch.from_numpy(masked), token_type_ids=torch.from_numpy(types),
                               attention_mask=torch.from_numpy(attention)).logits[0, position]
            values, indices = logits.topk(cfg["top_k"])
            row = cache["offsets"][pair] + j
            assert cache["ids"][row].tolist() == indices.tolist()
            np.testing.assert_allclose(cache["logits"][row].astype(np.float32), values.numpy(), rtol=2e-3, atol=2e-3)
            assert cache["student_ids"][row].tolist() == mapping[indices.numpy()].tolist()
    assert cache["offsets"][-1] == sum(len(t) + 1 for t in data.targets)


def test_student_refuses_a_cache_of_other_data(teacher_dir, giga, tmp_path):
    from app.cli import main

    other = gigaword_subset(tmp_path / "other", {"train": 40})["train"]
    with pytest.raises(SystemExit) as exc:
        main(["train", "cmlm", "--teacher-dir", str(teacher_dir), "--train", str(other), "--dev", str(giga["dev"]),
              "--out", str(tmp_path / "b"), "--epochs", "1"])
    assert exc.value.code == 2


def test_joint_exit_draws_follow_depth():
    from training.methods.cmlm import draw_exit

    rng = np.random.default_rng(0)
    counts = np.bincount([draw_exit(rng, 6) for _ in range(15000)], minlength=5)
    assert counts.size == 5  # never the last layer: its loss is always there
    np.testing.assert_allclose(counts / counts.sum(), np.arange(1, 6) / 15, atol=0.015)


@pytest.mark.parametrize("exit_weight", [0.0, 1.0])
def test_joint_training_trains_the_early_exits_only_when_asked(teacher_dir, giga, tmp_path, exit_weight):
    from training.loop import seed_everything
    from training.methods.cmlm import StudentConfig, new_student, train_student

    tokenizer = plain_tokenizer(teacher_dir / "student_tokenizer.json")
    specials = special_ids(tokenizer)
    data = encode_pairs(tokenizer, read_pairs(giga["train"]), 62, 24)
    cfg = StudentConfig(epochs=3, batch_size=16, d_model=32, num_heads=4, ffn_size=64, encoder_layers=1,
                        decoder_layers=3, exit_weight=exit_weight)
    seed_everything(cfg.seed)  # as train_student does: the same initial weights
    fresh = new_student(cfg, tokenizer.get_vocab_size(), specials)
    model, _ = train_student(data, data, specials, tokenizer.get_vocab_size(), cfg, tmp_path, None,
                             device=torch.device("cpu"))
    for i in range(3):
        moved = not torch.equal(model.exit_norms[i].weight, fresh.exit_norms[i].weight)
        assert moved == (i == 2 or exit_weight > 0), i
        assert torch.equal(model.exit_confidence[i].weight, fresh.exit_confidence[i].weight)  # stage 2's


TINY_STUDENT = ["--epochs", "3", "--exit-epochs", "1", "--exit-weight", "1", "--batch-size", "16", "--lr", "3e-3", "--d-model", "32",
                "--num-heads", "4", "--ffn-size", "64", "--encoder-layers", "1", "--decoder-layers", "3",
                "--max-new-tokens", "8", "--num-beams", "2"]


@pytest.fixture(scope="module")
def tiny_cmlm_bundle(tmp_path_factory, teacher_dir, giga) -> Path:
    from app.cli import main

    root = tmp_path_factory.mktemp("student")
    bundle = root / "models" / "tiny-gen"
    main(["train", "cmlm", "--teacher-dir", str(teacher_dir), "--train", str(giga["train"]), "--dev", str(giga["dev"]),
          "--test", str(giga["test"]), "--out", str(bundle), "--checkpoint", str(root / "run"), *TINY_STUDENT])
    return bundle


def test_the_tiny_run_trains_exports_calibrates(tiny_cmlm_bundle):
    from app.manifest import read_manifest

    m = read_manifest(tiny_cmlm_bundle)
    g = m.generation
    assert m.task == "generation" and m.num_layers == 3 and m.verification.passed
    assert [p.threshold for p in g.calibration][0] == 0.0 and g.full_depth.mean_exit_layer == 3
    assert all(1 <= p.mean_exit_layer <= 3 for p in g.calibration)
    assert m.recommended_threshold in [p.threshold for p in g.calibration]
    results = json.loads((Path(m.provenance.checkpoint) / "results.json").read_text())
    assert results["distilled"] and set(results["test_rouge"]) == {"rouge1", "rouge2", "rougeL"}
    assert results["test_onnx"][0]["threshold"] == 0.0


def test_a_rerun_resumes_the_finished_student(tiny_cmlm_bundle, teacher_dir, giga, caplog):
    import logging

    from app.cli import main
    from app.manifest import read_manifest

    run = Path(read_manifest(tiny_cmlm_bundle).provenance.checkpoint)
    caplog.set_level(logging.INFO, logger="offramp.train")
    main(["train", "cmlm", "--teacher-dir", str(teacher_dir), "--train", str(giga["train"]), "--dev", str(giga["dev"]),
          "--out", str(run.parent / "again"), "--checkpoint", str(run), *TINY_STUDENT])
    assert "is trained, evaluating it" in caplog.text


def test_the_bundle_generates_over_http(tiny_cmlm_bundle, giga):
    import signal

    import httpx

    from tests.serving import start_server

    proc, url = start_server(tiny_cmlm_bundle.parent)
    try:
        sources = [p.source for p in read_pairs(giga["dev"])][:3]
        full = httpx.post(f"{url}/v1/models/tiny-gen/generate", json={"inputs": sources, "threshold": 0,
                                                                      "num_beams": 1, "max_new_tokens": 6}, timeout=60)
        assert full.status_code == 200, full.text
        outputs = full.json()["outputs"]
        assert len(outputs) == 3
        for o in outputs:
            assert isinstance(o["text"], str) and len(o["tokens"]) <= 6 and o["mean_exit_layer"] == 3
        fast = httpx.post(f"{url}/v1/models/tiny-gen/generate", json={"inputs": sources, "threshold": 1.0,
                                                                      "num_beams": 1, "max_new_tokens": 6}, timeout=60)
        assert fast.status_code == 200 and all(o["mean_exit_layer"] == 1 for o in fast.json()["outputs"])
        bad = httpx.post(f"{url}/v1/models/tiny-gen/generate", json={"inputs": sources, "num_beams": 0}, timeout=60)
        assert bad.status_code == 422 and "num_beams" in bad.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
