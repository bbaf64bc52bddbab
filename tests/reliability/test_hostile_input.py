"""Hostile and malformed input, on both protocols: always a 4xx in the one error shape naming
the field, never a 500, a trace, a server path, or a label that grows /metrics."""

from __future__ import annotations

import gzip
import json
import random
import string

import pytest
from fastapi.testclient import TestClient

from app.server import create_app
from app.settings import Settings

KEY = "hostile-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def client(tiny_bundle):
    with TestClient(create_app(Settings(model_dir=tiny_bundle["models"], intra_op_threads=1,
                                        api_key=KEY))) as c:
        yield c


def assert_error(response, status: int, field: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type", "field"}, body
    assert "Traceback" not in body["error"] and "/" + "tmp" not in body["error"]
    if field is not None:
        assert body["field"] == field, body


def v2_text(texts) -> dict:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}


HUGE_VERSION = "9" * 4301


@pytest.mark.parametrize("method, path", [
    ("GET", f"/v2/models/tiny/versions/{HUGE_VERSION}"),
    ("GET", f"/v2/models/tiny/versions/{HUGE_VERSION}/ready"),
    ("POST", f"/v2/models/tiny/versions/{HUGE_VERSION}/infer"),
    ("GET", f"/v2/models/tiny/versions/{HUGE_VERSION}/config"),
    ("GET", f"/v2/models/tiny/versions/{HUGE_VERSION}/stats"),
    ("POST", f"/v1/models/tiny/versions/{HUGE_VERSION}/predict"),
])
def test_a_version_of_4301_digits_is_a_version_that_does_not_exist(client, method, path):
    response = client.request(method, path, json=v2_text(["fine"]) if "infer" in path else {"inputs": ["x"]},
                              headers=AUTH)
    assert_error(response, 404, "version")


@pytest.mark.parametrize("path", ["/v2/models/tiny/versions/%C2%B2", "/v2/models/tiny/versions/-1/ready"])
def test_a_version_that_is_not_digits_is_a_400(client, path):
    assert_error(client.get(path), 400, "version")


@pytest.mark.parametrize("path, body", [
    ("/v2/models/tiny/infer", b'{"inputs": ' + b"[" * 1000 + b"]" * 1000 + b"}"),
    ("/v2/models/tiny/infer", json.dumps(v2_text([1])).replace("[1]", "[" * 150 + '"a"' + "]" * 150).encode()),
    ("/v1/models/tiny/predict", b'{"inputs": ' + b"[" * 1000 + b"]" * 1000 + b"}"),
    ("/v1/models/tiny/predict", b'{"inputs": ["a"], "threshold": ' + b"1" * 5000 + b"}"),
    ("/v2/models/tiny/infer", b'{"inputs": [], "parameters": {"threshold": ' + b"1" * 5000 + b"}}"),
    ("/v1/models/tiny/predict", b'{"inputs": ["\xff\xfe"]}'),
    ("/v2/models/tiny/infer", b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["\xc3"]}]}'),
    ("/v1/models/tiny/predict", b'{"inputs": ["a"], "threshold": NaN}'),
    ("/v1/models/tiny/predict", b"\x00\x01\x02"),
    ("/v1/models/tiny/predict", b""),
])
def test_malformed_bodies_are_400_in_the_error_shape(client, path, body):
    response = client.post(path, content=body, headers={**AUTH, "content-type": "application/json"})
    if response.status_code == 422:  # NaN: valid for the parser, refused by the schema
        assert_error(response, 422, "threshold")
    else:
        assert_error(response, 400)


@pytest.mark.parametrize("body, field", [
    ({"inputs": ["a"], "threshold": True}, "threshold"),
    ({"inputs": ["a"], "threshold": "0.5"}, "threshold"),
    ({"inputs": ["a"], "min_layers": "2"}, "min_layers"),
    ({"inputs": ["a"], "min_layers": 1.5}, "min_layers"),
    ({"inputs": ["a"], "max_layers": True}, "max_layers"),
    ({"inputs": ["a"], "return_probabilities": "yes"}, "return_probabilities"),
    ({"inputs": ["a"], "return_probabilities": 1}, "return_probabilities"),
    ({"inputs": ["a"], "timeout_ms": "100"}, "timeout_ms"),
    ({"inputs": [1]}, "inputs[0]"),
    ({"inputs": "a"}, "inputs"),
])
def test_v1_types_are_strict_like_v2(client, body, field):
    assert_error(client.post("/v1/models/tiny/predict", json=body, headers=AUTH), 422, field)
    v2 = {**v2_text(["a"]), "parameters": {k: v for k, v in body.items() if k in ("threshold", "min_layers",
                                                                                  "max_layers", "timeout_ms")}}
    if v2["parameters"]:
        response = client.post("/v2/models/tiny/infer", json=v2, headers=AUTH)
        assert response.status_code == 400 and response.json()["field"] == f"parameters.{field}"


def test_integral_numbers_are_numbers(client):
    response = client.post("/v1/models/tiny/predict", json={"inputs": ["a"], "threshold": 1, "min_layers": 1},
                           headers=AUTH)
    assert response.status_code == 200 and response.json()["threshold"] == 1.0


BLANKS = ["\x00", "\x00\x00\x00", "\u200b", "\u200b\u200c\u200d\u2060\ufeff", " \t\n\u3000", "\u0301\u0301",
          "\U000e0041\U000e0042", "\x7f\x85"]


@pytest.mark.parametrize("text", BLANKS)
def test_texts_of_nothing_but_invisible_characters_are_blank(client, text):
    response = client.post("/v1/models/tiny/predict", json={"inputs": ["fine", text]}, headers=AUTH)
    assert_error(response, 422, "inputs[1]")
    assert "blank" in response.json()["error"]
    response = client.post("/v2/models/tiny/infer", json=v2_text(["fine", text]), headers=AUTH)
    assert response.status_code == 400 and response.json()["field"] == "inputs[0].data[1]"


def test_a_text_with_invisible_characters_and_words_is_served(client):
    response = client.post("/v1/models/tiny/predict", json={"inputs": ["\u200bfine\x00 film"]}, headers=AUTH)
    assert response.status_code == 200, response.text


def test_gzip_and_deflate_on_v1(client):
    import zlib

    raw = json.dumps({"inputs": ["a fine film"]}).encode()
    for encoding, data in (("gzip", gzip.compress(raw)), ("deflate", zlib.compress(raw))):
        response = client.post("/v1/models/tiny/predict", content=data,
                               headers={**AUTH, "content-type": "application/json", "content-encoding": encoding})
        assert response.status_code == 200, response.text
    bomb = gzip.compress(b'{"inputs": ["' + b"a" * 3_000_000 + b'"]}')
    response = client.post("/v1/models/tiny/predict", content=bomb,
                           headers={**AUTH, "content-encoding": "gzip"})
    assert_error(response, 413, "body")
    response = client.post("/v1/models/tiny/predict", content=b"not gzip",
                           headers={**AUTH, "content-encoding": "gzip"})
    assert_error(response, 400, "body")
    response = client.post("/v1/models/tiny/predict", content=raw, headers={**AUTH, "content-encoding": "br"})
    assert_error(response, 415, "content-encoding")


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/nowhere", 404), ("GET", "/v1/nowhere", 404), ("POST", "/v2/models/tiny/unload", 404),
    ("GET", "/v1/models/tiny/predict", 405), ("DELETE", "/v1/models", 405), ("PUT", "/health/live", 405),
    ("POST", "/metrics", 405), ("GET", "/v2/models/tiny/infer", 405),
])
def test_routing_errors_are_in_the_error_shape(client, method, path, status):
    assert_error(client.request(method, path), status)


def test_the_key_is_checked_before_the_body(client):
    for path in ("/v1/models/tiny/predict", "/v2/models/tiny/infer", "/v1/models/tiny/reload"):
        response = client.post(path, content=b"{not json", headers={"content-type": "application/json"})
        assert_error(response, 401, "authorization")
        assert response.headers["www-authenticate"] == "Bearer"
    response = client.post("/v1/models/tiny/predict", json={"inputs": ["a"]},
                           headers={"authorization": "Bearer " + KEY + "x"})
    assert_error(response, 401, "authorization")


def test_unknown_model_names_share_one_metric_label(client):
    def scrape() -> set[str]:  # every series, without its value
        return {line.rsplit(" ", 1)[0] for line in client.get("/metrics").text.splitlines()
                if not line.startswith("#")}

    client.post("/v1/models/unknown-warmup/predict", json={"inputs": ["a"]}, headers=AUTH)
    client.post("/v2/models/unknown-warmup/infer", json=v2_text(["a"]), headers=AUTH)
    before = scrape()
    rng = random.Random(0)
    for _ in range(300):
        name = "".join(rng.choices(string.ascii_letters, k=24))
        assert client.post(f"/v1/models/{name}/predict", json={"inputs": ["a"]}, headers=AUTH).status_code == 404
        assert client.post(f"/v2/models/{name}/infer", json=v2_text(["a"]), headers=AUTH).status_code == 404
        assert client.get(f"/v2/models/{name}/ready").status_code == 404
    after = scrape()
    assert after == before, f"unknown names must not add series: {sorted(after - before)[:5]}"
    assert any('model="_unknown"' in series for series in after)


def test_no_server_path_reaches_a_client(client, tiny_bundle):
    root = str(tiny_bundle["models"].resolve())
    for response in (client.get("/v1/models"), client.post("/v1/models/nope/reload", headers=AUTH),
                     client.post("/v2/repository/index"), client.get("/v2/models/tiny/config")):
        assert root not in response.text, response.text


def test_the_openapi_document_lists_what_routes_return(client):
    document = client.get("/openapi.json").json()
    predict = document["paths"]["/v1/models/{model}/predict"]["post"]
    assert {"400", "401", "404", "413", "415", "422", "429", "503", "504"} <= set(predict["responses"])
    assert predict["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/PredictRequest")
    assert "PredictRequest" in document["components"]["schemas"]
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
