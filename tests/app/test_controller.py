"""The latency controller (app/controller.py) on simulated latency series."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from app.controller import ThresholdController, threshold_steps
from app.manifest import CalibrationPoint, read_manifest
from app.server import create_app
from app.settings import Settings


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _feed(controller, clock, ms: float, n: int = 50) -> float:
    for _ in range(n):
        clock.now += 0.01
        controller.observe(ms / 1000)
    return controller.update()


def test_steps_run_from_the_recommended_threshold_to_the_accuracy_budget(tiny_bundle):
    manifest = read_manifest(tiny_bundle["bundle"])
    accuracy = {0.0: 0.90, 0.1: 0.90, 0.2: 0.895, 0.3: 0.89, 0.4: 0.87, 0.5: 0.80}
    manifest.calibration = [CalibrationPoint(threshold=t, accuracy=a, mean_exit_layer=1, ideal_speedup=1,
                                             measured_speedup=1.0 + t)
                            for t, a in accuracy.items()]
    manifest.calibration.append(CalibrationPoint(threshold=0.25, accuracy=0.9, mean_exit_layer=1, ideal_speedup=1))
    manifest.recommended_threshold = 0.1
    assert threshold_steps(manifest, 1.0) == [0.1, 0.2, 0.3]  # 0.25: its speed was not measured
    assert threshold_steps(manifest, 3.0) == [0.1, 0.2, 0.3, 0.4]
    assert threshold_steps(manifest, 0.0) == [0.1]


def test_it_raises_the_threshold_under_load_within_the_budget_and_lowers_it_after():
    clock = Clock()
    controller = ThresholdController([0.1, 0.2, 0.3], target_p99_ms=100, window_s=1.0, clock=clock)
    assert controller.update() == 0.1  # no traffic: stays at the recommended threshold
    assert _feed(controller, clock, 250) == 0.2
    assert _feed(controller, clock, 250) == 0.3
    assert _feed(controller, clock, 250) == 0.3  # never beyond the accuracy budget
    assert _feed(controller, clock, 85) == 0.3  # between 70 % and 100 % of the target: held
    assert _feed(controller, clock, 20) == 0.3  # the window (1 s) still holds the 85 ms requests
    assert _feed(controller, clock, 20) == 0.2  # now only fast ones
    assert _feed(controller, clock, 20) == 0.1
    assert _feed(controller, clock, 20) == 0.1  # never below the recommended threshold
    # a p99 over the target with a fast median still counts: the tail is the objective
    for _ in range(99):
        clock.now += 0.001
        controller.observe(0.01)
    for _ in range(3):  # 3 of the window's 202 requests: over 1 %
        controller.observe(0.5)
    assert controller.update() == 0.2


def test_the_server_reports_the_threshold_in_force(tiny_bundle):
    settings = Settings(model_dir=tiny_bundle["models"], target_p99_ms=0.001, max_accuracy_drop=100)
    with TestClient(create_app(settings)) as client:
        model = client.app.state.registry.get("tiny")
        assert model.controller.steps[0] == model.manifest.recommended_threshold
        # Steps of its own, so the test does not hang on where this tiny model's calibration fell.
        model.controller = ThresholdController([0.2, 0.6], target_p99_ms=0.001)
        deadline = time.monotonic() + 20
        while model.controller.level == 0 and time.monotonic() < deadline:
            client.post("/v1/models/tiny/predict", json={"inputs": ["a fine film"]})  # each over 1 us
        assert model.controller.level == 1
        body = client.post("/v1/models/tiny/predict", json={"inputs": ["a fine film"]}).json()
        assert body["threshold"] == pytest.approx(0.6)
        assert 'offramp_default_threshold{model="tiny"} 0.6' in client.get("/metrics").text
        assert client.post("/v1/models/tiny/predict",
                           json={"inputs": ["a fine film"], "threshold": 0.0}).json()["threshold"] == 0.0
