"""The HTTP layer in-process (validation and shapes); tests/test_e2e.py covers a real server."""

import pytest
from fastapi.testclient import TestClient

from app.server import create_app
from app.settings import Settings


@pytest.fixture(scope="module")
def client(tiny_bundle):
    settings = Settings(model_dir=tiny_bundle["models"], max_inputs=4, max_text_chars=2000)
    with TestClient(create_app(settings)) as c:
        yield c


def post(client, body, model="tiny"):
    return client.post(f"/v1/models/{model}/predict", json=body)


def test_health_and_model_list(client):
    assert client.get("/health/live").json() == {"status": "live"}
    assert client.get("/health/ready").status_code == 200
    models = client.get("/v1/models").json()["models"]
    assert models[0]["name"] == "tiny" and models[0]["layers"] == 3 and models[0]["default"]
    assert "recommended_threshold" in models[0]
    assert client.get("/docs").status_code == 200


def test_default_threshold_is_the_recommended_one(client):
    body = post(client, {"inputs": ["fine"]}).json()
    assert body["threshold"] == client.get("/v1/models").json()["models"][0]["recommended_threshold"]


@pytest.mark.parametrize("body, status, field", [
    ({"inputs": []}, 422, "inputs"),
    ({"inputs": ["ok", ""]}, 422, "inputs[1]"),
    ({"inputs": ["ok", "   "]}, 422, "inputs[1]"),
    ({"inputs": ["x"], "threshold": 1.5}, 422, "threshold"),
    ({"inputs": ["x"], "threshold": -0.1}, 422, "threshold"),
    ({"inputs": ["x"], "threshold": "high"}, 422, "threshold"),
    ({"inputs": [["a", "b"]]}, 422, "inputs[0]"),
    ({"inputs": "just a string"}, 422, "inputs"),
    ({"inputs": ["x"], "min_layers": 3, "max_layers": 2}, 422, "min_layers"),
    ({"inputs": ["x"], "max_layers": 9}, 422, "max_layers"),
    ({"inputs": ["x"], "min_layers": 0}, 422, "min_layers"),
    ({"inputs": ["x"], "unknown": 1}, 422, "unknown"),
    ({"inputs": ["a", "b", "c", "d", "e"]}, 413, "inputs"),
    ({"inputs": ["x" * 2001]}, 413, "inputs[0]"),
    ({}, 422, "inputs"),
])
def test_bad_requests_name_the_field(client, body, status, field):
    response = post(client, body)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["field"] == field and field in error["error"] and error["error_type"]


def test_invalid_json_and_unknown_model(client):
    response = client.post("/v1/models/tiny/predict", content=b"{bad",
                           headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["field"] == "body"
    response = post(client, {"inputs": ["x"]}, model="nope")
    assert response.status_code == 404 and response.json()["field"] == "model"


def test_long_text_is_truncated_and_said(client):
    body = post(client, {"inputs": ["great " * 150, "fine"]}).json()
    assert body["predictions"][0]["truncated"] and not body["predictions"][1]["truncated"]
    assert body["warnings"] and "truncated" in body["warnings"][0]


def test_not_ready_without_models(tmp_path):
    with TestClient(create_app(Settings(model_dir=tmp_path))) as c:
        assert c.get("/health/live").status_code == 200
        assert c.get("/health/ready").status_code == 503


def test_a_bad_bundle_does_not_stop_the_good_one(tiny_bundle, tmp_path):
    import shutil

    shutil.copytree(tiny_bundle["bundle"], tmp_path / "good")
    shutil.copytree(tiny_bundle["bundle"], tmp_path / "bad")
    (tmp_path / "bad" / "layer_01.onnx").write_bytes(b"garbage")
    with TestClient(create_app(Settings(model_dir=tmp_path))) as c:
        listing = c.get("/v1/models").json()
        assert [m["name"] for m in listing["models"]] == ["good"]
        assert "sha256" in listing["failed"]["bad/1"]
        assert post(c, {"inputs": ["fine"]}, model="good").status_code == 200
        assert post(c, {"inputs": ["fine"]}, model="bad").status_code == 404
