"""POST /v1/models/{model}/generate in-process (a TestClient over the real app, a real tiny
generation bundle beside the tiny classifier); tests/test_e2e_generation.py covers a real server."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time

import pytest
from fastapi.testclient import TestClient

from app.server import create_app
from app.settings import Settings
from tests.tiny import tiny_generation_bundle_dir

SOURCES = ["the council approved the new budget on tuesday", "rain is expected across the north tonight",
           "a local team won the cup after extra time"]


@pytest.fixture(scope="module")
def generation_bundle(tmp_path_factory):
    return tiny_generation_bundle_dir(tmp_path_factory.mktemp("generation") / "bundle")


@pytest.fixture(scope="module")
def models(tmp_path_factory, generation_bundle, tiny_bundle):
    """gen (a generation model) and tiny (a classifier), side by side."""
    root = tmp_path_factory.mktemp("served") / "models"
    shutil.copytree(generation_bundle, root / "gen")
    shutil.copytree(tiny_bundle["bundle"], root / "tiny")
    return root


def client_for(models, **settings):
    return TestClient(create_app(Settings(model_dir=models, intra_op_threads=1, **settings)))


@pytest.fixture(scope="module")
def client(models):
    with client_for(models, max_inputs=4, max_text_chars=2000, max_beams=4) as c:
        yield c


def generate(client, body, model="gen", **kw):
    return client.post(f"/v1/models/{model}/generate", json=body, **kw)


def listing(client, name="gen") -> dict:
    return next(m for m in client.get("/v1/models").json()["models"] if m["name"] == name)


def slow_generation(client, seconds: float) -> None:
    for model in client.app.state.registry.all_loaded():
        if model.is_generation:
            run = model.engine.generate

            def slow(*args, _run=run, **kw):
                time.sleep(seconds)
                return _run(*args, **kw)

            model.engine.generate = slow


def test_generate_returns_texts_tokens_and_exit_layers(client):
    response = generate(client, {"inputs": SOURCES[:2], "max_new_tokens": 6})
    assert response.status_code == 200, response.text
    body = response.json()
    layers = listing(client)["layers"]
    assert body["model"] == "gen" and body["layers_full"] == layers and len(body["outputs"]) == 2
    assert body["max_new_tokens"] == 6 and body["threshold"] == listing(client)["recommended_threshold"]
    for output in body["outputs"]:
        assert isinstance(output["text"], str) and len(output["tokens"]) <= 6
        # one exit a decoding step: a token's, and the final eos's when the text ended by itself
        assert len(output["exit_layers"]) - len(output["tokens"]) in ((0, 1) if len(output["tokens"]) == 6 else (1,))
        assert all(1 <= layer <= layers for layer in output["exit_layers"])
        assert output["mean_exit_layer"] == pytest.approx(sum(output["exit_layers"]) / len(output["exit_layers"]))
    assert body["layers_executed"] == sum(sum(o["exit_layers"]) for o in body["outputs"])
    assert set(body["timing_ms"]) == {"tokenize", "queue", "inference", "total"}
    for header in ("x-queue-time-ms", "x-inference-time-ms", "x-total-time-ms", "x-mean-exit-layer"):
        assert float(response.headers[header]) >= 0


def test_threshold_zero_runs_every_token_at_full_depth(client):
    body = generate(client, {"inputs": SOURCES, "threshold": 0, "max_new_tokens": 5}).json()
    assert any(o["tokens"] for o in body["outputs"])
    for output in body["outputs"]:
        assert output["exit_layers"] == [body["layers_full"]] * len(output["exit_layers"])
        assert output["mean_exit_layer"] == body["layers_full"]


def test_threshold_one_leaves_no_later_than_full_depth(client):
    early = generate(client, {"inputs": SOURCES, "threshold": 1, "max_new_tokens": 5}).json()
    full = generate(client, {"inputs": SOURCES, "threshold": 0, "max_new_tokens": 5}).json()
    assert early["layers_executed"] <= full["layers_executed"]


def test_concurrent_requests_share_a_batch_and_answer_as_alone(models):
    a = {"inputs": SOURCES[:2], "threshold": 0.5, "max_new_tokens": 5}
    b = {"inputs": SOURCES[2:], "threshold": 0.0, "max_new_tokens": 4, "num_beams": 2, "no_repeat_ngram_size": 2}
    with client_for(models, max_wait_ms=0, batching=False) as c:
        alone = [generate(c, a).json()["outputs"], generate(c, b).json()["outputs"]]
    # The first row waits up to a second for company: both requests land in one batch.
    with client_for(models, max_wait_ms=1000) as c:
        answers: dict[int, dict] = {}

        def send(i, body):
            answers[i] = generate(c, body).json()

        threads = [threading.Thread(target=send, args=(i, body)) for i, body in enumerate((a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = c.get("/v2/models/gen/stats").json()["model_stats"][0]
    assert [answers[0]["outputs"], answers[1]["outputs"]] == alone
    assert [s["batch_size"] for s in stats["batch_stats"]] == [3], stats


def _error(response, status: int, field: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()
    assert error["field"] == field and field in error["error"] and error["error_type"], error
    return error


@pytest.mark.parametrize("body, status, field", [
    ({"inputs": []}, 422, "inputs"),
    ({}, 422, "inputs"),
    ({"inputs": "a string"}, 422, "inputs"),
    ({"inputs": [["a", "pair"]]}, 422, "inputs[0]"),
    ({"inputs": ["ok", ""]}, 422, "inputs[1]"),
    ({"inputs": ["ok", "   "]}, 422, "inputs[1]"),
    ({"inputs": ["ok"], "max_new_tokens": "5"}, 422, "max_new_tokens"),
    ({"inputs": ["ok"], "max_new_tokens": 2.5}, 422, "max_new_tokens"),
    ({"inputs": ["ok"], "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"inputs": ["ok"], "max_new_tokens": 10**6}, 422, "max_new_tokens"),
    ({"inputs": ["ok"], "num_beams": 0}, 422, "num_beams"),
    ({"inputs": ["ok"], "num_beams": 5}, 422, "num_beams"),  # the client's max_beams is 4
    ({"inputs": ["ok"], "num_beams": True}, 422, "num_beams"),
    ({"inputs": ["ok"], "threshold": 1.5}, 422, "threshold"),
    ({"inputs": ["ok"], "threshold": -0.1}, 422, "threshold"),
    ({"inputs": ["ok"], "threshold": "high"}, 422, "threshold"),
    ({"inputs": ["ok"], "no_repeat_ngram_size": -1}, 422, "no_repeat_ngram_size"),
    ({"inputs": ["ok"], "no_repeat_ngram_size": "2"}, 422, "no_repeat_ngram_size"),
    ({"inputs": ["ok"], "no_repeat_ngram_size": 10**6}, 422, "no_repeat_ngram_size"),
    ({"inputs": ["ok"], "timeout_ms": 0}, 422, "timeout_ms"),
    ({"inputs": ["ok"], "min_layers": 1}, 422, "min_layers"),  # predict's, not generate's
    ({"inputs": ["ok"], "unknown": 1}, 422, "unknown"),
    ({"inputs": ["a", "b", "c", "d", "e"]}, 413, "inputs"),
    ({"inputs": ["x" * 2001]}, 413, "inputs[0]"),
])
def test_bad_requests_name_the_field(client, body, status, field):
    _error(generate(client, body), status, field)


def test_max_new_tokens_is_bounded_by_the_decoders_positions(client):
    info = listing(client)["generation"]
    longest = info["max_target_length"] - 1
    assert generate(client, {"inputs": ["ok"], "max_new_tokens": longest}).status_code == 200
    error = _error(generate(client, {"inputs": ["ok"], "max_new_tokens": longest + 1}), 422, "max_new_tokens")
    assert f"1..{longest}" in error["error"]


def test_invalid_json_unknown_model_and_version(client):
    response = client.post("/v1/models/gen/generate", content=b"{bad", headers={"content-type": "application/json"})
    _error(response, 400, "body")
    _error(generate(client, {"inputs": ["x"]}, model="nope"), 404, "model")
    _error(client.post("/v1/models/gen/versions/7/generate", json={"inputs": ["x"]}), 404, "version")
    assert client.post("/v1/models/gen/versions/1/generate", json={"inputs": ["x"]}).status_code == 200


def test_each_kind_of_model_refuses_the_other_kinds_operation(client):
    error = _error(generate(client, {"inputs": ["fine"]}, model="tiny"), 422, "model")
    assert "predict" in error["error"] and error["error_type"] == "unsupported"
    error = _error(client.post("/v1/models/gen/predict", json={"inputs": ["fine"]}), 422, "model")
    assert "/v1/models/gen/generate" in error["error"]
    # /v1/predict classifies: its default is the classifier even though "gen" sorts first
    default = client.post("/v1/predict", json={"inputs": ["fine"]})
    assert default.status_code == 200 and default.json()["model"] == "tiny"
    infer = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["fine"]}]}
    error = _error(client.post("/v2/models/gen/infer", json=infer), 400, "model")
    assert "generate" in error["error"]
    # both kinds still serve their own operation
    assert client.post("/v1/models/tiny/predict", json={"inputs": ["fine"]}).status_code == 200
    assert generate(client, {"inputs": ["fine"]}).status_code == 200


def test_model_listing_calibration_and_v2_metadata(client, generation_bundle):
    manifest = json.loads((generation_bundle / "manifest.json").read_text())
    spec = manifest["generation"]
    gen, tiny = listing(client), listing(client, "tiny")
    assert gen["task"] == "generation" and tiny["task"] == "classification" and tiny.get("generation") is None
    assert gen["layers"] == manifest["num_layers"] == gen["generation"]["decoder_layers"]
    assert gen["recommended_threshold"] == manifest["recommended_threshold"]
    info = gen["generation"]
    assert info["max_new_tokens"] == min(spec["max_new_tokens"], spec["max_target_length"] - 1)
    assert info["num_beams"] == min(spec.get("num_beams", 1), 4) and info["max_beams"] == 4
    assert info["no_repeat_ngram_size"] == spec.get("no_repeat_ngram_size", 0)
    assert client.get("/v1/models/gen").json()["task"] == "generation"
    calibration = client.get("/v1/models/gen/calibration")
    assert calibration.status_code == 200, calibration.text
    table = calibration.json()["policies"]["token_exit"]
    assert table["recommended_threshold"] == manifest["recommended_threshold"]
    assert len(table["points"]) >= len(spec.get("calibration", []))
    _error(client.get("/v1/models/gen/calibration", params={"task": "x"}), 422, "task")
    for path in ("/v2/models/gen", "/v2/models/gen/versions/1", "/v2/models/gen/config", "/v2/models/gen/stats",
                 "/v2/models/gen/ready"):
        assert client.get(path).status_code == 200, path
    assert client.get("/v2/models/gen").json()["parameters"]["task"] == "generation"
    assert client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]


def test_api_key(models):
    with client_for(models, api_key="s3cret") as c:
        missing = generate(c, {"inputs": ["fine"]})
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["field"] == "authorization"
        assert generate(c, {"inputs": ["fine"]}, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert generate(c, {"inputs": ["fine"]}, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_metrics_count_requests_and_generated_tokens(models):
    with client_for(models) as c:
        body = generate(c, {"inputs": SOURCES, "threshold": 0, "max_new_tokens": 4}).json()
        generate(c, {"inputs": ["x"], "num_beams": 0})
        tokens = sum(len(o["exit_layers"]) for o in body["outputs"])  # decoding steps, eos included
        text = c.get("/metrics").text
    assert 'offramp_requests_total{model="gen",protocol="v1",status="200"} 1.0' in text
    assert 'offramp_requests_total{model="gen",protocol="v1",status="422"} 1.0' in text
    assert f'offramp_generated_tokens_total{{model="gen"}} {float(tokens)}' in text
    assert f'offramp_decoder_exit_layer_count{{model="gen"}} {float(tokens)}' in text
    layers = body["layers_full"]
    assert f'offramp_decoder_exit_layer_sum{{model="gen"}} {float(tokens * layers)}' in text
    assert 'offramp_batch_size_rows_count{model="gen"} 1.0' in text
    assert 'offramp_exit_layer_count{model="gen"}' not in text  # rows' exits are the classifiers' family


def test_deadline_and_full_queue(models):
    with client_for(models, max_queue_rows=2, max_batch_rows=1, max_wait_ms=0) as c:
        slow_generation(c, 0.4)
        _error(generate(c, {"inputs": ["fine"], "timeout_ms": 100}), 504, "timeout_ms")
        responses = []

        def send():
            responses.append(generate(c, {"inputs": ["fine"], "max_new_tokens": 2}))

        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    statuses = sorted(r.status_code for r in responses)
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}, statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["retry-after"] == "1" and rejected.json()["error_type"] == "overloaded"


def _set_threshold(bundle, value):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["recommended_threshold"] = value
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _corrupt_but_verified(bundle):
    """An ONNX file replaced by garbage and the manifest's digest updated to match: the bundle
    verifies, and fails only when its sessions open."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["path"] == manifest["generation"]["layers"][0])
    garbage = b"not an onnx graph"
    (bundle / entry["path"]).write_bytes(garbage)
    entry.update(sha256=hashlib.sha256(garbage).hexdigest(), bytes=len(garbage))
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_versions_and_reload_of_a_generation_model(models, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(models / "gen", root / "g" / "1")
    with client_for(root) as c:
        first = generate(c, {"inputs": ["fine"]}, model="g").json()
        assert first["outputs"]
        assert c.post("/v1/models/g/reload").json()["unchanged"] == ["g/1"]
        shutil.copytree(root / "g" / "1", root / "g" / "2")
        _set_threshold(root / "g" / "2", 0.0)
        report = c.post("/v1/models/g/reload").json()
        assert report["loaded"] == ["g/2"] and report["serving"] == [1, 2]
        assert generate(c, {"inputs": ["fine"]}, model="g").json()["threshold"] == 0.0
        v1 = c.post("/v1/models/g/versions/1/generate", json={"inputs": ["fine"]}).json()
        assert v1["threshold"] == first["threshold"] and v1["outputs"] == first["outputs"]


def test_a_bad_generation_bundle_never_takes_serving_models_down(models, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(models / "gen", root / "gen")
    shutil.copytree(models / "tiny", root / "tiny")
    with client_for(root) as c:
        before = generate(c, {"inputs": SOURCES}).json()["outputs"]
        predicted = c.post("/v1/models/tiny/predict", json={"inputs": ["fine"]}).json()["predictions"]
        # dropped in while serving: one whose file fails its digest, one that verifies but
        # whose graph cannot be opened, and a broken update of the serving generation model
        shutil.copytree(models / "gen", root / "bad")
        (root / "bad" / json.loads((root / "bad" / "manifest.json").read_text())["generation"]["projection"]) \
            .write_bytes(b"garbage")
        shutil.copytree(models / "gen", root / "unopenable")
        _corrupt_but_verified(root / "unopenable")
        _set_threshold(root / "gen", 0.9)
        _corrupt_but_verified(root / "gen")
        report = c.post("/v1/models/bad/reload").json()
        assert "sha256" in report["failed"]["bad/1"]
        for name in ("unopenable", "gen"):
            report = c.post(f"/v1/models/{name}/reload").json()
            assert f"{name}/1" in report["failed"], report
        listed = c.get("/v1/models").json()
        assert sorted(m["name"] for m in listed["models"]) == ["gen", "tiny"]
        assert set(listed["failed"]) == {"bad/1", "unopenable/1", "gen/1"}
        assert generate(c, {"inputs": SOURCES}).json()["outputs"] == before
        assert c.post("/v1/models/tiny/predict", json={"inputs": ["fine"]}).json()["predictions"] == predicted
        _error(generate(c, {"inputs": ["fine"]}, model="bad"), 404, "model")
        assert c.get("/health/ready").status_code == 200


def test_offramp_generate_runs_a_bundle_locally(models, generation_bundle, capsys):
    from app.cli import main

    main(["generate", "--model", str(generation_bundle), "--threads", "1", "--threshold", "0",
          "--num-beams", "2", "--max-new-tokens", "5", *SOURCES[:2]])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    layers = json.loads((generation_bundle / "manifest.json").read_text())["num_layers"]
    assert [line["input"] for line in lines] == SOURCES[:2]
    assert all(isinstance(line["text"], str) and line["mean_exit_layer"] == layers for line in lines)
    main(["generate", "--model-dir", str(models), "--model", "gen", "--threads", "1", "fine"])
    assert json.loads(capsys.readouterr().out)["input"] == "fine"
    with pytest.raises(SystemExit, match="max-new-tokens"):
        main(["generate", "--model", str(generation_bundle), "--threads", "1", "--max-new-tokens", "999", "x"])
    with pytest.raises(SystemExit, match="offramp predict"):
        main(["generate", "--model-dir", str(models), "--model", "tiny", "--threads", "1", "fine"])
    with pytest.raises(SystemExit, match="offramp generate"):
        main(["predict", "--model-dir", str(models), "--model", "gen", "--threads", "1", "fine"])
