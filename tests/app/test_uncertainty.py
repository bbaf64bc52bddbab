import math

import numpy as np
import pytest

from app.policies import ExitSettings, ExitState, simulate_exits, step
from app.uncertainty import normalized_entropy, softmax


def test_entropy_extremes_and_a_worked_value():
    p = np.array([[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]])
    u = normalized_entropy(p[:3])
    assert u[0] == pytest.approx(1.0)
    assert u[1] == pytest.approx(0.0)
    expected = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    assert u[2] == pytest.approx(expected, rel=1e-6)


def test_entropy_is_normalised_by_the_number_of_classes():
    uniform4 = np.full((1, 4), 0.25)
    assert normalized_entropy(uniform4)[0] == pytest.approx(1.0)
    p = np.array([[0.5, 0.5, 0.0, 0.0]])
    assert normalized_entropy(p)[0] == pytest.approx(math.log(2) / math.log(4))


def test_softmax_rows_sum_to_one_and_survive_large_logits():
    p = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    assert p[0, 0] == pytest.approx(1.0)


PROBS = np.array([[0.99, 0.01], [0.85, 0.15], [0.6, 0.4], [0.5, 0.5]], dtype=np.float32)  # U 0.08, 0.61, 0.97, 1


def exits_at(layer, num_layers, threshold, min_layers, max_layers):
    settings = ExitSettings.of(4, threshold, min_layers, max_layers)
    return step(layer, num_layers, PROBS, settings, ExitState.start(4))[0]


def test_exit_rule():
    assert exits_at(1, 6, 0.5, 1, 6).tolist() == [True, False, False, False]
    assert exits_at(1, 6, 0.65, 1, 6).tolist() == [True, True, False, False]
    # threshold 0: nobody leaves before the last layer; at the last layer everyone does
    assert not exits_at(3, 6, 0.0, 1, 6).any()
    assert exits_at(6, 6, 0.0, 1, 6).all()
    # threshold 1 means the first exit, even for U exactly 1
    assert exits_at(1, 6, 1.0, 1, 6).all()
    # depth bounds
    assert not exits_at(1, 6, 1.0, 2, 6).any()
    assert exits_at(2, 6, 0.0, 1, 2).all()


def test_simulate_exits_picks_the_first_confident_layer():
    # 3 layers, 2 rows: row 0 confident at layer 2, row 1 never
    probs = np.array([
        [[0.6, 0.4], [0.5, 0.5]],
        [[0.99, 0.01], [0.5, 0.5]],
        [[0.7, 0.3], [0.4, 0.6]],
    ], dtype=np.float32)
    layer, final = simulate_exits(probs, threshold=0.2)
    assert layer.tolist() == [2, 3]
    np.testing.assert_allclose(final, [[0.99, 0.01], [0.4, 0.6]])
    assert simulate_exits(probs, 0.0)[0].tolist() == [3, 3]
    assert simulate_exits(probs, 1.0)[0].tolist() == [1, 1]
    assert simulate_exits(probs, 1.0, min_layers=2)[0].tolist() == [2, 2]


def test_the_fitted_temperature_undoes_overconfidence():
    from app.calibration import fit_temperature

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(20000, 3))
    # Labels drawn from softmax(logits / 2): the logits are twice as sure as they should be.
    true = softmax(logits / 2.0)
    labels = np.array([rng.choice(3, p=p / p.sum()) for p in true.astype(np.float64)])
    probs = softmax(logits)[None]
    assert abs(fit_temperature(probs, labels) - 2.0) < 0.1
    honest = np.array([rng.choice(3, p=p / p.sum()) for p in probs[0].astype(np.float64)])
    assert abs(fit_temperature(probs, honest) - 1.0) < 0.06
