"""Multi-task bundles served (app/multitask.py): the shared layers once for every row whatever
its task, each task's exits on its own rows, each row's own rule, rows independent of their
batch-mates; and the service's task and exit settings (app/request_policy.py)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.batcher import Batcher, Job
from app.encoding import EncodedBatch
from app.engine import Engine
from app.multitask import MultiTaskEngine, TaskBatch
from app.policies import ENTROPY, MAX_PROB, PATIENCE, REGRESSION, ExitSettings, simulate_exits, simulate_regression
from app.registry import load_model
from app.server import create_app
from app.settings import Settings
from training.data import read_examples

TASKS = ("sent", "pair", "sim")


@pytest.fixture(scope="module")
def model(tiny_multitask_bundle):
    return load_model(tiny_multitask_bundle)


@pytest.fixture(scope="module")
def inputs(tiny_multitask_data) -> dict[str, list]:
    """Dev inputs of each task, in the input kind it takes."""
    out = {}
    for name, (_, dev) in tiny_multitask_data.items():
        examples = read_examples(dev).examples[:12]
        out[name] = [e.text if name == "sent" else [e.text, e.text_pair] for e in examples]
    return out


def _batch(model, task: str, items: list) -> TaskBatch:
    return TaskBatch.of(model.encoder.encode(items), model.manifest.task_index(task))


def _mixed(model, inputs, per_task: int = 4) -> tuple[TaskBatch, list[tuple[str, object]]]:
    """Rows of every task interleaved in one batch (as the batcher merges concurrent requests)."""
    rows = [(t, inputs[t][i]) for i in range(per_task) for t in TASKS]
    parts = [_batch(model, t, [x]) for t, x in rows]
    return TaskBatch.gather([(p, 0) for p in parts]), rows


def test_the_manifest_and_engine_describe_the_tasks(model):
    m = model.manifest
    assert m.task == "multitask" and [t.name for t in m.tasks] == list(TASKS) and m.num_layers == 3
    assert [t.kind for t in m.tasks] == ["classification", "classification", "regression"]
    assert [t.text_pair for t in m.tasks] == [False, True, True]
    assert isinstance(model.engine, MultiTaskEngine)
    assert model.engine.output_width == max(t.width for t in m.tasks) == 2


def test_task_batches_keep_each_rows_task_through_rows_and_gather(model, inputs):
    a, b = _batch(model, "sent", inputs["sent"][:3]), _batch(model, "sim", inputs["sim"][:2])
    assert a.task.tolist() == [0, 0, 0] and b.task.tolist() == [2, 2]
    merged = TaskBatch.gather([(a, 2), (b, 0), (a, 0), (b, 1)])
    assert isinstance(merged, TaskBatch) and merged.task.tolist() == [0, 2, 0, 2]
    assert merged.input_ids.shape[1] == int(merged.lengths.max())
    part = merged.rows(np.array([3, 0]))
    assert isinstance(part, TaskBatch) and part.task.tolist() == [2, 0]
    np.testing.assert_array_equal(part.input_ids[1, :part.lengths[1]], a.input_ids[2, :a.lengths[2]])


def test_a_mixed_task_batch_gives_every_row_what_it_gets_alone(model, inputs):
    batch, rows = _mixed(model, inputs)
    n = len(rows)
    kinds = {"sent": 0, "pair": 1, "sim": 2}
    threshold = np.array([[0.0, 0.5, 0.9, 1.0][i % 4] for i in range(n)], dtype=np.float32)
    # classification rows cycle through the policies; regression rows take their own rule
    policy = np.array([REGRESSION if t == "sim" else (ENTROPY, MAX_PROB, PATIENCE)[i % 3]
                       for i, (t, _) in enumerate(rows)])
    patience = np.array([1 + i % 2 if p in (PATIENCE, REGRESSION) else 0 for i, p in enumerate(policy)])
    mixed = model.engine.run(batch, threshold, 1, 3, policy, patience)
    assert len(set(mixed.exit_layer.tolist())) > 1  # the batch really was compacted
    for i, (task, item) in enumerate(rows):
        alone = model.engine.run(_batch(model, task, [item]), threshold[i], 1, 3, policy[i], patience[i])
        assert alone.exit_layer[0] == mixed.exit_layer[i], (i, task)
        np.testing.assert_allclose(alone.probabilities[0], mixed.probabilities[i], atol=1e-5)
        np.testing.assert_allclose(alone.uncertainty[0], mixed.uncertainty[i], atol=1e-5)
        if task != "sim":
            np.testing.assert_allclose(mixed.probabilities[i].sum(), 1.0, atol=1e-5)
        else:
            assert (mixed.probabilities[i, 1:] == 0).all()
        assert kinds[task] == batch.task[i]


def test_threshold_zero_is_full_depth_for_every_task(model, inputs):
    batch, rows = _mixed(model, inputs)
    full = model.engine.run(batch, 0.0, policy=np.where(batch.task == 2, REGRESSION, ENTROPY), patience=1)
    assert full.exit_layer.tolist() == [3] * len(rows)
    np.testing.assert_allclose(full.probabilities, model.engine.all_layer_probabilities(batch)[-1], atol=1e-5)
    first = model.engine.run(batch, 1.0, policy=np.where(batch.task == 2, REGRESSION, ENTROPY), patience=1)
    # classification rows may leave at the first exit; a regression row needs one exit to compare with
    assert first.exit_layer.tolist() == [2 if t == "sim" else 1 for t, _ in rows]


def test_the_regression_rule_on_the_engine_is_simulate_regression_on_full_depth_scores(model, inputs):
    batch = _batch(model, "sim", inputs["sim"])
    scores = model.engine.all_layer_probabilities(batch)[..., 0]  # [layers, rows]
    low, high = model.manifest.tasks[2].score_range
    # a threshold between the rows' first moves, so that some rows leave at exit 2 and some do not
    between = float(np.median(np.abs(scores[1] - scores[0]) / (high - low))) + 1e-6
    spread = set()
    for threshold in (0.0, 0.01, 0.05, between, 0.2, 1.0):
        for patience in (1, 2):
            real = model.engine.run(batch, threshold, 1, 3, REGRESSION, patience)
            settings = ExitSettings.of(len(inputs["sim"]), threshold, 1, 3, REGRESSION, patience)
            layers, final = simulate_regression(scores, settings, high - low)
            assert real.exit_layer.tolist() == layers.tolist(), (threshold, patience)
            np.testing.assert_allclose(real.probabilities[:, 0], final, atol=1e-5)
            if threshold == between and patience == 1:
                spread = set(real.exit_layer.tolist())
    assert spread == {2, 3}


def test_classification_tasks_follow_the_simulated_policies(model, inputs):
    for task in ("sent", "pair"):
        batch = _batch(model, task, inputs[task])
        probs = model.engine.all_layer_probabilities(batch)[..., :2]
        for threshold in (0.0, 0.3, 0.7, 1.0):
            real = model.engine.run(batch, threshold)
            layers, final = simulate_exits(probs, threshold)
            assert real.exit_layer.tolist() == layers.tolist()
            np.testing.assert_allclose(real.probabilities, final, atol=1e-5)


def test_depth_bounds_apply_to_every_task(model, inputs):
    batch, rows = _mixed(model, inputs)
    policy = np.where(batch.task == 2, REGRESSION, ENTROPY)
    assert model.engine.run(batch, 1.0, min_layers=3, policy=policy, patience=1).exit_layer.tolist() == [3] * len(rows)
    assert model.engine.run(batch, 0.0, max_layers=2, policy=policy, patience=1).exit_layer.tolist() == [2] * len(rows)


def test_the_io_binding_path_gives_the_same_answers(tiny_multitask_bundle, model, inputs):
    """The path CUDA uses (hidden states kept as OrtValues; only the outputs a graph has bound)."""
    bound = MultiTaskEngine(tiny_multitask_bundle, intra_op_threads=1, io_binding=True)
    assert bound.io_binding
    batch, _ = _mixed(model, inputs)
    threshold = np.linspace(0, 1, len(batch.task)).astype(np.float32)
    policy = np.where(batch.task == 2, REGRESSION, ENTROPY)
    a, b = model.engine.run(batch, threshold, policy=policy, patience=1), bound.run(batch, threshold, policy=policy,
                                                                                      patience=1)
    assert a.exit_layer.tolist() == b.exit_layer.tolist()
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)


def test_misuse_is_refused(tiny_multitask_bundle, model, inputs):
    with pytest.raises(ValueError, match="multi-task"):
        Engine(tiny_multitask_bundle, intra_op_threads=1)
    with pytest.raises(ValueError, match="openvino"):
        MultiTaskEngine(tiny_multitask_bundle, provider="openvino", intra_op_threads=1)
    plain = model.encoder.encode(inputs["sent"][:2])
    with pytest.raises(ValueError, match="TaskBatch"):
        model.engine.run(plain, 0.0)
    with pytest.raises(ValueError, match="regression"):
        model.engine.run(_batch(model, "sent", inputs["sent"][:2]), 0.0, policy=REGRESSION)
    assert not isinstance(plain, TaskBatch) and isinstance(plain, EncodedBatch)


def test_the_batcher_merges_rows_of_different_tasks_into_one_batch(model, inputs):
    sizes = []

    async def main():
        batcher = Batcher(model.engine, max_batch_rows=32, max_wait_ms=200, on_batch=lambda s: sizes.append(s.rows))
        batcher.start()
        jobs = [Job(_batch(model, t, inputs[t][:2]), 0.5, 1, 3, policy=REGRESSION if t == "sim" else ENTROPY,
                    patience=1) for t in TASKS]
        results = await asyncio.gather(*(batcher.submit(job) for job in jobs))
        await batcher.stop()
        return jobs, results

    jobs, results = asyncio.run(main())
    assert sizes == [6]  # one batch of every task's rows
    for job, result in zip(jobs, results):
        alone = model.engine.run(job.batch, 0.5, 1, 3, job.policy, 1)
        assert result.exit_layer.tolist() == alone.exit_layer.tolist()
        np.testing.assert_allclose(result.probabilities, alone.probabilities, atol=1e-5)


# -- the service, in-process (a real server: tests/test_e2e_multitask.py) ------------------
@pytest.fixture(scope="module")
def client(tiny_multitask_bundle):
    settings = Settings(model_dir=tiny_multitask_bundle.parent, intra_op_threads=1, audit_fraction=1.0,
                        target_p99_ms=50)
    with TestClient(create_app(settings)) as c:
        yield c


def _post(client, **body):
    return client.post("/v1/models/tiny-mt/predict", json=body)


def test_defaults_come_from_the_task(client, model, inputs):
    for head in model.manifest.tasks:
        body = _post(client, inputs=inputs[head.name][:2], task=head.name).json()
        assert body["task"] == head.name and body["threshold"] == head.recommended_threshold
        if head.kind == "regression":
            assert body["policy"] == "patience" and body["patience"] == head.recommended_patience
            assert all("label" not in p and "probabilities" not in p and isinstance(p["score"], float)
                       for p in body["predictions"])
        else:
            assert body["policy"] == "entropy" and "patience" not in body
            assert all(p["label"] in head.labels for p in body["predictions"])


def test_task_and_policy_errors_name_their_field(client, inputs):
    cases = [({"inputs": inputs["sent"][:1]}, "task", "sent"),  # several tasks: one must be named
             ({"inputs": inputs["sent"][:1], "task": "nope"}, "task", "pair"),
             ({"inputs": inputs["pair"][:1], "task": "sent"}, "inputs[0]", "single texts"),
             ({"inputs": inputs["sent"][:1], "task": "sim"}, "inputs[0]", "pairs"),
             ({"inputs": inputs["sim"][:1], "task": "sim", "policy": "entropy"}, "policy", "regression"),
             ({"inputs": inputs["sim"][:1], "task": "sim", "policy": "max_prob"}, "policy", "regression"),
             ({"inputs": inputs["sim"][:1], "task": "sim", "patience": 9}, "patience", "exits"),
             ({"inputs": inputs["sim"][:1], "task": "sim", "max_accuracy_drop": 1, "threshold": 0.1},
              "max_accuracy_drop", "not both")]
    for body, field, words in cases:
        response = _post(client, **body)
        assert response.status_code == 422, (body, response.text)
        error = response.json()
        assert error["field"] == field and words in error["error"] and error["error_type"] == "validation", error


def test_budgets_are_read_on_the_tasks_own_table(client, model, inputs):
    """Each task's budget on its own table: its metric where a point has one, else its accuracy."""
    from app.request_policy import point_value

    for head in model.manifest.tasks:
        full = next(point_value(p) for p in head.calibration if p.threshold == 0.0)
        for budget in (0, 5, 100):
            body = _post(client, inputs=inputs[head.name][:1], task=head.name, max_accuracy_drop=budget).json()
            fitting = [p for p in head.calibration if (full - point_value(p)) * 100 <= budget + 1e-9]
            if head.kind == "regression":
                fastest = min(round(p.mean_exit_layer, 6) for p in fitting)
                chosen = next(p for p in head.calibration if (p.threshold, p.patience) ==
                              (body["threshold"], body["patience"]))
                assert chosen in fitting and round(chosen.mean_exit_layer, 6) == fastest
            else:
                assert body["threshold"] == max(p.threshold for p in fitting) and body["policy"] == "entropy"


def test_calibration_and_model_list_per_task(client, model):
    listed = client.get("/v1/models").json()["models"][0]
    assert [t["name"] for t in listed["tasks"]] == list(TASKS)
    assert listed["tasks"][2]["kind"] == "regression" and listed["tasks"][2]["labels"] == []
    missing = client.get("/v1/models/tiny-mt/calibration")
    assert missing.status_code == 422 and missing.json()["field"] == "task"
    sim = client.get("/v1/models/tiny-mt/calibration", params={"task": "sim"}).json()
    assert sim["task"] == "sim" and sim["metric"] == "pearson" and "patience" in sim["policies"]
    sent = client.get("/v1/models/tiny-mt/calibration", params={"task": "sent"}).json()
    assert sent["policies"]["entropy"]["recommended_threshold"] == model.manifest.tasks[0].recommended_threshold


def test_no_monitor_or_controller_is_attached_to_a_multitask_bundle(client, inputs):
    assert client.app.state.registry.get("tiny-mt").controller is None
    assert client.app.state.registry.get("tiny-mt").batcher.auditor is None
    assert _post(client, inputs=inputs["sent"][:2], task="sent", threshold=1.0).status_code == 200


def test_v2_takes_the_task_as_a_parameter(client, inputs):
    def infer(task, items, **parameters):
        texts = [x if isinstance(x, str) else x[0] for x in items]
        tensors = [{"name": "text", "shape": [len(items)], "datatype": "BYTES", "data": texts}]
        if not isinstance(items[0], str):
            tensors.append({"name": "text_pair", "shape": [len(items)], "datatype": "BYTES",
                            "data": [x[1] for x in items]})
        return client.post("/v2/models/tiny-mt/infer",
                           json={"inputs": tensors, "parameters": {"task": task, **parameters}})

    sim = infer("sim", inputs["sim"][:3]).json()
    out = {o["name"]: o for o in sim["outputs"]}
    assert sim["parameters"]["task"] == "sim" and sim["parameters"]["policy"] == "patience"
    assert out["label_id"]["data"] == [-1] * 3 and out["label"]["data"] == [""] * 3
    assert out["probabilities"]["shape"] == [3, 1] and out["score"]["data"] == out["probabilities"]["data"]
    v1 = _post(client, inputs=inputs["sim"][:3], task="sim").json()
    np.testing.assert_allclose(out["score"]["data"], [p["score"] for p in v1["predictions"]], atol=1e-5)
    sent = infer("sent", inputs["sent"][:2]).json()
    assert {o["name"]: o["shape"] for o in sent["outputs"]}["probabilities"] == [2, 2]
    missing = infer(None, inputs["sent"][:1])
    assert missing.status_code == 400 and missing.json()["field"] == "parameters.task"
    wrong = infer("sent", inputs["pair"][:1])
    assert wrong.status_code == 400 and wrong.json()["field"] == "inputs[1].name"
    meta = client.get("/v2/models/tiny-mt").json()
    assert meta["parameters"]["tasks"] == "sent:classification,pair:classification:pair,sim:regression:pair"
    config = client.get("/v2/models/tiny-mt/config").json()
    assert config["parameters"]["tasks"]["string_value"] == meta["parameters"]["tasks"]


def test_offramp_predict_takes_a_task(tiny_multitask_bundle, capsys):
    import json

    from app.cli import main

    main(["predict", "--model-dir", str(tiny_multitask_bundle.parent), "--threads", "1", "--task", "sim",
          "a man plays a guitar\ta man plays music"])
    row = json.loads(capsys.readouterr().out)
    assert set(row) == {"text", "score", "exit_layer", "uncertainty"}
    main(["predict", "--model-dir", str(tiny_multitask_bundle.parent), "--threads", "1", "--task", "sent", "fine"])
    assert "label" in json.loads(capsys.readouterr().out)
    with pytest.raises(SystemExit, match="--task"):
        main(["predict", "--model-dir", str(tiny_multitask_bundle.parent), "--threads", "1", "fine"])
