"""End to end: the tiny trained bundle served by a real `offramp serve` process, over HTTP,
against the PyTorch model it was exported from."""

from __future__ import annotations

import signal

import httpx
import numpy as np
import pytest
import torch

from tests.serving import start_server
from training.data import read_examples
from training.model import EarlyExitModel


@pytest.fixture(scope="module")
def server(tiny_bundle):
    proc, url = start_server(tiny_bundle["models"])
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after draining


def predict(url: str, **body) -> dict:
    response = httpx.post(url + "/v1/models/tiny/predict", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def dev_texts(tiny_bundle) -> list[str]:
    return [e.text for e in read_examples(tiny_bundle["dev"]).examples[:16]]


@pytest.fixture(scope="module")
def pytorch_probs(tiny_bundle, dev_texts):
    """Every exit's probabilities from the PyTorch checkpoint, [layers, rows, classes]."""
    from app.encoding import TextEncoder

    model, _ = EarlyExitModel.load(tiny_bundle["checkpoint"])
    encoder = TextEncoder.from_file(tiny_bundle["bundle"] / "tokenizer.json", 128)
    probs = []
    with torch.no_grad():
        for text in dev_texts:  # one at a time: no padding involved on the PyTorch side
            b = encoder.encode([text])
            logits = model(torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask),
                           torch.from_numpy(b.token_type_ids))
            probs.append(torch.stack(logits).softmax(-1)[:, 0].numpy())
    return np.stack(probs, axis=1)


def test_threshold_zero_runs_every_layer_and_matches_pytorch(server, dev_texts, pytorch_probs):
    body = predict(server, inputs=dev_texts, threshold=0, return_probabilities=True)
    assert [p["exit_layer"] for p in body["predictions"]] == [3] * len(dev_texts)
    assert body["layers_executed"] == body["layers_full"] == 3 * len(dev_texts)
    served = np.array([[p["probabilities"][l] for l in ("0", "1")] for p in body["predictions"]])
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(served, pytorch_probs[-1], atol=1e-5)
    assert [p["label_id"] for p in body["predictions"]] == pytorch_probs[-1].argmax(-1).tolist()


def test_threshold_one_exits_at_layer_one_with_the_first_exit(server, dev_texts, pytorch_probs):
    body = predict(server, inputs=dev_texts, threshold=1, return_probabilities=True)
    assert [p["exit_layer"] for p in body["predictions"]] == [1] * len(dev_texts)
    assert body["layers_executed"] == len(dev_texts)
    served = np.array([[p["probabilities"][l] for l in ("0", "1")] for p in body["predictions"]])
    np.testing.assert_allclose(served, pytorch_probs[0], atol=1e-5)


def test_mixed_exits_match_pytorch_at_each_rows_exit(server, dev_texts, pytorch_probs):
    from app.uncertainty import normalized_entropy

    # A threshold between the rows' first-layer uncertainties, so some leave early.
    u1 = normalized_entropy(pytorch_probs[0])
    threshold = float(np.median(u1)) + 1e-7
    body = predict(server, inputs=dev_texts, threshold=threshold, return_probabilities=True)
    layers = [p["exit_layer"] for p in body["predictions"]]
    assert 1 in layers and max(layers) > 1
    for row, p in enumerate(body["predictions"]):
        expected = pytorch_probs[p["exit_layer"] - 1, row]
        np.testing.assert_allclose([p["probabilities"]["0"], p["probabilities"]["1"]], expected, atol=1e-5)
        assert 0.0 <= p["uncertainty"] <= 1.0


def test_bad_input_is_a_4xx_with_the_field(server):
    response = httpx.post(server + "/v1/models/tiny/predict", json={"inputs": ["x"], "threshold": 3})
    assert response.status_code == 422 and response.json()["field"] == "threshold"
    assert httpx.get(server + "/v1/models").json()["models"][0]["name"] == "tiny"


@pytest.mark.parametrize("shared", [None, False])
def test_the_server_runs_every_session_on_one_shared_pool_by_default(tiny_bundle, shared):
    proc, url = start_server(tiny_bundle["models"], log_level="info", shared_thread_pool=shared)
    try:
        assert httpx.post(url + "/v1/models/tiny/predict", json={"inputs": ["a fine film"]},
                          timeout=30).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    log = proc.stdout.read()
    assert ("one shared thread pool of 1 threads" in log) == (shared is None), log[-2000:]
