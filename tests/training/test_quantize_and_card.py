from app.cli import main
from app.manifest import read_manifest
from app.registry import load_model


def test_quantized_bundle_is_smaller_verified_recalibrated_and_carded(tiny_bundle, tmp_path):
    out = tmp_path / "models" / "tiny-int8"
    main(["quantize", str(tiny_bundle["bundle"]), "--out", str(out), "--dev", str(tiny_bundle["dev"]),
          "--max-loss", "100"])  # a random tiny model's accuracy is noise; the gate is tested below
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


def test_quantize_refuses_an_accuracy_loss_beyond_the_gate(tiny_bundle, tmp_path, monkeypatch):
    import pytest

    import training.quantize as q

    real = q.layer_accuracy
    calls = []

    def worse_second_time(*args):
        calls.append(1)
        acc = real(*args)
        return acc if len(calls) == 1 else [a - 0.02 for a in acc]

    monkeypatch.setattr(q, "layer_accuracy", worse_second_time)
    with pytest.raises(RuntimeError, match="int8 loses 2.00 points"):
        main(["quantize", str(tiny_bundle["bundle"]), "--out", str(tmp_path / "x"),
              "--dev", str(tiny_bundle["dev"])])
    assert not (tmp_path / "x").exists()
