"""Every distillation recipe end to end on the tiny random teacher, through the real
`offramp train distill` command: a verified bundle that loads, matches its PyTorch checkpoint
and is served over HTTP next to the others."""

from __future__ import annotations

import signal

import httpx
import numpy as np
import pytest
import torch

from app.manifest import read_manifest
from app.registry import load_model
from tests.serving import start_server
from training.data import read_examples
from training.model import EarlyExitModel

FAST = ["--batch-size", "16", "--lr", "1e-3", "--epochs", "1", "--exit-epochs", "1", "--exit-lr", "1e-3",
        "--threads", "2", "--limit-train", "160"]
METHODS = {  # the tiny teacher: 3 layers, width 32, 2 heads
    "distilbert": ["--student-layers", "2"],
    "pkd-skip": ["--student-layers", "2", "--beta", "10"],
    "pkd-last": ["--student-layers", "2", "--beta", "10"],
    "tinybert": ["--student-layers", "2", "--student-hidden", "16", "--aug-copies", "1",
                 "--general-epochs", "0.5", "--intermediate-epochs", "1", "--intermediate-lr", "1e-3"],
    "mobilebert": ["--student-layers", "2", "--student-hidden", "8", "--num-ffn", "2", "--stage-epochs", "0.5",
                   "--stage-lr", "1e-3"],
}


@pytest.fixture(scope="module")
def students(tmp_path_factory, tiny_bundle, tiny_teacher_dir) -> dict:
    from app.cli import main

    root = tmp_path_factory.mktemp("distilled")
    unlabeled = root / "unlabeled.txt"
    unlabeled.write_text("a gripping , funny film\nthe plot is thin\nnever dull\n")
    out = {"models": root / "models", "teacher": tiny_bundle["checkpoint"]}
    for method, options in METHODS.items():
        bundle, checkpoint = root / "models" / method, root / "ckpt" / method
        main(["train", "distill", "--method", method, "--teacher", str(tiny_bundle["checkpoint"]),
              "--tokenizer", str(tiny_teacher_dir / "tokenizer.json"), "--train", str(tiny_bundle["train"]),
              "--dev", str(tiny_bundle["dev"]), "--unlabeled", str(unlabeled), "--out", str(bundle),
              "--checkpoint", str(checkpoint), *FAST, *options])
        out[method] = {"bundle": bundle, "checkpoint": checkpoint}
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_recipe_writes_a_verified_calibrated_bundle(students, method):
    manifest = read_manifest(students[method]["bundle"], verify_files=True)
    assert manifest.num_layers == 2 and len(manifest.graphs.layers) == 2
    assert manifest.verification.passed and manifest.calibration
    assert manifest.provenance.recipe["method"] == method
    assert manifest.provenance.teacher == str(students["teacher"])
    assert manifest.labels == ["0", "1"] and [r.layer for r in manifest.dev_results] == [1, 2]
    _, meta = EarlyExitModel.load(students[method]["checkpoint"])
    assert meta["recipe"]["method"] == method and meta["teacher"] == str(students["teacher"])
    assert meta.get("backbone_kind") == ("mobilebert" if method == "mobilebert" else None)
    expected_width = {"tinybert": 16}.get(method, 32)  # mobilebert: inter-block width = teacher's
    assert manifest.hidden_size == expected_width


@pytest.mark.parametrize("method", list(METHODS))
def test_bundle_serves_what_the_pytorch_student_computes(students, tiny_bundle, method):
    model = load_model(students[method]["bundle"])
    student, _ = EarlyExitModel.load(students[method]["checkpoint"])
    texts = [e.text for e in read_examples(tiny_bundle["dev"]).examples[:12]]
    batch = model.encoder.encode(texts)
    with torch.no_grad():
        expected = torch.stack(student(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask),
                                       torch.from_numpy(batch.token_type_ids))).softmax(-1).numpy()
    np.testing.assert_allclose(model.engine.all_layer_probabilities(batch), expected, atol=1e-5)
    full, first = model.engine.run(batch, 0.0), model.engine.run(batch, 1.0)
    assert full.exit_layer.tolist() == [2] * len(texts) and first.exit_layer.tolist() == [1] * len(texts)
    np.testing.assert_allclose(full.probabilities, expected[-1], atol=1e-5)


def test_every_student_is_served_over_http(students):
    proc, url = start_server(students["models"])
    try:
        listed = {m["name"] for m in httpx.get(url + "/v1/models", timeout=10).json()["models"]}
        assert listed == set(METHODS)
        for method in METHODS:
            response = httpx.post(f"{url}/v1/models/{method}/predict", timeout=30,
                                  json={"inputs": ["a gripping film", "dull"], "threshold": 0})
            assert response.status_code == 200, response.text
            assert [p["exit_layer"] for p in response.json()["predictions"]] == [2, 2]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.parametrize("method", ["distilbert", "mobilebert"])
def test_bench_with_pytorch_baseline_works_on_students(students, tiny_bundle, method):
    """A transformers student runs its baseline through AutoModel; MobileBERT through its own forward."""
    from bench.report import run_bench

    report = run_bench(students[method]["bundle"], tiny_bundle["dev"], thresholds=[0.0], baseline="pytorch",
                       checkpoint=students[method]["checkpoint"], latency_rows=4, repeats=1, threads=1)
    full = report["results"][0]
    assert abs(report["baseline"]["accuracy"] - full["accuracy"]) <= 1 / report["rows"] + 1e-9
