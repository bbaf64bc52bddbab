"""Production behaviour of the HTTP server: queue limits, deadlines, auth, body limits, model
versions and reload, headers and metrics."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
from fastapi.testclient import TestClient

from app.server import create_app
from app.settings import Settings
from tests.serving import slow_engines


def client_for(models, **settings):
    return TestClient(create_app(Settings(model_dir=models, intra_op_threads=1, **settings)))


def test_full_queue_answers_429_with_retry_after(tiny_bundle):
    with client_for(tiny_bundle["models"], max_queue_rows=2, max_batch_rows=1, max_wait_ms=0) as c:
        slow_engines(c, 0.3)
        responses = []

        def send():
            responses.append(c.post("/v1/models/tiny/predict", json={"inputs": ["fine"]}))

        threads = [threading.Thread(target=send) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    statuses = sorted(r.status_code for r in responses)
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["retry-after"] == "1" and rejected.json()["error_type"] == "overloaded"


def test_deadline_gives_504_not_a_late_answer(tiny_bundle):
    with client_for(tiny_bundle["models"]) as c:
        slow_engines(c, 0.5)
        response = c.post("/v1/models/tiny/predict", json={"inputs": ["fine"], "timeout_ms": 100})
        assert response.status_code == 504 and response.json()["field"] == "timeout_ms"
        assert c.post("/v1/models/tiny/predict", json={"inputs": ["fine"], "timeout_ms": 5000}).status_code == 200


def test_api_key(tiny_bundle):
    with client_for(tiny_bundle["models"], api_key="s3cret") as c:
        body = {"inputs": ["fine"]}
        missing = c.post("/v1/models/tiny/predict", json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["field"] == "authorization"
        wrong = c.post("/v1/models/tiny/predict", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = c.post("/v1/models/tiny/predict", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.post("/v1/models/tiny/reload").status_code == 401
        assert c.get("/health/ready").status_code == 200 and c.get("/metrics").status_code == 200


def test_body_size_limit(tiny_bundle):
    with client_for(tiny_bundle["models"], max_body_bytes=1000) as c:
        response = c.post("/v1/models/tiny/predict", json={"inputs": ["word " * 400]})
        assert response.status_code == 413 and response.json()["field"] == "body"
        assert c.post("/v1/models/tiny/predict", json={"inputs": ["short"]}).status_code == 200


def test_headers_metrics_and_default_route(tiny_bundle):
    with client_for(tiny_bundle["models"]) as c:
        response = c.post("/v1/predict", json={"inputs": ["fine", "awful"], "threshold": 1})
        assert response.status_code == 200 and response.json()["model"] == "tiny"
        for header in ("x-queue-time-ms", "x-inference-time-ms", "x-total-time-ms"):
            assert float(response.headers[header]) >= 0
        assert float(response.headers["x-mean-exit-layer"]) == 1.0
        text = c.get("/metrics").text
        assert 'offramp_requests_total{model="tiny",protocol="v1",status="200"} 1.0' in text
        assert 'offramp_exit_layer_bucket{le="1.0",model="tiny"} 2.0' in text
        assert 'offramp_layers_saved_total{model="tiny"} 4.0' in text
        assert "offramp_batch_size_rows_bucket" in text and "offramp_queue_rows" in text


@pytest.fixture
def versioned(tiny_bundle, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(tiny_bundle["bundle"], root / "m" / "1")
    return root


def _set_threshold(bundle, value):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["recommended_threshold"] = value
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_versions_and_reload_without_downtime(tiny_bundle, versioned):
    with client_for(versioned) as c:
        assert c.get("/v1/models").json()["models"][0]["versions"] == [1]
        shutil.copytree(versioned / "m" / "1", versioned / "m" / "2")
        _set_threshold(versioned / "m" / "2", 1.0)
        report = c.post("/v1/models/m/reload").json()
        assert report["loaded"] == ["m/2"] and report["unchanged"] == ["m/1"] and report["serving"] == [1, 2]
        assert c.post("/v1/models/m/predict", json={"inputs": ["x"]}).json()["threshold"] == 1.0
        v1 = c.post("/v1/models/m/versions/1/predict", json={"inputs": ["x"]})
        assert v1.status_code == 200 and v1.json()["threshold"] == json.loads(
            (versioned / "m" / "1" / "manifest.json").read_text())["recommended_threshold"]
        missing = c.post("/v1/models/m/versions/7/predict", json={"inputs": ["x"]})
        assert missing.status_code == 404 and missing.json()["field"] == "version"


def test_failed_reload_keeps_the_serving_version(versioned):
    with client_for(versioned) as c:
        before = c.post("/v1/models/m/predict", json={"inputs": ["x"], "return_probabilities": True}).json()
        # A broken update of the serving version: a graph that no longer matches its sha256.
        _set_threshold(versioned / "m" / "1", 0.7)
        (versioned / "m" / "1" / "layer_02.onnx").write_bytes(b"not a graph")
        report = c.post("/v1/models/m/reload").json()
        assert "m/1" in report["failed"] and "sha256" in report["failed"]["m/1"]
        after = c.post("/v1/models/m/predict", json={"inputs": ["x"], "return_probabilities": True})
        assert after.status_code == 200 and after.json()["predictions"] == before["predictions"]
        assert "m/1" in c.get("/v1/models").json()["failed"]
        assert c.post("/v1/models/nope/reload").status_code == 404
