"""`offramp quantize --method fused`: BERT layers rebuilt on ONNX Runtime's fused int8 kernels."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from app.cli import main
from app.engine import Engine
from app.manifest import read_manifest
from app.registry import load_model
from training import fused_int8
from training.data import read_examples


def _layer(bundle, index=0) -> onnx.ModelProto:
    manifest = read_manifest(bundle)
    return onnx.load(bundle / manifest.graphs.layers[index])


def test_fused_layers_compute_in_int8_without_reshapes(tiny_fused_bundle):
    manifest = read_manifest(tiny_fused_bundle)
    assert manifest.quantization.method.startswith("fused static int8")
    assert manifest.quantization.batch_dependence <= 1e-5
    for index in range(manifest.num_layers):
        graph = _layer(tiny_fused_bundle, index).graph
        backbone = fused_int8._ancestors(graph, ["hidden_out"], {"hidden", "attention_mask"})
        ops = [n.op_type for n in backbone]
        assert ops.count("QAttention") == 1 and ops.count("MatMulIntegerToFloat") == 3
        assert ops.count("SkipLayerNormalization") == 2
        # the layer itself: no head reshapes, no additive mask, nothing computed in fp32 MatMuls
        assert not {"Reshape", "Transpose", "MatMul", "Softmax", "Erf", "Sub"} & set(ops)
        assert len(backbone) == 13  # lengths 2, quantisers 4, fused operators 7
        # the FastBERT exit rebuilt too: int8 projections, [CLS]-only attention, no reshapes
        everything = [n.op_type for n in graph.node]
        assert not {"Reshape", "Transpose", "Softmax"} & set(everything)
        assert everything.count("MultiHeadAttention") == 1 and everything.count("MatMulIntegerToFloat") == 5
        constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        weights = [constants[n.input[1]].dtype for n in backbone if n.op_type in ("QAttention", "MatMulIntegerToFloat")]
        zero_points = [constants[n.input[2]].dtype for n in backbone if n.op_type == "QuantizeLinear"]
        assert weights and set(weights) == {np.dtype("int8")}
        assert len(zero_points) == 4 and set(zero_points) == {np.dtype("uint8")}


def test_fp32_rebuild_reproduces_the_exported_layer_on_padded_rows(tiny_bundle):
    source = _layer(tiny_bundle["bundle"], 1)
    feeds = fused_int8.check_inputs(32, [])
    layer, heads, head, exit_heads = fused_int8.fused_fp32(source, feeds)
    assert heads == 2  # tests/tiny.py: width 32, 2 attention heads
    assert isinstance(head, fused_int8.FastBertHead) and exit_heads == 2  # training/model.py
    # The head counts are checked, not assumed: a wrong one does not reproduce the layer.
    layer.head_dims = [8]
    with pytest.raises(fused_int8.UnsupportedLayer, match="does not reproduce"):
        fused_int8.fit_heads(source, layer, head, feeds)
    # Any other exit head is copied as exported, and still reproduces the layer.
    layer.head_dims = [16]
    _, _, spliced, _ = fused_int8.fit_heads(source, layer, fused_int8.head_subgraph(source), feeds)
    assert isinstance(spliced, fused_int8.SplicedHead)


def test_fused_bundle_answers_like_the_fp32_bundle(tiny_bundle, tiny_fused_bundle):
    texts = [e.text for e in read_examples(tiny_bundle["dev"]).examples][:32]
    fp32, fused = load_model(tiny_bundle["bundle"]), load_model(tiny_fused_bundle)
    batch = fp32.encoder.encode(texts)
    a = fp32.engine.all_layer_probabilities(batch)
    b = fused.engine.all_layer_probabilities(batch)
    # int8 rounding of a random tiny model; a broken rebuild (wrong weights, heads or mask)
    # is off by far more than this
    assert np.abs(a - b).max() < 0.05
    assert (a[-1].argmax(-1) == b[-1].argmax(-1)).mean() >= 0.9


def test_activation_scale_covers_the_range_and_zero():
    values = np.linspace(-0.5, 3.0, 100_001).astype(np.float32)
    s = fused_int8.ActivationScale.fit(values)
    q = np.clip(np.round(values / s.scale) + int(s.zero_point), 0, 255)
    error = np.abs((q - int(s.zero_point)) * s.scale - values)
    inside = (values > np.percentile(values, 0.01)) & (values < np.percentile(values, 99.99))
    assert error[inside].max() <= s.scale / 2 + 1e-7
    # zero is on the grid (the range always holds it): a 0 activation stays exactly 0
    zero = np.clip(np.round(np.float32(0) / s.scale) + int(s.zero_point), 0, 255)
    assert 0 < int(s.zero_point) < 255 and (zero - int(s.zero_point)) * s.scale == 0.0
    positive = fused_int8.ActivationScale.fit(np.array([1.0, 2.0], np.float32))
    assert int(positive.zero_point) == 0


def test_weights_quantised_per_column_within_half_a_step():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(8, 5)).astype(np.float32) * np.array([0.01, 1, 10, 0, 3], np.float32)
    q, scale = fused_int8.quantize_columns(weight)
    assert q.dtype == np.int8 and scale.shape == (5,)
    assert np.all(np.abs(q.astype(np.float32) * scale - weight) <= scale / 2 + 1e-6)
    assert np.all(q[:, 3] == 0)


def test_a_layer_that_is_not_bert_is_refused_with_one_line(tiny_bilstm, tiny_bundle, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["quantize", str(tiny_bilstm["bundle"]), "--out", str(tmp_path / "x"), "--dev",
              str(tiny_bundle["dev"]), "--method", "fused", "--calibration-rows", "16"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("offramp: error: --method fused rebuilds BERT layers only; layer_01.onnx: not a BERT layer")
    assert err.endswith("Use --method static")
    assert not (tmp_path / "x").exists()


def test_openvino_refuses_a_fused_bundle_clearly(tiny_fused_bundle):
    with pytest.raises(ValueError, match="does not run fused int8 bundles"):
        Engine(tiny_fused_bundle, provider="openvino")
