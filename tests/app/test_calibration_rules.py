"""app/calibration.py risk_controlled: the Learn-then-Test rule the multi-task bundles calibrate by."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom

from app.calibration import hoeffding_bentkus_p, risk_controlled


def test_p_value_is_the_smaller_of_hoeffding_and_bentkus():
    n, delta = 400, 0.02
    for risk in (0.0, 0.005, 0.01, 0.015):
        kl = -math.log1p(-delta) if risk == 0 else \
            risk * math.log(risk / delta) + (1 - risk) * math.log((1 - risk) / (1 - delta))
        expected = min(1.0, math.exp(-n * kl), math.e * binom.cdf(math.ceil(n * risk), n, delta))
        assert math.isclose(hoeffding_bentkus_p(risk, n, delta), expected, rel_tol=1e-9)
    assert hoeffding_bentkus_p(0.02, n, delta) == 1.0 == hoeffding_bentkus_p(0.0, 0, delta)
    # more rows, the same observed risk: more evidence
    assert hoeffding_bentkus_p(0.005, 2000, delta) < hoeffding_bentkus_p(0.005, 200, delta)


def test_the_search_stops_at_the_first_threshold_it_cannot_certify():
    rows = 1000
    losses = np.zeros((6, rows))
    losses[2, :40] = 1  # 4 % lost at the third threshold
    losses[4, :2] = 1  # the later ones look fine again: a noisy table's lucky setting
    assert risk_controlled(losses, delta=0.01, epsilon=0.1) == 1
    losses[2] = 0
    assert risk_controlled(losses, delta=0.01, epsilon=0.1) == 5
    # too few rows to certify 1 % even with no loss: full depth
    assert risk_controlled(np.zeros((6, 100)), delta=0.01, epsilon=0.1) == 0


def test_the_chosen_threshold_keeps_its_risk_bound_with_the_stated_probability():
    """Thresholds whose true risk climbs past delta; over many calibration draws the chosen one's
    true risk exceeds delta in at most about epsilon of them."""
    rng = np.random.default_rng(0)
    true_risk = np.linspace(0.0, 0.05, 26)
    delta, epsilon, rows, trials = 0.02, 0.1, 500, 400
    # nested losses: a row lost at one threshold is lost at every later one, as exits are
    draws = rng.random((trials, rows))
    chosen = np.array([risk_controlled((draws[t][None, :] < true_risk[:, None]).astype(float),
                                       delta, epsilon) for t in range(trials)])
    assert (true_risk[chosen] > delta).mean() <= epsilon
    # and it is not full depth every time: it usually reaches well past the first thresholds
    assert np.median(true_risk[chosen]) >= delta / 3 and (chosen == 0).mean() < 0.05
