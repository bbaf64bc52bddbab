"""End to end: the tiny multi-task bundle served by a real `offramp serve` process, over HTTP:
each task by name, concurrent requests of different tasks merged into one batch, the errors."""

from __future__ import annotations

import signal
import threading

import httpx
import numpy as np
import pytest

from tests.serving import start_server
from training.data import read_examples


@pytest.fixture(scope="module")
def server(tiny_multitask_bundle):
    # The first row of a batch waits long enough for the other tasks' concurrent requests.
    proc, url = start_server(tiny_multitask_bundle.parent, max_wait_ms=300)
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)


@pytest.fixture(scope="module")
def inputs(tiny_multitask_data) -> dict[str, list]:
    return {name: [e.text if name == "sent" else [e.text, e.text_pair] for e in read_examples(dev).examples[:6]]
            for name, (_, dev) in tiny_multitask_data.items()}


def predict(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/models/tiny-mt/predict", json=body, timeout=30)


def test_the_model_list_names_every_task(server):
    model = httpx.get(server + "/v1/models").json()["models"][0]
    assert model["name"] == "tiny-mt" and model["labels"] == []
    tasks = {t["name"]: t for t in model["tasks"]}
    assert list(tasks) == ["sent", "pair", "sim"]
    assert (tasks["sent"]["text_pair"], tasks["pair"]["text_pair"], tasks["sim"]["text_pair"]) == (False, True, True)
    assert tasks["sim"]["kind"] == "regression" and tasks["sim"]["metric"] == "pearson"
    assert len(tasks["sent"]["labels"]) == len(tasks["pair"]["labels"]) == 2


def test_each_task_answers_in_its_own_terms(server, inputs):
    tasks = {t["name"]: t for t in httpx.get(server + "/v1/models").json()["models"][0]["tasks"]}
    for name, items in inputs.items():
        response = predict(server, inputs=items, task=name, threshold=0, return_probabilities=True)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["task"] == name and body["layers_executed"] == body["layers_full"] == 3 * len(items)
        for p in body["predictions"]:
            assert p["exit_layer"] == 3
            if name == "sim":
                assert "label" not in p and "label_id" not in p and "probabilities" not in p
                assert isinstance(p["score"], float) and np.isfinite(p["score"])
            else:
                assert p["label"] in tasks[name]["labels"] and set(p["probabilities"]) == set(tasks[name]["labels"])
                assert p["score"] == pytest.approx(max(p["probabilities"].values()))
    sim = predict(server, inputs=inputs["sim"], task="sim").json()  # its own rule by default
    assert sim["policy"] == "patience" and sim["patience"] == tasks["sim"]["recommended_patience"]
    assert sim["threshold"] == tasks["sim"]["recommended_threshold"]


def test_concurrent_requests_of_different_tasks_share_a_batch_and_keep_their_answers(server, inputs):
    requests = [("sent", inputs["sent"][0]), ("pair", inputs["pair"][0]), ("sim", inputs["sim"][0])]
    settings = dict(threshold=0.5)
    alone = [predict(server, inputs=[item], task=task, **settings).json()["predictions"][0]
             for task, item in requests]

    def batches_of_three() -> int:
        stats = httpx.get(server + "/v2/models/tiny-mt/stats").json()["model_stats"][0]["batch_stats"]
        return next((b["compute_infer"]["count"] for b in stats if b["batch_size"] == 3), 0)

    before = batches_of_three()
    start, answers = threading.Barrier(len(requests)), [None] * len(requests)

    def send(i: int) -> None:
        start.wait()
        answers[i] = predict(server, inputs=[requests[i][1]], task=requests[i][0], **settings)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert batches_of_three() == before + 1  # one batch held the three tasks' rows
    for (task, _), answer, solo in zip(requests, answers, alone):
        row = answer.json()["predictions"][0]
        assert answer.json()["task"] == task
        assert row["exit_layer"] == solo["exit_layer"] and row.get("label") == solo.get("label")
        assert row["score"] == pytest.approx(solo["score"], abs=1e-5)


def test_task_errors_name_the_field(server, inputs):
    missing = predict(server, inputs=inputs["sent"][:1])
    assert missing.status_code == 422 and missing.json()["field"] == "task"
    assert all(name in missing.json()["error"] for name in ("sent", "pair", "sim"))
    unknown = predict(server, inputs=inputs["sent"][:1], task="cola")
    assert unknown.status_code == 422 and unknown.json()["field"] == "task"
    for task, items in (("sent", inputs["pair"][:1]), ("pair", inputs["sent"][:1])):
        wrong = predict(server, inputs=items, task=task)
        assert wrong.status_code == 422 and wrong.json()["field"] == "inputs[0]", wrong.text
    policy = predict(server, inputs=inputs["sim"][:1], task="sim", policy="max_prob")
    assert policy.status_code == 422 and policy.json()["field"] == "policy"
    calibration = httpx.get(server + "/v1/models/tiny-mt/calibration")
    assert calibration.status_code == 422 and calibration.json()["field"] == "task"
    assert httpx.get(server + "/v1/models/tiny-mt/calibration", params={"task": "sim"}).json()["task"] == "sim"


def test_v2_infer_with_a_task_parameter(server, inputs):
    items = inputs["sim"][:2]
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": [x[0] for x in items]},
                       {"name": "text_pair", "shape": [2], "datatype": "BYTES", "data": [x[1] for x in items]}],
            "parameters": {"task": "sim", "threshold": 0}}
    response = httpx.post(server + "/v2/models/tiny-mt/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert outputs["exit_layer"] == [3, 3] and outputs["label_id"] == [-1, -1]
    v1 = predict(server, inputs=items, task="sim", threshold=0).json()
    np.testing.assert_allclose(outputs["score"], [p["score"] for p in v1["predictions"]], atol=1e-5)
    body["parameters"] = {"threshold": 0}
    missing = httpx.post(server + "/v2/models/tiny-mt/infer", json=body, timeout=30)
    assert missing.status_code == 400 and missing.json()["field"] == "parameters.task"
    assert "tasks" in httpx.get(server + "/v2/models/tiny-mt").json()["parameters"]
