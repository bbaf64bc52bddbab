"""Length groups, and the answers of every backend and quantisation: a row's answer never
depends on its batch-mates, nor on how the engine groups the batch."""

import itertools

import numpy as np
import pytest

from app.engine import Engine, length_groups
from app.registry import load_model
from app.uncertainty import normalized_entropy
from training.data import read_examples
from tests.tiny import TINY_INT8_ROW_TOLERANCE


def _brute_force_cost(lengths, cost):
    """Cheapest split of the sorted lengths into contiguous groups, by trying every split."""
    ordered = sorted(lengths)
    best = None
    for cuts in itertools.product([0, 1], repeat=len(ordered) - 1):
        groups, start = [], 0
        for i, cut in enumerate(cuts, 1):
            if cut:
                groups.append(ordered[start:i])
                start = i
        groups.append(ordered[start:])
        total = sum(len(g) * max(g) + cost for g in groups)
        best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize("lengths", [[5, 5, 5], [3, 40, 4, 41, 5, 90], [10, 12, 64, 11, 63, 9, 128, 8]])
@pytest.mark.parametrize("cost", [0, 16, 96, 1000])
def test_length_groups_cover_every_row_once_at_the_least_cost(lengths, cost):
    groups = length_groups(np.array(lengths), cost)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    total = sum(len(g) * max(lengths[i] for i in g) + cost for g in groups)
    assert total == _brute_force_cost(lengths, cost)


def test_one_length_is_one_group():
    assert len(length_groups(np.array([7, 7, 7, 7]), 0)) == 1


def test_huge_call_cost_keeps_the_batch_whole_and_zero_splits_every_length():
    lengths = np.array([3, 40, 4, 41, 5, 90])
    assert len(length_groups(lengths, 10**9)) == 1
    assert len(length_groups(lengths, 0)) == len(set(lengths.tolist()))


def _texts(tiny_bundle):
    return [e.text for e in read_examples(tiny_bundle["dev"]).examples][:40]


@pytest.fixture(scope="module", params=["fp32", "int8", "fused"])
def bundle(request, tiny_bundle, tiny_int8_bundle, tiny_fused_bundle):
    return {"fp32": tiny_bundle["bundle"], "int8": tiny_int8_bundle, "fused": tiny_fused_bundle}[request.param]


def _skip_openvino(bundle):
    pytest.importorskip("openvino", reason="provider openvino needs: pip install 'offramp[openvino]'")
    if "fused" in bundle.name:
        pytest.skip("OpenVINO refuses fused int8 bundles (tests/training/test_fused_int8.py)")


@pytest.mark.parametrize("provider", ["cpu", "openvino"])
def test_rows_alone_match_rows_in_a_grouped_mixed_batch(bundle, provider, tiny_bundle):
    if provider == "openvino":
        _skip_openvino(bundle)
    model = load_model(bundle)
    engine = Engine(bundle, model.manifest, provider=provider, intra_op_threads=2, group_call_cost_tokens=0)
    texts = _texts(tiny_bundle)
    batch = model.encoder.encode(texts)
    assert len(engine.groups(batch)) > 1  # the batch really was split
    thresholds = np.linspace(0.0, 1.0, len(texts)).astype(np.float32)
    mixed = engine.run(batch, thresholds)
    assert len(set(mixed.exit_layer.tolist())) > 1
    whole = Engine(bundle, model.manifest, provider=provider, intra_op_threads=2, group_call_cost_tokens=None)
    unsplit = whole.run(batch, thresholds)
    # A row whose uncertainty at some layer is within rounding of its threshold may leave one
    # layer apart on another call (a tie, not a dependence on the batch): such rows, rare with a
    # random model, are left out of the exit comparison.
    uncertainty = normalized_entropy(engine.all_layer_probabilities(batch))
    ties = (np.abs(uncertainty - thresholds[None, :]) < 1e-4).any(axis=0)
    assert ties.sum() <= 2
    atol = TINY_INT8_ROW_TOLERANCE if bundle.name.endswith("int8") else 1e-5
    for i, text in enumerate(texts):
        if ties[i]:
            continue
        alone = engine.run(model.encoder.encode([text]), thresholds[i])
        assert alone.exit_layer[0] == mixed.exit_layer[i] == unsplit.exit_layer[i]
        np.testing.assert_allclose(alone.probabilities[0], mixed.probabilities[i], atol=atol)
        np.testing.assert_allclose(unsplit.probabilities[i], mixed.probabilities[i], atol=atol)
    probs = engine.all_layer_probabilities(batch)
    np.testing.assert_allclose(probs, whole.all_layer_probabilities(batch), atol=atol)


def test_openvino_answers_like_onnx_runtime(bundle, tiny_bundle):
    _skip_openvino(bundle)
    model = load_model(bundle)
    batch = model.encoder.encode(_texts(tiny_bundle))
    ov = Engine(bundle, model.manifest, provider="openvino", intra_op_threads=2)
    assert ov.active_provider == "OpenVINOExecutionProvider"
    ort_probs = model.engine.all_layer_probabilities(batch)
    ov_probs = ov.all_layer_probabilities(batch)
    # The same graphs on another runtime: fp32 agrees to rounding; int8 kernels requantise at
    # slightly different points (measured on the real model: docs/benchmarks.md).
    atol = 6e-2 if bundle.name.endswith("int8") else 1e-4
    np.testing.assert_allclose(ov_probs, ort_probs, atol=atol)
    # Labels agree wherever the answer is not a toss-up within that tolerance (a random tiny
    # model puts many rows near 0.5).
    top2 = np.sort(ort_probs[-1], axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * atol
    assert (ov_probs[-1].argmax(-1) == ort_probs[-1].argmax(-1))[clear].all()


def test_openvino_missing_is_a_clear_error(tiny_bundle, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    from app.backends import BackendUnavailable

    with pytest.raises(BackendUnavailable, match=r"offramp\[openvino\]"):
        Engine(tiny_bundle["bundle"], provider="openvino")
