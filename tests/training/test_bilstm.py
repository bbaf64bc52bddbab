"""The BiLSTM student (training/bilstm.py, training/methods/bilstm.py): its word-level tokenizer,
padding that never changes a row's answer (in PyTorch and in the exported ONNX), word vectors
from the teacher's wordpieces, and the recipe end to end through `offramp train distill`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from training.bilstm import BiLstmBackbone, BiLstmConfig, reverse_within_lengths
from training.methods.bilstm import BiLstmDistillConfig, embeddings_from_wordpieces, word_tokenizer
from training.model import EarlyExitModel


def test_the_word_tokenizer_splits_like_bert_lowercases_and_round_trips(tmp_path):
    words = word_tokenizer(["The film's charm, is real.", "a real film"])
    path = tmp_path / "tokenizer.json"
    words.save(str(path))
    again = Tokenizer.from_file(str(path))
    encoding = again.encode("The REAL charm of a dull film!")
    assert encoding.tokens == ["the", "real", "charm", "[UNK]", "a", "[UNK]", "film", "[UNK]"]
    assert again.token_to_id("[PAD]") == 0 and again.token_to_id("[MASK]") is not None
    assert json.loads(path.read_text())["model"]["type"] == "WordLevel"
    assert words.encode("a real film").ids == again.encode("a real film").ids


def test_reverse_within_lengths_reverses_each_row_and_keeps_its_padding():
    x = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1)
    out = reverse_within_lengths(x, torch.tensor([4, 2]))[..., 0]
    assert out.tolist() == [[3, 2, 1, 0], [5, 4, 6, 7]]


def _student(vocab: int = 40, seed: int = 0) -> EarlyExitModel:
    torch.manual_seed(seed)
    backbone = BiLstmBackbone(BiLstmConfig(vocab_size=vocab, embedding_size=12, lstm_size=8))
    return EarlyExitModel(backbone, 2, "maxpool", 16, teacher_head="maxpool").eval()


def _ragged(rows: int = 6, tokens: int = 11, vocab: int = 40, seed: int = 1):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, tokens + 1, size=rows)
    lengths[0] = tokens
    ids = torch.from_numpy(rng.integers(3, vocab, size=(rows, tokens)))
    mask = (torch.arange(tokens)[None, :] < torch.from_numpy(lengths)[:, None]).long()
    return ids * mask, mask, lengths


def test_padding_never_changes_a_rows_answer():
    model = _student()
    ids, mask, lengths = _ragged()
    with torch.no_grad():
        batch = model(ids, mask, torch.zeros_like(ids))[-1]
        for r, n in enumerate(lengths):
            alone = model(ids[r:r + 1, :n], mask[r:r + 1, :n], torch.zeros_like(ids[r:r + 1, :n]))[-1]
            torch.testing.assert_close(alone[0], batch[r], atol=1e-6, rtol=1e-6)


def test_the_exported_bilstm_matches_pytorch_with_padding(tmp_path):
    from app.engine import Engine
    from app.manifest import Graphs, Manifest
    from training.export import export_graphs, random_batch, verify

    model = _student()
    graphs = export_graphs(model, tmp_path)
    assert graphs.layers == ["layer_01.onnx"]
    manifest = Manifest.model_construct(graphs=Graphs(embeddings=graphs.embeddings, layers=graphs.layers),
                                        num_layers=1, labels=["0", "1"])
    engine = Engine(tmp_path, manifest)
    checks = {f"ragged{seed}": random_batch(40, rows=8, tokens=20, seed=seed) for seed in range(3)}
    result = verify(model, engine, checks)
    assert result.passed, result.max_abs_logit_diff


def test_word_vectors_start_from_the_teachers_wordpieces():
    from tests.tiny import wordpiece_tokenizer

    texts = ["a gripping film", "a dull and lifeless film", "gripping gripping lifeless"] * 20
    pieces = wordpiece_tokenizer(texts, vocab_size=60)
    words = word_tokenizer(texts)
    table = torch.randn(pieces.get_vocab_size(), 8)
    wide = embeddings_from_wordpieces(words, pieces, table, width=10, seed=0)  # wider: mean, then random
    for word in ("film", "lifeless"):
        ids = pieces.encode(word, add_special_tokens=False).ids
        torch.testing.assert_close(wide[words.token_to_id(word), :8], table[ids].mean(0))
    assert not wide[words.token_to_id("[PAD]")].any()
    narrow = embeddings_from_wordpieces(words, pieces, table, width=4, seed=0)
    assert narrow.shape == (words.get_vocab_size(), 4)
    # Narrower: the same means seen through the table's top 4 principal directions.
    from training.students import principal_directions

    film = words.token_to_id("film")
    ids = pieces.encode("film", add_special_tokens=False).ids
    torch.testing.assert_close(narrow[film], table[ids].mean(0) @ principal_directions(table, 4))


def test_the_config_defaults_are_the_papers_student():
    cfg = BiLstmDistillConfig()
    assert (cfg.embedding_size, cfg.lstm_size, cfg.head_width, cfg.exit_head) == (300, 150, 200, "maxpool")


def test_a_bilstm_distilled_end_to_end_serves_in_words(tiny_bundle, tiny_bilstm):
    from app.registry import load_model
    from training.data import read_examples

    out, ckpt = tiny_bilstm["bundle"], tiny_bilstm["checkpoint"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_layers"] == 1 and manifest["exit_head"] == "maxpool"
    assert manifest["verification"]["passed"]
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "WordLevel"
    assert (ckpt / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    student, meta = EarlyExitModel.load(ckpt)
    assert meta["backbone_kind"] == "bilstm" and meta["recipe"]["method"] == "bilstm"
    assert len(list(tiny_bilstm["cache"].glob("bilstm-augmented-*.npz"))) == 1  # built once, kept
    # The served bundle answers as the PyTorch checkpoint does, through the real engine.
    model = load_model(out)
    texts = [e.text for e in read_examples(tiny_bundle["dev"]).examples][:16]
    batch = model.encoder.encode(texts)
    served = model.engine.run(batch, np.float32(0.0)).probabilities
    with torch.no_grad():
        logits = student(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask),
                         torch.from_numpy(batch.token_type_ids))[-1]
    np.testing.assert_allclose(served, torch.softmax(logits, -1).numpy(), atol=1e-5)


def test_bilstm_refuses_options_it_does_not_have(tiny_bundle, tmp_path, capsys):
    from app.cli import main

    with pytest.raises(SystemExit) as refused:
        main(["train", "distill", "--method", "bilstm", "--teacher", str(tiny_bundle["checkpoint"]),
              "--train", str(tiny_bundle["train"]), "--dev", str(tiny_bundle["dev"]),
              "--out", str(tmp_path / "m"), "--checkpoint", str(tmp_path / "c"), "--student-layers", "2"])
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("offramp: error: bilstm: --student-layers is not an option")
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()


def _pair_student(vocab: int = 40) -> EarlyExitModel:
    torch.manual_seed(0)
    backbone = BiLstmBackbone(BiLstmConfig(vocab_size=vocab, embedding_size=12, lstm_size=8, siamese=True))
    return EarlyExitModel(backbone, 2, "siamese", 16, teacher_head="siamese").eval()


def _pairs(encoder_texts):
    words = word_tokenizer([t for pair in encoder_texts for t in pair])
    from app.encoding import TextEncoder

    return words, TextEncoder(words, 64)


PAIRS = [("the cat sat on the mat", "a cat was sitting"), ("dogs bark", "the dog barked at the mailman today"),
         ("it rained", "it rained all day long in the city"), ("short", "longer second text here")]


def test_a_pair_is_two_texts_through_one_bilstm_and_padding_changes_nothing():
    words, encoder = _pairs(PAIRS)
    batch = encoder.encode(PAIRS)
    assert batch.token_type_ids[0].tolist().count(1) == len("a cat was sitting".split())
    model = _pair_student(words.get_vocab_size())
    inputs = [torch.from_numpy(a) for a in (batch.input_ids, batch.attention_mask, batch.token_type_ids)]
    with torch.no_grad():
        together = model(*inputs)[-1]
        for r, pair in enumerate(PAIRS):
            one = encoder.encode([pair])
            alone = model(*[torch.from_numpy(a) for a in (one.input_ids, one.attention_mask, one.token_type_ids)])[-1]
            torch.testing.assert_close(alone[0], together[r], atol=1e-6, rtol=1e-6)
        # The second text matters, and which text is first does too ([h1, h2, h1*h2, |h1-h2|]).
        swapped = encoder.encode([(b, a) for a, b in PAIRS])
        other = model(*[torch.from_numpy(a) for a in (swapped.input_ids, swapped.attention_mask,
                                                       swapped.token_type_ids)])[-1]
        assert not torch.allclose(other, together)


def test_the_exported_siamese_bilstm_matches_pytorch(tmp_path):
    from app.engine import Engine
    from app.manifest import Graphs, Manifest
    from training.export import export_graphs, verify

    words, encoder = _pairs(PAIRS)
    model = _pair_student(words.get_vocab_size())
    graphs = export_graphs(model, tmp_path)
    manifest = Manifest.model_construct(graphs=Graphs(embeddings=graphs.embeddings, layers=graphs.layers),
                                        num_layers=1, labels=["0", "1"])
    result = verify(model, Engine(tmp_path, manifest), {"pairs": encoder.encode(PAIRS), "swapped":
                    encoder.encode([(b, a) for a, b in PAIRS])})
    assert result.passed, result.max_abs_logit_diff


def test_a_pair_task_trains_and_serves_with_the_siamese_student(tmp_path):
    from app.cli import main
    from app.registry import load_model
    from tests.tiny import SHARED_GLUE, tiny_teacher, write_rows
    from training.data import read_examples

    mrpc = SHARED_GLUE / "MRPC"
    if not mrpc.is_dir():
        pytest.skip("shared data not found")
    rows = lambda f, n: [(f"{e.text}\t{e.text_pair}", e.label) for e in read_examples(mrpc / f).examples[:n]]  # noqa: E731
    header = ("sentence1", "sentence2", "label")
    train = write_rows(tmp_path / "train.tsv", rows("train.tsv", 160), header=header)
    dev = write_rows(tmp_path / "dev.tsv", rows("dev.tsv", 48), header=header)
    texts = [t for line in train.read_text().splitlines()[1:] for t in line.split("\t")[:2]]
    teacher = tiny_teacher(tmp_path / "bert", texts, layers=2, hidden=16)
    common = ["--train", str(train), "--dev", str(dev), "--max-seq-length", "64",
              "--threads", "2", "--batch-size", "16"]
    main(["train", "fastbert", "--teacher", str(teacher), "--out", str(tmp_path / "models" / "t"),
          "--checkpoint", str(tmp_path / "runs" / "t"), "--epochs", "1", "--distill-epochs", "1", *common])
    main(["train", "distill", "--method", "bilstm", "--teacher", str(tmp_path / "runs" / "t"),
          "--out", str(tmp_path / "models" / "b"), "--checkpoint", str(tmp_path / "runs" / "b"), "--epochs", "2",
          "--embedding-size", "16", "--lstm-size", "8", "--head-width", "8", "--cache-dir", str(tmp_path / "cache"),
          *common])
    manifest = json.loads((tmp_path / "models" / "b" / "manifest.json").read_text())
    assert manifest["text_pair"] and manifest["exit_head"] == "siamese" and manifest["verification"]["passed"]
    model = load_model(tmp_path / "models" / "b")
    result = model.engine.run(model.encoder.encode([("a cat sat", "the cat was sitting")]), np.float32(0.0))
    assert result.exit_layer.tolist() == [1] and abs(float(result.probabilities.sum()) - 1) < 1e-5
