"""The Open Inference Protocol (/v2): a real `offramp serve` driven by the real Triton client
(`tritonclient.http`, binary tensor data and JSON), checked against /v1; errors in-process."""

from __future__ import annotations

import gzip
import json
import signal
import struct

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.server import create_app
from app.settings import Settings
from tests.serving import start_server
from training.data import read_examples

tritonhttp = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

OUTPUTS = ["label", "label_id", "probabilities", "exit_layer", "uncertainty"]


@pytest.fixture(scope="module")
def server(tiny_bundle):
    """host:port of a real `offramp serve` over the tiny bundle."""
    proc, url = start_server(tiny_bundle["models"])
    yield url.removeprefix("http://")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after draining


@pytest.fixture(scope="module")
def triton(server):
    client = tritonhttp.InferenceServerClient(url=server)
    yield client
    client.close()


@pytest.fixture(scope="module")
def texts(tiny_bundle) -> list[str]:
    # Non-ASCII too: the UTF-8 round trip through BYTES tensors, binary and JSON.
    return [e.text for e in read_examples(tiny_bundle["dev"]).examples[:10]] + ["un film épatant 🎬"]


def text_input(texts: list[str], binary: bool, name: str = "text"):
    tensor = tritonhttp.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=np.object_), binary_data=binary)
    return tensor


def v1_predict(server: str, texts: list[str], threshold: float | None) -> dict:
    body = {"inputs": texts, "return_probabilities": True}
    if threshold is not None:
        body["threshold"] = threshold
    response = httpx.post(f"http://{server}/v1/models/tiny/predict", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


# -- the real server, the real client -------------------------------------------------------------
def test_health_and_metadata(triton, tiny_bundle):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("tiny") and triton.is_model_ready("tiny", "1")
    assert not triton.is_model_ready("nope") and not triton.is_model_ready("tiny", "7")
    server = triton.get_server_metadata()
    assert server["name"] == "offramp" and "binary_tensor_data" in server["extensions"]
    meta = triton.get_model_metadata("tiny")
    assert meta == triton.get_model_metadata("tiny", "1")
    assert meta["name"] == "tiny" and meta["versions"] == ["1"] and meta["platform"] == "offramp"
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("label", "BYTES", [-1]), ("label_id", "INT64", [-1]), ("probabilities", "FP32", [-1, 2]),
        ("exit_layer", "INT32", [-1]), ("uncertainty", "FP32", [-1])]


def test_config_statistics_and_repository_through_tritonclient(triton, texts):
    config = triton.get_model_config("tiny")
    assert config == triton.get_model_config("tiny", "1")
    assert config["name"] == "tiny" and config["max_batch_size"] == 0
    assert [i["name"] for i in config["input"]] == ["text"]
    assert [(o["name"], o["data_type"]) for o in config["output"]][:2] == [("label", "TYPE_STRING"),
                                                                          ("label_id", "TYPE_INT64")]
    before = triton.get_inference_statistics("tiny")["model_stats"][0]
    # Triton's sequence_id (and any parameter the server does not use) is passed through, not refused.
    result = triton.infer("tiny", [text_input(texts, binary=False)], sequence_id=7,
                          parameters={"threshold": 0.0, "my_trace": "abc"})
    ignored = result.get_response()["parameters"]["ignored_parameters"].split(",")
    assert "my_trace" in ignored and "sequence_id" in ignored and "threshold" not in ignored
    with pytest.raises(InferenceServerException):
        triton.infer("tiny", [text_input([""], binary=False)])
    after = triton.get_inference_statistics("tiny", "1")["model_stats"][0]
    assert after["name"] == "tiny" and after["version"] == "1"
    assert after["inference_count"] == before["inference_count"] + len(texts)
    assert after["execution_count"] > before["execution_count"]
    ok, failed = after["inference_stats"]["success"], after["inference_stats"]["fail"]
    assert ok["count"] == before["inference_stats"]["success"]["count"] + 1 and ok["ns"] > 0
    assert failed["count"] == before["inference_stats"]["fail"]["count"] + 1
    # threshold 0: every row ran every layer, so the deepest exit layer gained all of them
    layers = str(config["parameters"]["layers"]["string_value"])
    gained = after["exit_layer_counts"].get(layers, 0) - before["exit_layer_counts"].get(layers, 0)
    assert gained == len(texts)
    everything = triton.get_inference_statistics()["model_stats"]
    assert [(s["name"], s["version"]) for s in everything] == [("tiny", "1")]
    assert triton.get_model_repository_index() == [{"name": "tiny", "version": "1", "state": "READY",
                                                     "reason": ""}]
    triton.load_model("tiny")  # a reload from disk: unchanged, still serving
    assert triton.is_model_ready("tiny")
    for call in (lambda: triton.get_model_config("nope"), lambda: triton.get_inference_statistics("nope"),
                 lambda: triton.load_model("nope")):
        with pytest.raises(InferenceServerException, match="nope"):  # the protocol's error shape decodes
            call()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("threshold", [0.0, 1.0, None], ids=["t0", "t1", "default"])
def test_infer_matches_v1(triton, server, texts, binary, threshold):
    parameters = {} if threshold is None else {"threshold": threshold}
    # binary: no outputs named, so tritonclient asks for every output as binary (its default);
    # json: every output named with binary_data False.
    outputs = None if binary else [tritonhttp.InferRequestedOutput(n, binary_data=False) for n in OUTPUTS]
    result = triton.infer("tiny", [text_input(texts, binary)], outputs=outputs, parameters=parameters,
                          request_id="req-7")
    response = result.get_response()
    expected = v1_predict(server, texts, threshold)
    n = len(texts)

    assert response["model_name"] == "tiny" and response["model_version"] == "1" and response["id"] == "req-7"
    assert [o["name"] for o in response["outputs"]] == OUTPUTS
    assert all(("data" in o) != binary for o in response["outputs"])
    labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label").tolist()]
    label_id = result.as_numpy("label_id")
    probs = result.as_numpy("probabilities")
    exit_layer = result.as_numpy("exit_layer")
    uncertainty = result.as_numpy("uncertainty")
    if binary:  # tritonclient's own decoding of BYTES: an object array of bytes
        assert result.as_numpy("label").dtype == np.object_ and isinstance(result.as_numpy("label")[0], bytes)
    assert label_id.dtype == np.int64 and exit_layer.dtype == np.int32
    assert probs.dtype == np.float32 and uncertainty.dtype == np.float32
    assert probs.shape == (n, 2) and label_id.shape == exit_layer.shape == uncertainty.shape == (n,)

    assert set(labels) <= {"0", "1"} and labels == [["0", "1"][i] for i in label_id]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert label_id.tolist() == probs.argmax(axis=1).tolist()
    if threshold == 0.0:
        assert exit_layer.tolist() == [3] * n
    if threshold == 1.0:
        assert exit_layer.tolist() == [1] * n

    predictions = expected["predictions"]
    assert labels == [p["label"] for p in predictions]
    assert exit_layer.tolist() == [p["exit_layer"] for p in predictions]
    np.testing.assert_allclose(probs, [[p["probabilities"][l] for l in ("0", "1")] for p in predictions],
                               atol=1e-6)
    np.testing.assert_allclose(uncertainty, [p["uncertainty"] for p in predictions], atol=1e-6)
    used = response["parameters"]
    assert used["threshold"] == expected["threshold"]
    assert used["layers_executed"] == expected["layers_executed"] == int(exit_layer.sum())
    assert used["layers_full"] == 3 * n
    assert used["mean_exit_layer"] == pytest.approx(exit_layer.mean())


def test_only_the_requested_outputs_mixed_binary_and_json(triton, texts):
    outputs = [tritonhttp.InferRequestedOutput("exit_layer", binary_data=True),
               tritonhttp.InferRequestedOutput("label", binary_data=False)]
    result = triton.infer("tiny", [text_input(texts, True)], model_version="1", outputs=outputs,
                          parameters={"threshold": 0.0, "min_layers": 2, "max_layers": 2})
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["exit_layer", "label"]
    assert result.as_numpy("probabilities") is None
    assert result.as_numpy("exit_layer").tolist() == [2] * len(texts)
    assert "data" in response["outputs"][1] and "parameters" in response["outputs"][0]


def test_compressed_request_and_timing_headers(triton, server, texts):
    result = triton.infer("tiny", [text_input(texts[:3], True)], request_compression_algorithm="gzip",
                          parameters={"threshold": 1.0})
    assert result.as_numpy("exit_layer").tolist() == [1, 1, 1]
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["fine"]}]}
    response = httpx.post(f"http://{server}/v2/models/tiny/infer", content=gzip.compress(json.dumps(body).encode()),
                          headers={"content-encoding": "gzip", "content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in response.headers
    for name in ("x-queue-time-ms", "x-inference-time-ms", "x-total-time-ms", "x-mean-exit-layer"):
        assert float(response.headers[name]) >= 0


def test_client_errors_carry_the_message(triton, texts):
    with pytest.raises(InferenceServerException) as err:
        triton.infer("nope", [text_input(texts, True)])
    assert err.value.status() == "404" and "no model named 'nope'" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        triton.infer("tiny", [text_input(texts, True)], model_version="9")
    assert err.value.status() == "404" and "no version 9" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        triton.infer("tiny", [text_input(texts, True)], parameters={"threshold": 2})
    assert err.value.status() == "400" and "parameters.threshold" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        triton.infer("tiny", [text_input(texts, False, name="sentence")])
    assert err.value.status() == "400" and "inputs[0].name" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        triton.get_model_metadata("nope")
    assert err.value.status() == "404"


def test_wrong_datatype_over_raw_http(server):
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}
    response = httpx.post(f"http://{server}/v2/models/tiny/infer", json=body)
    assert response.status_code == 400
    assert response.json()["error"].startswith("inputs[0].datatype: ")


def test_v2_requests_are_counted_by_protocol(server, triton, texts):
    triton.infer("tiny", [text_input(texts[:1], True)])
    with pytest.raises(InferenceServerException):
        triton.infer("tiny", [text_input(texts[:1], True)], parameters={"max_layers": 0})
    metrics = httpx.get(f"http://{server}/metrics").text
    assert 'offramp_requests_total{model="tiny",protocol="v2",status="200"}' in metrics
    assert 'protocol="v2",status="400"' in metrics


# -- in-process: JSON and binary edge cases ----------------------------------------------------------
@pytest.fixture(scope="module")
def client(tiny_bundle):
    settings = Settings(model_dir=tiny_bundle["models"], max_inputs=4, max_text_chars=2000,
                        intra_op_threads=1)
    with TestClient(create_app(settings)) as c:
        yield c


def text_tensor(data, shape=None, **extra) -> dict:
    return {"name": "text", "shape": shape if shape is not None else [len(data)], "datatype": "BYTES",
            "data": data, **extra}


@pytest.mark.parametrize("body, status, field", [
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "INT64", "data": [3]}]}, 400, "inputs[0].datatype"),
    ({"inputs": []}, 400, "inputs"),
    ({}, 400, "inputs"),
    ({"inputs": "fine"}, 400, "inputs"),
    ({"inputs": [text_tensor(["a", "b"], shape=[3])]}, 400, "inputs[0].shape"),
    ({"inputs": [text_tensor(["a", "b"], shape=[2, 1])]}, 400, "inputs[0].shape"),
    ({"inputs": [text_tensor(["a"], shape=[-1])]}, 400, "inputs[0].shape"),
    ({"inputs": [text_tensor([1])]}, 400, "inputs[0].data[0]"),
    ({"inputs": [text_tensor(["ok", "  "])]}, 400, "inputs[0].data[1]"),
    ({"inputs": [text_tensor([])]}, 400, "inputs[0]"),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]}, 400, "inputs[0].data"),
    ({"inputs": [text_tensor(["a"]), text_tensor(["b"])]}, 400, "inputs[1].name"),
    ({"inputs": [text_tensor(["a"])], "parameters": {"threshold": 1.5}}, 400, "parameters.threshold"),
    ({"inputs": [text_tensor(["a"])], "parameters": {"threshold": "high"}}, 400, "parameters.threshold"),
    ({"inputs": [text_tensor(["a"])], "parameters": {"threshold": True}}, 400, "parameters.threshold"),
    ({"inputs": [text_tensor(["a"])], "parameters": {"max_layers": 9}}, 400, "parameters.max_layers"),
    ({"inputs": [text_tensor(["a"])], "parameters": {"min_layers": 3, "max_layers": 2}}, 400,
     "parameters.min_layers"),
    ({"inputs": [text_tensor(["a"])], "parameters": {"timeout_ms": -1}}, 400, "parameters.timeout_ms"),
    ({"inputs": [text_tensor(["a"])], "parameters": {"binary_data_output": "yes"}}, 400,
     "parameters.binary_data_output"),
    ({"inputs": [text_tensor(["a"])], "outputs": [{"name": "logits"}]}, 400, "outputs[0].name"),
    ({"inputs": [text_tensor(["a"])], "outputs": [{"name": "label", "parameters": {"classification": 2}}]},
     400, "outputs[0].parameters.classification"),
    ({"inputs": [text_tensor(["a"])], "id": 5}, 400, "id"),
    ({"input": [text_tensor(["a"])]}, 400, "input"),
    ({"inputs": [text_tensor(["a", "b", "c", "d", "e"])]}, 413, "inputs[0]"),
    ({"inputs": [text_tensor(["x" * 2001])]}, 413, "inputs[0].data[0]"),
])
def test_bad_requests_name_the_field(client, body, status, field):
    response = client.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error.startswith(f"{field}: "), error


def test_invalid_json_and_versions(client):
    response = client.post("/v2/models/tiny/infer", content=b"{bad", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"].startswith("body: invalid JSON")
    body = {"inputs": [text_tensor(["fine"])]}
    assert client.post("/v2/models/tiny/versions/1/infer", json=body).status_code == 200
    response = client.post("/v2/models/tiny/versions/x/infer", json=body)
    assert response.status_code == 400 and response.json()["error"].startswith("version: ")
    assert client.post("/v2/models/tiny/versions/2/infer", json=body).status_code == 404
    assert client.get("/v2/models/tiny/versions/2").status_code == 404
    assert client.get("/v2/models/tiny/versions/2/ready").status_code == 404
    assert client.get("/v2/models/nope/ready").status_code == 404
    assert client.get("/v2/models/tiny/versions/1/ready").json() == {"name": "tiny", "ready": True}


def serialize(texts: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(t)) + t for t in texts)


def binary_request(client, header: dict, raw: bytes, length: int | None = None):
    head = json.dumps(header).encode()
    return client.post("/v2/models/tiny/infer", content=head + raw,
                       headers={"Inference-Header-Content-Length": str(len(head) if length is None else length),
                                "content-type": "application/octet-stream"})


def binary_input(size: int, count: int = 1) -> dict:
    return {"inputs": [{"name": "text", "shape": [count], "datatype": "BYTES",
                        "parameters": {"binary_data_size": size}}]}


def test_binary_request_and_response_by_hand(client):
    raw = serialize([b"a fine film", "épatant".encode()])
    header = {**binary_input(len(raw), 2), "parameters": {"threshold": 0.0},
              "outputs": [{"name": "label", "parameters": {"binary_data": True}},
                          {"name": "probabilities", "parameters": {"binary_data": True}},
                          {"name": "exit_layer", "parameters": {"binary_data": False}}]}
    response = binary_request(client, header, raw)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    head = json.loads(response.content[:length])
    data = response.content[length:]
    label, probs, exit_layer = head["outputs"]
    assert exit_layer == {"name": "exit_layer", "datatype": "INT32", "shape": [2], "data": [3, 3]}
    assert "data" not in label and "data" not in probs
    size = label["parameters"]["binary_data_size"]
    assert len(data) == size + probs["parameters"]["binary_data_size"] == size + 2 * 2 * 4
    labels, offset = [], 0
    while offset < size:
        (n,) = struct.unpack_from("<I", data, offset)
        labels.append(data[offset + 4:offset + 4 + n].decode())
        offset += 4 + n
    matrix = np.frombuffer(data[size:], dtype="<f4").reshape(probs["shape"])
    assert labels == [["0", "1"][i] for i in matrix.argmax(axis=1)]
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("header, raw, length, field", [
    (binary_input(100), serialize([b"fine"]), None, "inputs[0].parameters.binary_data_size"),
    (binary_input(3), b"\x05\x00\x00", None, "inputs[0].parameters.binary_data_size"),
    (binary_input(6), b"\x05\x00\x00\x00ab", None, "inputs[0].parameters.binary_data_size"),
    (binary_input(8, 2), serialize([b"fine"]), None, "inputs[0].shape"),
    (binary_input(5), serialize([b"\xff"]), None, "inputs[0].data[0]"),
    (binary_input(8), serialize([b"fine"]) + b"xx", None, "Inference-Header-Content-Length"),
    (binary_input(8), serialize([b"fine"]), 10**6, "Inference-Header-Content-Length"),
    ({"inputs": [{**text_tensor(["x"]), "parameters": {"binary_data_size": 5}}]}, serialize([b"x"]), None,
     "inputs[0].data"),
    ({"inputs": [{**text_tensor(["x"]), "parameters": {"shared_memory_region": "r"}}]}, b"", None,
     "inputs[0].parameters.shared_memory_region"),
])
def test_bad_binary_requests_are_400(client, header, raw, length, field):
    response = binary_request(client, header, raw, length)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{field}: ")


def test_bad_header_length_and_encoding(client):
    body = json.dumps({"inputs": [text_tensor(["fine"])]}).encode()
    response = client.post("/v2/models/tiny/infer", content=body, headers={"Inference-Header-Content-Length": "x"})
    assert response.status_code == 400
    response = client.post("/v2/models/tiny/infer", content=b"not gzip", headers={"content-encoding": "gzip"})
    assert response.status_code == 400 and response.json()["error"].startswith("body: ")
    response = client.post("/v2/models/tiny/infer", content=body, headers={"content-encoding": "br"})
    assert response.status_code == 415


def test_pair_models_take_text_and_text_pair(client, monkeypatch):
    model = client.app.state.registry.get("tiny")
    monkeypatch.setattr(model.manifest, "text_pair", True)
    meta = client.get("/v2/models/tiny").json()
    assert [i["name"] for i in meta["inputs"]] == ["text", "text_pair"]
    pair = {"name": "text_pair", "shape": [2], "datatype": "BYTES", "data": ["it was", "fine"]}
    response = client.post("/v2/models/tiny/infer", json={"inputs": [text_tensor(["good", "bad"]), pair]})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [2]
    response = client.post("/v2/models/tiny/infer", json={"inputs": [text_tensor(["good"])]})
    assert response.status_code == 400 and "text_pair" in response.json()["error"]
    response = client.post("/v2/models/tiny/infer", json={"inputs": [text_tensor(["good"]), pair]})
    assert response.status_code == 400 and response.json()["error"].startswith("inputs[1].shape: ")


def test_readiness_follows_draining_and_models(client, tmp_path):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    client.app.state.draining = True
    try:
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v2/models/tiny/ready").status_code == 503
    finally:
        client.app.state.draining = False
    with TestClient(create_app(Settings(model_dir=tmp_path))) as empty:
        assert empty.get("/v2/health/live").status_code == 200
        assert empty.get("/v2/health/ready").status_code == 503
        response = empty.post("/v2/models/tiny/infer", json={"inputs": [text_tensor(["x"])]})
        assert response.status_code == 404 and "error" in response.json()


def test_infer_needs_the_api_key_when_set(tiny_bundle):
    settings = Settings(model_dir=tiny_bundle["models"], api_key="s3cret", intra_op_threads=1)
    body = {"inputs": [text_tensor(["fine"])]}
    with TestClient(create_app(settings)) as c:
        assert c.post("/v2/models/tiny/infer", json=body).status_code == 401
        assert c.get("/v2/models/tiny").status_code == 200
        response = c.post("/v2/models/tiny/infer", json=body, headers={"authorization": "Bearer s3cret"})
        assert response.status_code == 200


def test_documented_and_size_limited(tiny_bundle):
    settings = Settings(model_dir=tiny_bundle["models"], max_body_bytes=2000, intra_op_threads=1)
    with TestClient(create_app(settings)) as c:
        paths = c.get("/openapi.json").json()["paths"]
        assert {"/v2", "/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer"} <= set(paths)
        big = {"inputs": [text_tensor(["word " * 500])]}
        assert c.post("/v2/models/tiny/infer", json=big).status_code == 413
        # A small gzip body that inflates past the limit is refused too.
        packed = gzip.compress(json.dumps(big).encode())
        assert len(packed) < 2000
        response = c.post("/v2/models/tiny/infer", content=packed, headers={"content-encoding": "gzip"})
        assert response.status_code == 413 and response.json()["error"].startswith("body: ")
