from app.cli import main
from app.manifest import read_manifest
from app.registry import load_model
from tests.tiny import TINY_INT8_ROW_TOLERANCE


def test_quantized_bundle_is_smaller_verified_recalibrated_and_carded(tiny_bundle, tmp_path):
    out = tmp_path / "models" / "tiny-int8"
    main(["quantize", str(tiny_bundle["bundle"]), "--out", str(out), "--dev", str(tiny_bundle["dev"]),
          "--max-loss", "100", "--max-batch-dependence", str(TINY_INT8_ROW_TOLERANCE)])
    # (a random tiny model's accuracy is noise; both gates are tested below)
    source, quantized = read_manifest(tiny_bundle["bundle"]), read_manifest(out)
    assert sum(f.bytes for f in quantized.files) < sum(f.bytes for f in source.files)
    assert quantized.quantization.fp32_dev_accuracy == [r.accuracy for r in source.dev_results]
    assert [r.accuracy for r in quantized.dev_results] == quantized.quantization.int8_dev_accuracy
    assert quantized.calibration and quantized.verification == source.verification
    assert quantized.source_labels == ["0", "1"]
    model = load_model(out)
    assert model.engine.run(model.encoder.encode(["fine"]), 0.0).exit_layer.tolist() == [3]

    main(["card", str(out)])
    card = (out / "README.md").read_text()
    assert "Recommended threshold" in card and "int8" in card and "calibration.png" in card
    assert (out / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    read_manifest(out)  # the card and plot sit beside the listed files, which still verify


def test_quantize_refuses_an_accuracy_loss_beyond_the_gate(tiny_bundle, tmp_path, monkeypatch, capsys):
    import pytest

    import training.quantize as q

    real = q.layer_accuracy
    first = []

    def worse_second_time(*args):  # the int8 model: 2 points under the fp32 one, whatever it scores
        if not first:
            first.extend(real(*args))
            return list(first)
        return [a - 0.02 for a in first]

    monkeypatch.setattr(q, "layer_accuracy", worse_second_time)
    # A verdict, not a bug: one line on stderr, exit code 2, no bundle.
    with pytest.raises(SystemExit) as info:
        main(["quantize", str(tiny_bundle["bundle"]), "--out", str(tmp_path / "x"),
              "--dev", str(tiny_bundle["dev"])])
    assert info.value.code == 2
    assert "offramp: error: int8 loses 2.00 points" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_quantize_refuses_rows_that_depend_on_their_batch(tiny_bundle, tmp_path, monkeypatch, capsys):
    import pytest

    import training.quantize as q

    real = q.row_independence
    measured = []

    def measure(*args):
        measured.append(real(*args))
        return measured[-1]

    monkeypatch.setattr(q, "row_independence", measure)
    with pytest.raises(SystemExit) as info:  # a bound under what this bundle measures
        main(["quantize", str(tiny_bundle["bundle"]), "--out", str(tmp_path / "x"), "--dev",
              str(tiny_bundle["dev"]), "--max-loss", "100", "--max-batch-dependence", "-1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"quantised rows depend on their batch: max |diff| {measured[0]:.2e}" in err
    assert "--max-batch-dependence" in err and not (tmp_path / "x").exists()


def test_static_int8_layers_compute_in_int8_with_uint8_activations(tiny_int8_bundle):
    import onnx
    from onnx import numpy_helper

    manifest = read_manifest(tiny_int8_bundle)
    assert manifest.quantization.method.startswith("static int8")
    assert manifest.quantization.batch_dependence <= 1e-5
    graph = onnx.load(tiny_int8_bundle / manifest.graphs.layers[0]).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                      if n.op_type == "Constant"})
    activation_zero_points = [constants[n.input[2]].dtype for n in graph.node
                              if n.op_type == "QuantizeLinear" and n.input[0] not in constants]
    weights = [constants[n.input[0]].dtype for n in graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in constants]
    assert activation_zero_points and all(d == "uint8" for d in activation_zero_points)
    assert weights and all(d == "int8" for d in weights)


def test_uint8_rewrite_keeps_every_dequantised_value():
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from training.quantize import activations_to_uint8

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("MatMul", ["xd", "w"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(-7, np.int8), "z"), numpy_helper.from_array(weight, "w")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = {"x": (rng.normal(size=(2, 4)) * 5).astype(np.float32)}  # some values saturate
    before = ort.InferenceSession(model.SerializeToString()).run(None, x)[0]
    assert activations_to_uint8(model) == 1
    assert numpy_helper.to_array(model.graph.initializer[1]).tolist() == 121
    after = ort.InferenceSession(model.SerializeToString()).run(None, x)[0]
    np.testing.assert_array_equal(before, after)


def test_static_quantisation_needs_calibration_text(tiny_bundle, tmp_path, capsys):
    import json

    import pytest

    from training.quantize import quantize_bundle

    with pytest.raises(ValueError, match="calibration text"):
        quantize_bundle(tiny_bundle["bundle"], tmp_path / "x", ["a"], [0], method="static")
    # The CLI says which file it looked for when the manifest's training file is gone.
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(tiny_bundle["bundle"], moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["provenance"]["train"]["path"] = str(tmp_path / "gone.tsv")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit) as info:
        main(["quantize", str(moved), "--out", str(tmp_path / "y"), "--dev", str(tiny_bundle["dev"])])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("offramp: error: static quantisation needs training text: pass --calibration FILE")
    assert not (tmp_path / "y").exists()
