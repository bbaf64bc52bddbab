"""What we promise under faults (docs/serving.md): a broken bundle never stops the server nor
a model that serves; a request accepted by a version is answered by it or by its successor."""

from __future__ import annotations

import json
import shutil
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from app import service
from app.server import create_app
from app.settings import Settings
from bench.load import start_server as start_quiet_server
from tests.reliability.broken_bundles import KINDS, broken_copy
from tests.serving import start_server


def client_for(models, **settings) -> TestClient:
    return TestClient(create_app(Settings(model_dir=models, intra_op_threads=1, **settings)))


def set_threshold(bundle, value: float) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["recommended_threshold"] = value
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", KINDS)
def test_a_broken_bundle_at_start_up_is_reported_and_skipped(tiny_bundle, tmp_path, kind):
    models = tmp_path / "models"
    shutil.copytree(tiny_bundle["bundle"], models / "good")
    broken_copy(tiny_bundle["bundle"], models / "broken", kind)
    with client_for(models) as c:
        assert c.get("/health/ready").status_code == 200
        listing = c.get("/v1/models").json()
        assert [m["name"] for m in listing["models"]] == ["good"]
        reason = listing["failed"]["broken/1"]
        assert reason and str(tmp_path) not in reason  # no server paths for clients
        assert c.post("/v1/models/good/predict", json={"inputs": ["fine"]}).status_code == 200
        missing = c.post("/v1/models/broken/predict", json={"inputs": ["fine"]})
        assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"
        index = c.post("/v2/repository/index").json()
        assert {(e["name"], e["state"]) for e in index} == {("good", "READY"), ("broken", "UNAVAILABLE")}


@pytest.mark.parametrize("kind", KINDS)
def test_a_broken_new_version_on_reload_keeps_the_serving_one(tiny_bundle, tmp_path, kind):
    models = tmp_path / "models"
    shutil.copytree(tiny_bundle["bundle"], models / "m" / "1")
    with client_for(models) as c:
        before = c.post("/v1/models/m/predict", json={"inputs": ["x"], "return_probabilities": True}).json()
        broken_copy(tiny_bundle["bundle"], models / "m" / "2", kind)
        response = c.post("/v1/models/m/reload")
        assert response.status_code == 200, response.text
        report = response.json()
        assert list(report["failed"]) == ["m/2"] and report["serving"] == [1]
        assert str(tmp_path) not in response.text
        after = c.post("/v1/models/m/predict", json={"inputs": ["x"], "return_probabilities": True})
        assert after.status_code == 200 and after.json()["predictions"] == before["predictions"]
        assert "m/2" in c.get("/v1/models").json()["failed"]
        shutil.rmtree(models / "m" / "2")  # the broken version removed: no longer reported
        c.post("/v1/models/m/reload")
        assert c.get("/v1/models").json()["failed"] == {}


def test_only_broken_bundles_start_a_live_server_that_is_not_ready(tiny_bundle, tmp_path):
    models = tmp_path / "models"
    broken_copy(tiny_bundle["bundle"], models / "a", "truncated_graph")
    broken_copy(tiny_bundle["bundle"], models / "b", "garbage_tokenizer")
    with client_for(models) as c:
        assert c.get("/health/live").status_code == 200
        assert c.get("/health/ready").status_code == 503
        assert sorted(c.get("/v1/models").json()["failed"]) == ["a/1", "b/1"]


def test_a_real_server_starts_beside_a_truncated_bundle(tiny_bundle, tmp_path):
    """The crash loop of the report: a truncated graph whose manifest matches it, at start-up."""
    models = tmp_path / "models"
    shutil.copytree(tiny_bundle["bundle"], models / "good")
    broken_copy(tiny_bundle["bundle"], models / "broken", "truncated_graph")
    proc, url = start_server(models)
    try:
        assert httpx.post(url + "/v1/models/good/predict", json={"inputs": ["fine"]}).status_code == 200
        assert "broken/1" in httpx.get(url + "/v1/models").json()["failed"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_request_that_picked_a_retiring_version_is_answered_by_its_successor(tiny_bundle, tmp_path,
                                                                                 monkeypatch):
    """The 503 race, made certain: the version a request picked is replaced in place while the
    request is being tokenised, so its queue is closed when the rows arrive."""
    models = tmp_path / "models"
    shutil.copytree(tiny_bundle["bundle"], models / "m" / "1")
    original = service.tokenize
    with client_for(models) as c:
        registry = c.app.state.registry
        replaced = []

        async def tokenize_during_a_reload(model, inputs, characters):
            if not replaced:
                set_threshold(models / "m" / "1", 0.9)
                report = await registry.reload("m")
                replaced.append(report.loaded)
            return await original(model, inputs, characters)

        monkeypatch.setattr(service, "tokenize", tokenize_during_a_reload)
        response = c.post("/v1/models/m/predict", json={"inputs": ["x"]})
        assert replaced == [["m/1"]]
        assert response.status_code == 200, response.text
        assert response.json()["threshold"] == 0.9  # answered by the new version


def test_in_place_reloads_under_load_fail_no_request(tiny_bundle, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_bundle["bundle"], models / "m" / "1")
    # Not capturing its log: under load an unread pipe would fill and stall the server.
    proc, url = start_quiet_server(models, max_wait_ms=5, intra_op_threads=1)
    statuses: list[int] = []
    stop = threading.Event()

    def client(i: int):
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                body = {"inputs": [f"request {i} of a film that never quite lands"] * (1 + i % 4)}
                statuses.append(http.post(url + "/v1/models/m/predict", json=body).status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        reloads = []
        with httpx.Client(timeout=60) as admin:
            for round_ in range(12):
                set_threshold(models / "m" / "1", 0.1 + round_ / 20)
                reloads.append(admin.post(url + "/v1/models/m/reload").json()["loaded"])
                threading.Event().wait(0.1)
        stop.set()
        for t in threads:
            t.join(timeout=60)
    finally:
        stop.set()
        proc.terminate()
        proc.wait(timeout=30)
    assert reloads == [["m/1"]] * 12
    assert len(statuses) > 50 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
