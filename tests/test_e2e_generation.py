"""End to end: a tiny generation bundle and the tiny classifier served side by side by a real
`offramp serve` process, over HTTP, against the generation engine run in this process."""

from __future__ import annotations

import shutil
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from tests.serving import start_server
from tests.tiny import tiny_generation_bundle_dir

SOURCES = ["the council approved the new budget on tuesday", "rain is expected across the north tonight",
           "a local team won the cup after extra time", "prices rose again in march"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_bundle):
    root = tmp_path_factory.mktemp("e2e-generation") / "models"
    shutil.copytree(tiny_generation_bundle_dir(root.parent / "build"), root / "gen")
    shutil.copytree(tiny_bundle["bundle"], root / "tiny")
    return root


@pytest.fixture(scope="module")
def server(models):
    proc, url = start_server(models, max_wait_ms=300)
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)


def generate(url: str, model: str = "gen", **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/{model}/generate", json=body, timeout=60)


def in_process(models, texts, **params) -> list:
    """The engine the server runs, run here on the same bundle, every row alone."""
    from app.registry import load_model

    model = load_model(models / "gen", intra_op_threads=1)
    out = []
    for text in texts:
        arrays = {k: np.array([v], dtype=np.float32 if k == "threshold" else np.int64) for k, v in params.items()}
        out.extend(model.engine.generate(model.encoder.encode([text]), **arrays))
    return out


def test_both_models_are_listed_with_their_kind(server):
    models = {m["name"]: m for m in httpx.get(server + "/v1/models").json()["models"]}
    assert models["gen"]["task"] == "generation" and models["tiny"]["task"] == "classification"
    assert models["gen"]["generation"]["decoder_layers"] == models["gen"]["layers"]


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_served_outputs_are_the_engines(server, models, threshold):
    response = generate(server, inputs=SOURCES, threshold=threshold, max_new_tokens=6, num_beams=1,
                        no_repeat_ngram_size=0)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = in_process(models, SOURCES, max_new_tokens=6, num_beams=1, threshold=threshold, no_repeat_ngram_size=0)
    assert [o["text"] for o in body["outputs"]] == [e.text for e in expected]
    assert [o["exit_layers"] for o in body["outputs"]] == [list(e.exit_layers) for e in expected]
    if threshold == 0.0:
        assert all(o["mean_exit_layer"] == body["layers_full"] for o in body["outputs"])


def test_concurrent_requests_of_both_kinds(server):
    alone = generate(server, inputs=SOURCES[:2], max_new_tokens=5).json()["outputs"]
    beams = generate(server, inputs=SOURCES[2:], max_new_tokens=5, num_beams=2, threshold=0).json()["outputs"]
    predicted = httpx.post(server + "/v1/models/tiny/predict", json={"inputs": ["fine"]}, timeout=30).json()
    answers = {}

    def send(key, call):
        answers[key] = call()

    calls = {
        "a": lambda: generate(server, inputs=SOURCES[:2], max_new_tokens=5),
        "b": lambda: generate(server, inputs=SOURCES[2:], max_new_tokens=5, num_beams=2, threshold=0),
        "p": lambda: httpx.post(server + "/v1/models/tiny/predict", json={"inputs": ["fine"]}, timeout=30),
    }
    threads = [threading.Thread(target=send, args=item) for item in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in answers.values()), {k: r.text for k, r in answers.items()}
    assert answers["a"].json()["outputs"] == alone and answers["b"].json()["outputs"] == beams
    assert answers["p"].json()["predictions"] == predicted["predictions"]


def test_wrong_operation_errors_and_metrics(server):
    response = generate(server, model="tiny", inputs=["fine"])
    assert response.status_code == 422 and response.json()["field"] == "model"
    response = httpx.post(server + "/v1/models/gen/predict", json={"inputs": ["fine"]}, timeout=30)
    assert response.status_code == 422 and "generate" in response.json()["error"]
    response = generate(server, inputs=["fine"], num_beams=100)
    assert response.status_code == 422 and response.json()["field"] == "num_beams"
    assert httpx.get(server + "/v2/models/gen", timeout=30).status_code == 200
    text = httpx.get(server + "/metrics", timeout=30).text
    assert 'offramp_generated_tokens_total{model="gen"}' in text
    assert 'offramp_decoder_exit_layer_bucket{le="1.0",model="gen"}' in text


def test_sigterm_drains_accepted_generate_requests(models):
    """As tests/reliability/test_shutdown.py for predict: readiness goes, every accepted request
    is answered, then the process exits."""
    proc, url = start_server(models, max_batch_rows=8, max_wait_ms=5)
    outcomes: list[object] = []
    started = threading.Barrier(9)

    def client():
        with httpx.Client(timeout=120) as http:
            http.get(url + "/health/live")  # connection accepted before the signal
            started.wait()
            try:
                outcomes.append(http.post(url + "/v1/models/gen/generate", json={
                    "inputs": SOURCES * 16, "max_new_tokens": 20, "num_beams": 4, "threshold": 0}).status_code)
            except httpx.TransportError as exc:
                outcomes.append(exc)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.3)  # the burst is queued / computing
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=180)
    assert proc.wait(timeout=120) in (0, -signal.SIGTERM)
    log = proc.stdout.read()
    assert outcomes.count(200) == 8, (outcomes, log[-2000:])
    assert '"event": "generate"' in log
