"""app/generation.py: the source encoder, and the ONNX engine's per-token exits and search against
the PyTorch reference (training/seq2seq_model.py IncrementalDecoder through the same app/search.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.generation import Generated, GenerationEngine, OnnxStepper, SourceBatch
from app.manifest import read_manifest
from app.search import generate
from tests.tiny import GENERATION_TEXTS, tiny_generation_bundle_dir, tiny_generation_model, tiny_generation_tokenizer
from training.generation_eval import TorchStepper

LAYERS = 3
SOURCES = GENERATION_TEXTS[:8]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_generation_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_generation_model(tokenizer, seed=0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, model, tokenizer):
    bundle = tiny_generation_bundle_dir(tmp_path_factory.mktemp("gen") / "bundle", model=model, tokenizer=tokenizer)
    return GenerationEngine(bundle, read_manifest(bundle), intra_op_threads=1)


def run_engine(engine, texts, threshold=0.0, max_new=10, beams=1, ngram=0) -> list[Generated]:
    rows = len(texts)
    full = lambda v, dtype=np.int64: np.broadcast_to(np.asarray(v, dtype=dtype), (rows,)).copy()  # noqa: E731
    return engine.generate(engine.encoder.encode(texts), max_new_tokens=full(max_new), num_beams=full(beams),
                           threshold=full(threshold, np.float32), no_repeat_ngram_size=full(ngram))


def run_torch(engine, model, texts, threshold=0.0, max_new=10, beams=1, ngram=0):
    batch = engine.encoder.encode(texts)
    rows = len(texts)
    return generate(TorchStepper(model, batch.input_ids, batch.attention_mask), rows, bos_id=engine.spec.bos_id,
                    eos_id=engine.spec.eos_id, max_new_tokens=np.full(rows, max_new, dtype=np.int64),
                    threshold=np.full(rows, threshold, dtype=np.float32), num_beams=beams,
                    no_repeat_ngram_size=ngram, banned_ids=engine.banned_ids)


# ---- the source encoder ---------------------------------------------------------------------
def test_encode_adds_cls_and_sep_and_flags_truncation(engine):
    encoder = engine.encoder
    long = " ".join(GENERATION_TEXTS)
    batch = encoder.encode(["council approves budget", long, "\u200b"])
    assert batch.rows == 3 and batch.input_ids.shape[1] == 24 == encoder.max_source_tokens
    assert list(batch.truncated) == [False, True, False] and list(batch.empty) == [False, False, True]
    assert list(batch.lengths) == list(batch.attention_mask.sum(axis=1)) and batch.lengths[2] == 2
    pieces = encoder.tokenizer.encode("council approves budget", add_special_tokens=False).ids
    assert list(batch.input_ids[0, :batch.lengths[0]]) == [2, *pieces, 3]
    assert batch.input_ids[1, -1] == 3 and (batch.input_ids[0, batch.lengths[0]:] == 0).all()


def test_select_and_gather_repad_rows(engine):
    a = engine.encoder.encode(["local team wins cup", "the president will visit china next week"])
    b = engine.encoder.encode(["fine"])
    one = a.select(np.array([0]))
    assert one.input_ids.shape == (1, a.lengths[0]) and (one.input_ids[0] == a.input_ids[0, :a.lengths[0]]).all()
    merged = SourceBatch.gather([(b, 0), (a, 1), (a, 0)])
    assert merged.input_ids.shape == (3, a.lengths[1]) and list(merged.lengths) == [b.lengths[0], *a.lengths[::-1]]
    for i, (batch, row) in enumerate([(b, 0), (a, 1), (a, 0)]):
        n = batch.lengths[row]
        assert (merged.input_ids[i, :n] == batch.input_ids[row, :n]).all() and merged.attention_mask[i, n:].sum() == 0


def test_decode_merges_wordpieces(engine):
    ids = engine.encoder.tokenizer.encode("the council approved", add_special_tokens=False).ids
    text, tokens = engine.encoder.decode(ids)
    assert text == "the council approved" and "".join(t.removeprefix("##") for t in tokens) == "thecouncilapproved"
    assert any(t.startswith("##") for t in tokens)  # the tiny vocabulary splits words: merging is exercised


# ---- the stepper against IncrementalDecoder --------------------------------------------------
@pytest.mark.parametrize("compact_below", [0.0, 0.5, 1.0])  # never, when half have left, always
@pytest.mark.parametrize("threshold", [0.0, 0.4, 0.6])
def test_onnx_stepper_matches_incremental_decoder_token_by_token(engine, model, threshold, compact_below):
    """Teacher-forced random tokens, per-token exits, a reorder in the middle: the same
    log-probs and exit layers at every step (the caches of skipped layers included), whether the
    rows that go on run on a compacted batch or with the others."""
    batch = engine.encoder.encode(SOURCES)
    rows = batch.rows
    memory = engine.graphs.encode(batch.input_ids, batch.attention_mask)
    onnx = OnnxStepper(engine.graphs, *engine.graphs.cross_kv(memory), batch.attention_mask,
                       compact_below=compact_below)
    reference = TorchStepper(model, batch.input_ids, batch.attention_mask)
    rng = np.random.default_rng(0)
    thresholds = np.full(rows, threshold, dtype=np.float32)
    exits = []
    for step in range(7):
        if step in (3, 5):  # beams reorder: keep and repeat some rows; then swap two of one source
            keep = np.array([5, 0, 0, 7, 2] if step == 3 else [0, 2, 1, 3, 4], dtype=np.int64)
            onnx.reorder(keep)
            reference.reorder(keep)
            thresholds = thresholds[keep]
        tokens = np.full(len(thresholds), engine.spec.bos_id) if step == 0 else \
            rng.integers(5, engine.spec.vocab_size, size=len(thresholds))
        log_probs, layer = onnx.step(tokens.astype(np.int64), thresholds)
        expected_log_probs, expected_layer = reference.step(tokens, thresholds)
        np.testing.assert_array_equal(layer, expected_layer)
        np.testing.assert_allclose(log_probs, expected_log_probs, atol=1e-4)
        exits.extend(layer)
    assert onnx.layers_needed == sum(exits)
    if threshold == 0.0:
        assert set(exits) == {LAYERS} and onnx.layers_run == len(exits) * LAYERS
        return
    assert len(set(exits)) >= 2 and min(exits) < LAYERS  # tokens really left early...
    if compact_below == 1.0:
        assert onnx.layers_run == sum(exits)  # ...and, compacted at once, the layers they skipped were not run
    elif compact_below == 0.0:
        assert onnx.layers_run > sum(exits)  # never compacted: the layers ran on every row, results dropped


# ---- whole generations ----------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.0, 0.4])
def test_greedy_onnx_equals_pytorch(engine, model, threshold):
    out = run_engine(engine, SOURCES, threshold=threshold)
    expected = run_torch(engine, model, SOURCES, threshold=threshold)
    assert [o.token_ids for o in out] == [h.token_ids for h in expected]
    assert [o.exit_layers for o in out] == [h.exit_layers for h in expected]
    layers = [layer for o in out for layer in o.exit_layers]
    if threshold == 0.0:
        assert set(layers) == {LAYERS} and all(o.mean_exit_layer == LAYERS for o in out)
        assert any(len(o.token_ids) < 10 for o in out)  # some end at eos (rows leave the search)
    else:
        assert min(layers) < LAYERS and sum(layers) < LAYERS * len(layers)
    assert len({tuple(o.token_ids) for o in out}) >= 3  # the sources matter
    for o in out:
        assert o.text == engine.encoder.decode(o.token_ids)[0] and len(o.tokens) == len(o.token_ids)
        assert not set(o.token_ids) & set(engine.banned_ids) and engine.spec.eos_id not in o.token_ids


def test_full_depth_is_the_teacher_forced_argmax_path(engine, model):
    batch = engine.encoder.encode(SOURCES)
    out = run_engine(engine, SOURCES, threshold=0.0)
    eos = engine.spec.eos_id
    for row, o in enumerate(out):
        ended = len(o.exit_layers) > len(o.token_ids)
        target = [*o.token_ids, eos] if ended else o.token_ids
        n = batch.lengths[row]
        with torch.no_grad():
            logits = model(torch.from_numpy(batch.input_ids[row:row + 1, :n]),
                           torch.from_numpy(batch.attention_mask[row:row + 1, :n]),
                           torch.tensor([[engine.spec.bos_id, *target[:-1]]]))[0]
        logits[:, engine.banned_ids] = -np.inf
        logits[0, eos] = -np.inf  # min_new_tokens = 1
        assert logits.argmax(dim=-1).tolist() == target


def test_a_row_alone_is_the_row_in_a_batch(engine):
    texts = SOURCES[:5]
    thresholds = np.array([0.0, 0.4, 0.6, 0.3, 0.5], dtype=np.float32)
    maxima = np.array([10, 4, 7, 9, 2], dtype=np.int64)
    batch = engine.encoder.encode(texts)
    together = engine.generate(batch, max_new_tokens=maxima, num_beams=np.ones(5, np.int64), threshold=thresholds,
                               no_repeat_ngram_size=np.zeros(5, np.int64))
    for row in range(5):
        (alone,) = engine.generate(engine.encoder.encode([texts[row]]), max_new_tokens=maxima[row:row + 1],
                                   num_beams=np.ones(1, np.int64), threshold=thresholds[row:row + 1],
                                   no_repeat_ngram_size=np.zeros(1, np.int64))
        assert alone == together[row]
        assert len(alone.token_ids) <= maxima[row]


@pytest.mark.parametrize("threshold", [0.0, 0.4])
def test_beam_search_onnx_equals_pytorch(engine, model, threshold):
    out = run_engine(engine, SOURCES, threshold=threshold, beams=3, ngram=2)
    expected = run_torch(engine, model, SOURCES, threshold=threshold, beams=3, ngram=2)
    assert [o.token_ids for o in out] == [h.token_ids for h in expected]
    assert [o.exit_layers for o in out] == [h.exit_layers for h in expected]
    greedy = run_engine(engine, SOURCES, threshold=threshold, ngram=2)
    assert [o.token_ids for o in out] != [g.token_ids for g in greedy]  # the beams did search


def test_rows_with_different_parameters_share_a_call(engine):
    texts = SOURCES[:6]
    beams = np.array([1, 2, 1, 3, 2, 1], dtype=np.int64)
    ngrams = np.array([0, 0, 2, 0, 0, 0], dtype=np.int64)
    thresholds = np.array([0.0, 0.4, 0.4, 0.0, 0.6, 0.5], dtype=np.float32)
    maxima = np.array([5, 6, 7, 8, 9, 10], dtype=np.int64)
    mixed = engine.generate(engine.encoder.encode(texts), max_new_tokens=maxima, num_beams=beams,
                            threshold=thresholds, no_repeat_ngram_size=ngrams)
    for row, text in enumerate(texts):
        (alone,) = run_engine(engine, [text], threshold=thresholds[row], max_new=maxima[row], beams=beams[row],
                              ngram=ngrams[row])
        assert mixed[row] == alone


def test_limits_warm_up_and_empty_batches(engine):
    engine.warm_up()
    assert engine.num_layers == LAYERS and engine.spec.max_target_length == 24
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_engine(engine, ["fine"], max_new=24)
    assert run_engine(engine, ["fine"], max_new=23)[0].exit_layers
    empty = engine.encoder.encode(["fine"]).select(np.zeros(0, dtype=np.int64))
    assert engine.generate(empty, max_new_tokens=np.zeros(0), num_beams=np.zeros(0), threshold=np.zeros(0),
                           no_repeat_ngram_size=np.zeros(0)) == []
    assert Generated("", [], [], []).mean_exit_layer == 0.0
