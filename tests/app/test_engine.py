import numpy as np
import pytest

from app.engine import Engine
from app.registry import load_model
from app.policies import simulate_exits
from training.data import read_examples

TEXTS = ["a gripping , beautifully acted film", "dull", "it 's not that the movie is bad , "
         "it 's that it never decides what it wants to be , and so it wanders for two hours",
         "charming", "the plot makes no sense at all"]


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return load_model(tiny_bundle["bundle"])


def _run_alone(model, text, threshold, min_layers=1, max_layers=None):
    return model.engine.run(model.encoder.encode([text]), threshold, min_layers, max_layers)


def test_rows_are_independent_of_their_batch(model):
    """Each row, alone vs in a mixed batch of other thresholds and lengths: same answer."""
    thresholds = np.array([0.0, 0.999, 0.5, 1.0, 0.9995], dtype=np.float32)
    mixed = model.engine.run(model.encoder.encode(TEXTS), thresholds)
    assert len(set(mixed.exit_layer.tolist())) > 1  # the batch really was compacted
    for i, text in enumerate(TEXTS):
        alone = _run_alone(model, text, thresholds[i])
        assert alone.exit_layer[0] == mixed.exit_layer[i]
        assert alone.probabilities[0].argmax() == mixed.probabilities[i].argmax()
        np.testing.assert_allclose(alone.probabilities[0], mixed.probabilities[i], atol=1e-5)


def test_threshold_zero_is_full_depth_and_one_is_first_exit(model):
    batch = model.encoder.encode(TEXTS)
    full = model.engine.run(batch, 0.0)
    assert full.exit_layer.tolist() == [3] * len(TEXTS)
    np.testing.assert_allclose(full.probabilities, model.engine.all_layer_probabilities(batch)[-1], atol=1e-6)
    assert model.engine.run(batch, 1.0).exit_layer.tolist() == [1] * len(TEXTS)
    assert full.layers_executed == 3 * len(TEXTS)


def test_depth_bounds(model):
    batch = model.encoder.encode(TEXTS)
    assert model.engine.run(batch, 1.0, min_layers=2).exit_layer.tolist() == [2] * len(TEXTS)
    assert model.engine.run(batch, 0.0, max_layers=2).exit_layer.tolist() == [2] * len(TEXTS)


def test_engine_matches_the_simulated_exit_rule(model, tiny_bundle):
    texts = [e.text for e in read_examples(tiny_bundle["dev"]).examples]
    batch = model.encoder.encode(texts)
    layer_probs = model.engine.all_layer_probabilities(batch)
    for threshold in (0.0, 0.99, 0.999, 0.9999, 1.0):
        real = model.engine.run(batch, threshold)
        layers, probs = simulate_exits(layer_probs, threshold)
        assert real.exit_layer.tolist() == layers.tolist()
        np.testing.assert_allclose(real.probabilities, probs, atol=1e-5)


def test_truncation_is_reported(model):
    batch = model.encoder.encode(["word " * 500, "short"])
    assert batch.truncated.tolist() == [True, False]
    assert batch.input_ids.shape[1] == model.manifest.max_seq_length


def test_dynamic_padding_to_longest_row(model):
    batch = model.encoder.encode(["a", "a b c d"])
    assert batch.input_ids.shape[1] == 6  # [CLS] a b c d [SEP]
    assert batch.attention_mask.sum(axis=1).tolist() == [3, 6]


def test_unknown_provider_is_an_error(tiny_bundle):
    with pytest.raises(ValueError, match="provider"):
        Engine(tiny_bundle["bundle"], provider="tpu")


def test_cuda_falls_back_to_cpu_with_a_warning(tiny_bundle, caplog):
    import onnxruntime as ort

    engine = Engine(tiny_bundle["bundle"], provider="cuda", intra_op_threads=1)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert engine.active_provider == "CUDAExecutionProvider"
    else:
        assert engine.active_provider == "CPUExecutionProvider"
        assert "CUDA provider requested but not available" in caplog.text


def test_io_binding_path_gives_the_same_answers(tiny_bundle):
    """The path CUDA uses (hidden states kept as OrtValues between layers), run on the CPU."""
    plain = Engine(tiny_bundle["bundle"], intra_op_threads=1)
    bound = Engine(tiny_bundle["bundle"], intra_op_threads=1, io_binding=True)
    assert bound.io_binding and not plain.io_binding
    model = load_model(tiny_bundle["bundle"])
    batch = model.encoder.encode(TEXTS)
    thresholds = np.array([0.0, 0.999, 0.5, 1.0, 0.9995], dtype=np.float32)
    a, b = plain.run(batch, thresholds), bound.run(batch, thresholds)
    assert a.exit_layer.tolist() == b.exit_layer.tolist()
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
    np.testing.assert_allclose(plain.all_layer_probabilities(batch), bound.all_layer_probabilities(batch), atol=1e-6)
