"""`offramp cascade`: trains nothing, checks its stages, and its bundle serves over HTTP."""

from __future__ import annotations

import json
import shutil
import signal

import httpx
import pytest

from app.cli import main
from tests.serving import start_server
from training.data import read_examples


def _refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_cascade_trained_exported_and_cascaded_serves_over_http(tiny_cascade, tiny_bundle):
    """The tiny end-to-end run: a teacher, a BiLSTM distilled from it, both cascaded, served."""
    texts = [e.text for e in read_examples(tiny_bundle["dev"]).examples][:8]
    proc, url = start_server(tiny_cascade.parent)
    try:
        listed = httpx.get(url + "/v1/models", timeout=10).json()["models"]
        (info,) = [m for m in listed if m["name"] == "tiny-cascade"]
        assert [s["name"] for s in info["stages"]] == ["words", "tiny"]
        assert [s["first_layer"] for s in info["stages"]] == [1, 2] and info["exit_head"] == "cascade"
        layers = info["layers"]

        def predict(**body):
            response = httpx.post(url + "/v1/models/tiny-cascade/predict", json={"inputs": texts, **body}, timeout=30)
            assert response.status_code == 200, response.text
            return response.json()

        first = predict(threshold=1.0)["predictions"]
        assert {(p["stage"], p["stage_layer"], p["exit_layer"]) for p in first} == {("words", 1, 1)}
        full = predict(threshold=0.0)
        assert {(p["stage"], p["stage_layer"], p["exit_layer"]) for p in full["predictions"]} == \
            {("tiny", layers - 1, layers)}
        assert full["layers_executed"] == full["layers_full"] == layers * len(texts)
        assert {p["exit_layer"] for p in predict(threshold=1.0, min_layers=2)["predictions"]} == {2}
        bad = httpx.post(url + "/v1/models/tiny-cascade/predict", json={"inputs": texts, "max_layers": layers + 1},
                         timeout=10)
        assert bad.status_code == 422 and bad.json()["field"] == "max_layers"
        v2 = httpx.post(url + "/v2/models/tiny-cascade/infer", timeout=10, json={
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": texts[:2]}],
            "parameters": {"threshold": 0.0}})
        assert v2.status_code == 200, v2.text
        exit_layer = next(o for o in v2.json()["outputs"] if o["name"] == "exit_layer")
        assert exit_layer["data"] == [layers, layers]
        config = httpx.get(url + "/v2/models/tiny-cascade/config", timeout=10).json()
        assert config["parameters"]["stages"]["string_value"] == f"words:1-1,tiny:2-{layers}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_cascade_refuses_one_stage_a_nested_cascade_and_foreign_labels(capsys, tiny_cascade, tiny_bilstm,
                                                                        tiny_bundle, tmp_path):
    common = ["--dev", str(tiny_bundle["dev"]), "--out", str(tmp_path / "out")]
    err = _refused(capsys, ["cascade", "--stages", str(tiny_bundle["bundle"]), *common])
    assert "at least two bundles" in err
    err = _refused(capsys, ["cascade", "--stages", f"{tiny_cascade},{tiny_bundle['bundle']}", *common])
    assert "is itself a cascade" in err
    other = tmp_path / "other"
    shutil.copytree(tiny_bilstm["bundle"], other)
    raw = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**raw, "labels": ["sad", "happy"]}))
    err = _refused(capsys, ["cascade", "--stages", f"{other},{tiny_bundle['bundle']}", *common])
    assert "share one label set" in err
    assert not (tmp_path / "out").exists()


def test_a_cascade_is_quantised_stage_by_stage(capsys, tiny_cascade, tiny_bundle, tmp_path):
    err = _refused(capsys, ["quantize", str(tiny_cascade), "--out", str(tmp_path / "q"),
                            "--dev", str(tiny_bundle["dev"])])
    assert "is a cascade" in err and not (tmp_path / "q").exists()


def test_calibrating_on_another_file_keeps_dev_out_of_sample(capsys, tiny_bilstm, tiny_bundle, tmp_path):
    out = tmp_path / "models" / "held-out"
    main(["cascade", "--stages", f"{tiny_bilstm['bundle']},{tiny_bundle['bundle']}", "--dev", str(tiny_bundle["dev"]),
          "--calibration", str(tiny_bundle["train"]), "--out", str(out), "--threads", "2"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["provenance"]["recipe"]["calibration"] == str(tiny_bundle["train"])
    assert manifest["provenance"]["dev"]["path"] == str(tiny_bundle["dev"])
    err = _refused(capsys, ["cascade", "--stages", f"{tiny_bilstm['bundle']},{tiny_bundle['bundle']}",
                            "--dev", str(tiny_bundle["dev"]), "--calibration", str(tiny_bundle["dev"]),
                            "--out", str(tmp_path / "same")])
    assert "--calibration is the --dev file" in err
