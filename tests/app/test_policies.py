"""Exit policies (app/policies.py): each against a hand-worked example, in the engine with rows
independent of their batch, and on both protocols."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.policies import (CONFIDENT_PATIENCE, ENTROPY, MAX_PROB, PATIENCE, REGRESSION, ExitSettings, ExitState,
                          may_leave, simulate, simulate_exits, simulate_regression, step,
                          top_probability_uncertainty)
from app.registry import load_model
from app.server import create_app
from app.settings import Settings
from training.data import read_examples


def _layers(*rows_per_layer) -> np.ndarray:
    return np.array(rows_per_layer, dtype=np.float32)  # [layers, rows, classes]


def test_patience_leaves_once_the_prediction_has_held_for_patience_exits():
    # predictions by exit: 0, 1, 1, 1, 0, 0 (the second exit changes its mind, then three agree)
    p = [[0.9, 0.1], [0.4, 0.6], [0.45, 0.55], [0.3, 0.7], [0.8, 0.2], [0.6, 0.4]]
    probs = _layers(*[[row] for row in p])
    assert simulate_exits(probs, 0.0, policy=PATIENCE, patience=1)[0].tolist() == [3]
    assert simulate_exits(probs, 0.0, policy=PATIENCE, patience=2)[0].tolist() == [4]
    assert simulate_exits(probs, 0.0, policy=PATIENCE, patience=3)[0].tolist() == [6]  # never: the last exit
    # the threshold is not read without it: patience alone ignores confidence
    assert simulate_exits(probs, 1.0, policy=PATIENCE, patience=2)[0].tolist() == [4]
    # the streak reached 2 at exit 4, before min_layers 5; the prediction then changed at 5
    exit_layer, final = simulate_exits(probs, 0.0, policy=PATIENCE, patience=2, min_layers=5)
    assert exit_layer.tolist() == [6] and final[0].tolist() == pytest.approx([0.6, 0.4])


def test_regression_leaves_once_the_score_has_held_still_for_patience_exits():
    # scores by exit (range 0..5, threshold 0.1: a move under 0.5 is "still")
    scores = np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 1.05], [1.0, 2.02, 1.6], [1.0, 2.03, 1.61], [1.0, 3.0, 1.62],
                       [1.0, 3.0, 1.6]], dtype=np.float32)
    settings = ExitSettings.of(3, 0.1, 1, 6, REGRESSION, 2)
    exit_layer, final = simulate_regression(scores, settings, 5.0)
    # row 0 never moves: still at exits 2 and 3; row 1 jumps at 2 (0.2 of the range), then holds
    # at 3 and 4; row 2 holds at 2, jumps 0.11 at 3, holds at 4 and 5
    assert exit_layer.tolist() == [3, 4, 5] and final.tolist() == pytest.approx([1.0, 2.03, 1.62])
    assert simulate_regression(scores, ExitSettings.of(3, 0.0, 1, 6, REGRESSION, 1), 5.0)[0].tolist() == [6, 6, 6]
    assert simulate_regression(scores, ExitSettings.of(3, 1.0, 1, 6, REGRESSION, 1), 5.0)[0].tolist() == [2, 2, 2]
    assert simulate_regression(scores, ExitSettings.of(3, 0.1, 4, 6, REGRESSION, 1), 5.0)[0].tolist() == [4, 4, 4]


def test_patience_with_a_threshold_counts_confident_exits_in_a_row():
    # normalised entropies by exit: 0.47 (confident at 0.5), 0.97, 0.29, 0.24, 0.08
    p = [[0.9, 0.1], [0.6, 0.4], [0.95, 0.05], [0.96, 0.04], [0.99, 0.01]]
    probs = _layers(*[[row] for row in p])
    assert simulate_exits(probs, 0.5, policy=CONFIDENT_PATIENCE, patience=2)[0].tolist() == [4]
    assert simulate_exits(probs, 0.5, policy=CONFIDENT_PATIENCE, patience=1)[0].tolist() == [1]
    assert simulate_exits(probs, 0.5, policy=ENTROPY)[0].tolist() == [1]
    assert simulate_exits(probs, 0.25, policy=CONFIDENT_PATIENCE, patience=2)[0].tolist() == [5]


def test_max_prob_reads_the_calibrated_top_probability_on_the_entropy_scale():
    probs = np.array([[0.7, 0.3]], dtype=np.float32)
    assert top_probability_uncertainty(probs)[0] == pytest.approx(0.6)  # (1 - 0.7) / (1 - 1/2)
    # temperature 2: sqrt(0.7) : sqrt(0.3) = 0.604 : 0.396, so 0.792
    assert top_probability_uncertainty(probs, 2.0)[0] == pytest.approx(0.792, abs=1e-3)
    settings = ExitSettings.of(1, 0.65, 1, 6, MAX_PROB)
    assert step(1, 6, probs, settings, ExitState.start(1), 1.0)[0].tolist() == [True]
    assert step(1, 6, probs, settings, ExitState.start(1), 2.0)[0].tolist() == [False]
    three = _layers([[0.5, 0.3, 0.2]], [[0.8, 0.1, 0.1]])
    # U = (1 - 0.5) / (2/3) = 0.75 at the first exit, 0.3 at the second
    assert simulate_exits(three, 0.5, policy=MAX_PROB)[0].tolist() == [2]
    assert simulate_exits(three, 0.8, policy=MAX_PROB)[0].tolist() == [1]
    assert simulate_exits(three, 0.5, policy=MAX_PROB, temperatures=[1.0, 4.0])[0].tolist() == [2]


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return load_model(tiny_bundle["bundle"])


@pytest.fixture(scope="module")
def texts(tiny_bundle):
    return [e.text for e in read_examples(tiny_bundle["dev"]).examples][:24]


@pytest.mark.parametrize("policy,threshold,patience", [(PATIENCE, 0.0, 1), (CONFIDENT_PATIENCE, 0.6, 2),
                                                       (MAX_PROB, 0.4, 0), (ENTROPY, 0.4, 0)])
def test_the_engine_runs_each_policy_as_simulated(model, texts, policy, threshold, patience):
    batch = model.encoder.encode(texts)
    layer_probs = model.engine.all_layer_probabilities(batch)
    expected, probs = simulate(layer_probs, ExitSettings.of(len(texts), threshold, 1, 3, policy, patience))
    result = model.engine.run(batch, threshold, policy=policy, patience=patience)
    np.testing.assert_array_equal(result.exit_layer, expected)
    np.testing.assert_allclose(result.probabilities, probs, atol=1e-5)


def test_rows_of_different_policies_in_one_batch_answer_as_alone(model, texts):
    rng = np.random.default_rng(1)
    n = len(texts)
    policy = rng.integers(0, 4, n)
    threshold = rng.uniform(0, 1, n).astype(np.float32)
    patience = np.where(np.isin(policy, (PATIENCE, CONFIDENT_PATIENCE)), rng.integers(1, 3, n), 0)
    together = model.engine.run(model.encoder.encode(texts), threshold, 1, None, policy, patience)
    assert len(set(together.exit_layer.tolist())) > 1
    for i in range(n):
        alone = model.engine.run(model.encoder.encode([texts[i]]), threshold[i], 1, None, policy[i], patience[i])
        assert alone.exit_layer[0] == together.exit_layer[i]
        np.testing.assert_allclose(alone.probabilities[0], together.probabilities[i], atol=1e-5)


@pytest.fixture(scope="module")
def client(tiny_bundle, tiny_cascade, tmp_path_factory):
    models = tmp_path_factory.mktemp("policy-models")
    (models / "tiny").symlink_to(tiny_bundle["bundle"])
    (models / "cascade").symlink_to(tiny_cascade)
    with TestClient(create_app(Settings(model_dir=models))) as c:
        yield c


def _post(client, model="tiny", **body):
    return client.post(f"/v1/models/{model}/predict", json={"inputs": ["a fine film", "dull"], **body})


def test_policies_on_v1_and_their_refusals(client):
    body = _post(client, policy="patience", patience=1).json()
    assert body["policy"] == "patience" and body["patience"] == 1 and body.get("threshold") is None
    assert all(p["exit_layer"] >= 2 for p in body["predictions"])  # one agreeing exit after the first
    assert _post(client, policy="patience", patience=1, threshold=0.3).json()["threshold"] == 0.3
    assert _post(client, policy="max_prob", threshold=1.0).json()["predictions"][0]["exit_layer"] == 1
    assert _post(client).json()["policy"] == "entropy"
    for body, field in (({"policy": "patience", "threshold": 0.3}, "patience"), ({"patience": 2}, "patience"),
                        ({"policy": "patience", "patience": 9}, "patience"), ({"policy": "greedy"}, "policy")):
        response = _post(client, **body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["field"] == field, body
    refused = _post(client, "cascade", policy="patience", patience=1)
    assert refused.status_code == 422 and refused.json()["field"] == "policy"
    assert _post(client, "cascade", policy="max_prob", threshold=1.0).json()["predictions"][0]["exit_layer"] == 1


def test_policies_on_v2(client):
    def infer(**parameters):
        return client.post("/v2/models/tiny/infer", json={
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a fine film"]}],
            "parameters": parameters})

    answer = infer(policy="patience", patience=1)
    assert answer.status_code == 200, answer.text
    assert answer.json()["parameters"]["policy"] == "patience"
    exit_layer = next(o for o in answer.json()["outputs"] if o["name"] == "exit_layer")["data"][0]
    assert exit_layer >= 2
    for parameters, field in (({"policy": "patience", "threshold": 0.3}, "parameters.patience"),
                              ({"policy": "nope"}, "parameters.policy"),
                              ({"patience": 0, "policy": "patience"}, "parameters.patience")):
        refused = infer(**parameters)
        assert refused.status_code == 400 and refused.json()["field"] == field, refused.text


def test_requests_without_a_setting_get_the_policys_calibrated_one(client, tiny_bundle):
    from app.manifest import read_manifest

    manifest = read_manifest(tiny_bundle["bundle"])
    assert manifest.exit_temperatures and len(manifest.exit_temperatures) == manifest.num_layers
    max_prob = manifest.policies["max_prob"]
    assert _post(client, policy="max_prob").json()["threshold"] == max_prob.recommended_threshold
    patience = manifest.policies["patience"]
    assert [p.patience for p in patience.points] == list(range(1, manifest.num_layers))
    answer = _post(client, policy="patience")
    if patience.recommended_patience is None:  # no patience is within the tolerance on this model
        assert answer.status_code == 422 and answer.json()["field"] == "patience"
    else:
        assert answer.status_code == 200, answer.text
        assert answer.json()["patience"] == patience.recommended_patience


@pytest.mark.parametrize("budget", [0.0, 2.0, 10.0, 100.0])
def test_a_budget_picks_the_largest_threshold_inside_it(client, tiny_bundle, budget):
    from app.manifest import read_manifest

    manifest = read_manifest(tiny_bundle["bundle"])
    full = next(p.accuracy for p in manifest.calibration if p.threshold == 0.0)
    inside = [p.threshold for p in manifest.calibration if (full - p.accuracy) * 100 <= budget + 1e-9]
    body = _post(client, max_accuracy_drop=budget).json()
    assert body["threshold"] == max(inside)
    if budget == 100.0:
        assert body["threshold"] == 1.0
    table = manifest.policies["max_prob"].points
    assert _post(client, policy="max_prob", max_accuracy_drop=budget).json()["threshold"] == \
        max(p.threshold for p in table if (full - p.accuracy) * 100 <= budget + 1e-9)
    patiences = [p.patience for p in manifest.policies["patience"].points if (full - p.accuracy) * 100 <= budget + 1e-9]
    answer = _post(client, policy="patience", max_accuracy_drop=budget)
    if patiences:
        assert answer.json()["patience"] == min(patiences)
    else:
        assert answer.status_code == 422 and answer.json()["field"] == "max_accuracy_drop"


def test_a_budget_is_instead_of_a_threshold(client):
    refused = _post(client, max_accuracy_drop=1.0, threshold=0.2)
    assert refused.status_code == 422 and refused.json()["field"] == "max_accuracy_drop"
    v2 = client.post("/v2/models/tiny/infer", json={
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["fine"]}],
        "parameters": {"max_accuracy_drop": 100}})
    assert v2.status_code == 200 and v2.json()["parameters"]["threshold"] == 1.0


def test_an_exit_is_needed_only_where_some_row_may_leave():
    def needed(layer, threshold, min_layers=1, max_layers=6, policy=ENTROPY, patience=0, rows=2):
        return may_leave(layer, 6, ExitSettings.of(rows, threshold, min_layers, max_layers, policy, patience))

    assert not needed(1, 0.0) and not needed(5, 0.0, policy=MAX_PROB) and needed(6, 0.0)  # full depth
    assert needed(1, 0.01) and needed(1, 1.0)
    assert not needed(2, 1.0, min_layers=3) and needed(3, 1.0, min_layers=3)
    assert needed(2, 0.0, max_layers=2)  # a row leaves at its max_layers, with that exit's answer
    # patience reads every exit's prediction, whatever the threshold
    assert needed(1, 0.0, policy=PATIENCE, patience=2) and needed(1, 0.0, policy=CONFIDENT_PATIENCE, patience=1)
    # one row of a batch that may leave is enough
    assert may_leave(1, 6, ExitSettings.of(2, np.array([0.0, 0.3], np.float32), 1, 6))
    assert not may_leave(1, 6, ExitSettings.of(0, 0.5, 1, 6))
