"""A latency objective for requests that set no threshold: when the measured p99 rises above
OFFRAMP_TARGET_P99_MS under load, the default threshold of such requests goes up a step of the
model's calibration table, never beyond the largest threshold whose calibrated accuracy is within
OFFRAMP_MAX_ACCURACY_DROP points of full depth (the steps: the thresholds whose speed calibration
measured); as load falls it comes back down, step by step,
to the model's recommended threshold. (Apparate, SOSP 2024, tunes thresholds at run time under
an accuracy constraint; here the control is latency under an accuracy ceiling.)

The controller only sees numbers (`observe`, `update`), so it is tested on simulated latency
series; the server feeds it every request's time and calls `update` on a timer.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from app.manifest import Manifest

# Below this fraction of the target the load is falling: a step down (hysteresis, so the
# threshold does not flap around the target).
LOWER_BELOW = 0.7
MIN_SAMPLES = 20


def threshold_steps(manifest: Manifest, max_accuracy_drop: float) -> list[float]:
    """The thresholds the controller may use, in order: the recommended one, then each larger
    threshold whose speed calibration measured (a coarse grid, 0.05 apart: a step that pays) and
    whose accuracy is within the budget."""
    points = sorted(manifest.calibration, key=lambda p: p.threshold)
    full = next((p.accuracy for p in points if p.threshold == 0.0), None)
    start = manifest.recommended_threshold
    if full is None:
        return [start]
    inside = [p.threshold for p in points if p.threshold > start and p.measured_speedup is not None
              and (full - p.accuracy) * 100 <= max_accuracy_drop + 1e-9]
    return [start, *inside]


class ThresholdController:
    def __init__(self, steps: list[float], target_p99_ms: float, window_s: float = 2.0,
                 clock=time.monotonic):
        self.steps = steps
        self.target_s = target_p99_ms / 1000
        self.window_s = window_s
        self.clock = clock
        self.level = 0  # index into steps
        self.samples: deque[tuple[float, float]] = deque()  # (when, seconds)

    @property
    def threshold(self) -> float:
        return self.steps[self.level]

    def observe(self, seconds: float) -> None:
        self.samples.append((self.clock(), seconds))

    def p99(self) -> float | None:
        now = self.clock()
        while self.samples and self.samples[0][0] < now - self.window_s:
            self.samples.popleft()
        if len(self.samples) < MIN_SAMPLES:
            return None
        return float(np.percentile([s for _, s in self.samples], 99))

    def update(self) -> float:
        """One control step: up when the window's p99 is over the target, down when it is well
        under it (or there is too little traffic to tell); returns the threshold in force."""
        p99 = self.p99()
        if p99 is not None and p99 > self.target_s:
            self.level = min(self.level + 1, len(self.steps) - 1)
        elif p99 is None or p99 < LOWER_BELOW * self.target_s:
            self.level = max(self.level - 1, 0)
        return self.threshold
