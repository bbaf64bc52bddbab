"""The cascade engine: one network numbered through its stages, one exit rule, rows independent."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from app.bundle import open_encoder, open_engine
from app.calibration import make_batches
from app.cascade import CascadeBatch, CascadeEngine, label_order
from app.manifest import ManifestError, read_manifest
from app.registry import load_model
from app.policies import simulate_exits
from app.uncertainty import softmax
from training.data import read_examples


@pytest.fixture(scope="module")
def cascade(tiny_cascade):
    manifest = read_manifest(tiny_cascade)
    return open_engine(tiny_cascade, manifest, intra_op_threads=1), open_encoder(tiny_cascade, manifest)


@pytest.fixture(scope="module")
def texts(tiny_bundle):
    return [e.text for e in read_examples(tiny_bundle["dev"]).examples][:40]


def test_the_manifest_numbers_layers_through_the_stages_and_lists_every_stage_file(tiny_cascade, tiny_bilstm,
                                                                                  tiny_bundle):
    manifest = read_manifest(tiny_cascade)
    bilstm, transformer = read_manifest(tiny_bilstm["bundle"]), read_manifest(tiny_bundle["bundle"])
    first, second = manifest.stages
    assert (first.first_layer, first.num_layers) == (1, 1)
    assert (second.first_layer, second.num_layers) == (2, transformer.num_layers)
    assert manifest.num_layers == 1 + transformer.num_layers and manifest.exit_head == "cascade"
    listed = {f.path for f in manifest.files}
    for stage, source in ((first, bilstm), (second, transformer)):
        assert {f"{stage.path}/{f.path}" for f in source.files} | {f"{stage.path}/manifest.json"} <= listed
    assert manifest.stage_of(1) == (first, 1) and manifest.stage_of(manifest.num_layers) == (second, second.num_layers)
    assert len(manifest.dev_results) == manifest.num_layers and manifest.calibration


def test_every_layer_is_a_stage_exit_in_order(cascade, tiny_bilstm, tiny_bundle, texts):
    engine, encoder = cascade
    batch = encoder.encode(texts)
    assert isinstance(batch, CascadeBatch) and len(batch.stages) == 2
    got = engine.all_layer_probabilities(batch)
    alone = []
    for stage, fitted in zip((tiny_bilstm["bundle"], tiny_bundle["bundle"]), engine.stages):
        manifest = read_manifest(stage)
        probs = open_engine(stage, manifest, intra_op_threads=1).all_layer_probabilities(
            open_encoder(stage, manifest).encode(texts))
        alone.append(softmax(np.log(probs) / fitted.temperature))  # each stage's own calibration
    np.testing.assert_allclose(got, np.concatenate(alone), atol=1e-5)
    assert any(stage.temperature != 1.0 for stage in engine.stages)  # fitted, not left at 1


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.2, 0.5, 0.9, 1.0])
def test_the_engine_exits_where_the_one_rule_says_on_the_concatenated_exits(cascade, texts, threshold):
    engine, encoder = cascade
    batch = encoder.encode(texts)
    exit_layer, probs = simulate_exits(engine.all_layer_probabilities(batch), threshold)
    result = engine.run(batch, threshold)
    np.testing.assert_array_equal(result.exit_layer, exit_layer)
    np.testing.assert_allclose(result.probabilities, probs, atol=1e-5)


def test_thresholds_spread_rows_over_both_stages(cascade, texts):
    engine, encoder = cascade
    batch = encoder.encode(texts)
    assert (engine.run(batch, 1.0).exit_layer == 1).all()  # the BiLSTM answers everything
    assert (engine.run(batch, 0.0).exit_layer == engine.num_layers).all()
    layers = engine.all_layer_probabilities(batch)
    from app.uncertainty import normalized_entropy

    median = float(np.median(normalized_entropy(layers[0])))
    mixed = engine.run(batch, median).exit_layer
    assert (mixed == 1).any() and (mixed > 1).any()


def test_depth_bounds_count_through_the_stages(cascade, texts):
    engine, encoder = cascade
    batch = encoder.encode(texts)
    assert (engine.run(batch, 1.0, min_layers=2).exit_layer == 2).all()  # the BiLSTM is skipped
    assert (engine.run(batch, 0.0, max_layers=1).exit_layer == 1).all()
    assert (engine.run(batch, 0.0, max_layers=3).exit_layer == 3).all()
    # A row that may not leave in stage 1 never runs it: its BiLSTM answer is not computed.
    calls = []
    first = engine.engines[0]
    original = first.run
    first.run = lambda b, *a, **k: calls.append(b.input_ids.shape[0]) or original(b, *a, **k)
    try:
        engine.run(batch, 1.0, min_layers=np.where(np.arange(len(texts)) % 2 == 0, 1, 2))
    finally:
        first.run = original
    assert calls == [len(texts[::2])]


def test_a_rows_answer_never_depends_on_its_batch_mates(cascade, texts):
    engine, encoder = cascade
    rng = np.random.default_rng(0)
    n = len(texts)
    threshold = rng.uniform(0, 1, n).astype(np.float32)
    min_layers = rng.integers(1, 3, n)
    max_layers = rng.integers(2, engine.num_layers + 1, n)
    together = engine.run(encoder.encode(texts), threshold, min_layers, max_layers)
    for i in range(0, n, 7):
        alone = engine.run(encoder.encode([texts[i]]), threshold[i], min_layers[i], max_layers[i])
        assert alone.exit_layer[0] == together.exit_layer[i]
        np.testing.assert_allclose(alone.probabilities[0], together.probabilities[i], atol=1e-5)


def test_batches_gathered_from_several_requests_keep_every_stages_tokens(cascade, texts):
    _, encoder = cascade
    a, b = encoder.encode(texts[:3]), encoder.encode(texts[3:6])
    merged = CascadeBatch.gather([(a, 0), (b, 2), (a, 1)])
    for s, stage in enumerate(merged.stages):
        for i, (source, row) in enumerate([(a, 0), (b, 2), (a, 1)]):
            n = int(source.stages[s].attention_mask[row].sum())
            assert stage.input_ids[i, :n].tolist() == source.stages[s].input_ids[row, :n].tolist()
    assert merged.input_ids is merged.stages[-1].input_ids  # batched by the costly stage's tokens
    sub = merged.rows(np.array([2, 0]))
    assert sub.stages[0].input_ids.shape[0] == 2


def test_stage_labels_are_matched_by_name():
    assert label_order(["negative", "positive"], ["positive", "negative"]).tolist() == [1, 0]
    with pytest.raises(ValueError, match="not the cascade's"):
        label_order(["neg", "pos"], ["negative", "positive"])


def test_a_tampered_stage_file_fails_verification(tiny_cascade, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(tiny_cascade, copy)
    manifest = read_manifest(copy)
    victim = copy / manifest.stages[1].path / "layer_01.onnx"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(ManifestError, match="does not match its sha256"):
        read_manifest(copy)


def test_a_manifest_is_one_bundle_or_a_cascade_never_both(tiny_cascade):
    raw = json.loads((tiny_cascade / "manifest.json").read_text())
    from app.manifest import Manifest

    with pytest.raises(ValueError, match="either graphs"):
        Manifest.model_validate({**raw, "graphs": {"embeddings": "e.onnx", "layers": ["l.onnx"]}})
    with pytest.raises(ValueError, match="at least two stages"):
        Manifest.model_validate({**raw, "stages": raw["stages"][:1], "num_layers": 1})
    gap = [raw["stages"][0], {**raw["stages"][1], "first_layer": 3}]
    with pytest.raises(ValueError, match="expected 2"):
        Manifest.model_validate({**raw, "stages": gap})


def test_the_registry_loads_a_cascade_like_any_bundle(tiny_cascade):
    model = load_model(tiny_cascade)
    assert isinstance(model.engine, CascadeEngine)
    batches = make_batches(model.encoder, ["a fine film", "dull and long"], 2)
    assert model.engine.run(batches[0], 0.0).exit_layer.tolist() == [model.manifest.num_layers] * 2
