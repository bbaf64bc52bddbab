"""Threshold sweeps through the real engine: accuracy, exit depth and measured speed.

Below both users: export and quantisation (`training/`) use `calibrate` to store the calibration
table and recommended threshold in the manifest; `offramp bench` (`bench/`) uses the same pieces
for its reports. The server itself never imports it.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from app.encoding import EncodedBatch, TextEncoder
from app.engine import Engine, ExitResult
from app.manifest import CalibrationPoint
from app.policies import simulate_exits


def fine_grid(step: float) -> list[float]:
    return [round(x, 4) for x in np.arange(0.0, 1.0 + step / 2, step)]


def make_batches(encoder: TextEncoder, inputs: Sequence, batch_size: int) -> list[EncodedBatch]:
    """Batches in input order (labels stay aligned), each padded to its own longest row."""
    return [encoder.encode(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]


def layer_probabilities(engine: Engine, batches: list[EncodedBatch]) -> np.ndarray:
    """[layers, rows, classes] over all batches, rows in input order."""
    return np.concatenate([engine.all_layer_probabilities(b) for b in batches], axis=1)


def run_batches(engine: Engine, batches: list[EncodedBatch], threshold: float,
                min_layers: int = 1, max_layers: int | None = None) -> tuple[ExitResult, float]:
    """All batches through engine.run; returns the concatenated result and the wall time."""
    start = time.perf_counter()
    results = [engine.run(b, threshold, min_layers, max_layers) for b in batches]
    seconds = time.perf_counter() - start
    return ExitResult(
        np.concatenate([r.probabilities for r in results]),
        np.concatenate([r.exit_layer for r in results]),
        np.concatenate([r.uncertainty for r in results]),
    ), seconds


def timed_run(engine: Engine, batches: list[EncodedBatch], threshold: float,
              repeats: int = 2) -> tuple[ExitResult, float]:
    """Best of `repeats` wall times: the least disturbed by the rest of the machine."""
    runs = [run_batches(engine, batches, threshold) for _ in range(repeats)]
    return runs[0][0], min(seconds for _, seconds in runs)


def threshold_curve(layer_probs: np.ndarray, labels: np.ndarray,
                    thresholds: Sequence[float]) -> list[CalibrationPoint]:
    num_layers = layer_probs.shape[0]
    points = []
    for threshold in thresholds:
        exit_layer, probs = simulate_exits(layer_probs, threshold)
        mean_exit = float(exit_layer.mean())
        points.append(CalibrationPoint(
            threshold=float(threshold),
            accuracy=float((probs.argmax(axis=1) == labels).mean()),
            mean_exit_layer=mean_exit,
            ideal_speedup=num_layers / mean_exit,
        ))
    return points


def fit_temperature(layer_probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of `labels` under every exit's
    probabilities with their logits divided by T (Guo et al., 2017), over a log-spaced grid:
    layer_probs is [layers, rows, classes]."""
    log_p = np.log(np.clip(layer_probs.astype(np.float64), 1e-30, None))
    best, best_nll = 1.0, np.inf
    for t in np.exp(np.linspace(np.log(0.25), np.log(8.0), 241)):
        z = log_p / t
        z -= z.max(axis=-1, keepdims=True)
        log_q = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        nll = -log_q[:, np.arange(len(labels)), labels].mean()
        if nll < best_nll:
            best, best_nll = float(t), nll
    return best


def recommend(points: list[CalibrationPoint], tolerance_points: float) -> float:
    """The largest threshold whose accuracy is within `tolerance_points` (percentage points)
    of full depth (threshold 0)."""
    full = next(p.accuracy for p in points if p.threshold == 0.0)
    ok = [p.threshold for p in points if (full - p.accuracy) * 100 <= tolerance_points + 1e-9]
    return max(ok)


def calibrate(engine: Engine, encoder: TextEncoder, inputs: Sequence, labels: np.ndarray,
              tolerance_points: float = 0.5, step: float = 0.01, timed_step: float = 0.05,
              batch_size: int = 32, repeats: int = 3) -> tuple[list[CalibrationPoint], float]:
    """Calibration table on a labelled dev set, and the recommended threshold.

    Accuracy and exit depth on a fine grid come from one full-depth pass; speed is measured by
    really running the engine at every `timed_step` threshold and at the recommended one."""
    batches = make_batches(encoder, inputs, batch_size)
    points = threshold_curve(layer_probabilities(engine, batches), labels, fine_grid(step))
    recommended = recommend(points, tolerance_points)
    timed = set(fine_grid(timed_step)) | {recommended, 0.0}
    seconds = {p.threshold: timed_run(engine, batches, p.threshold, repeats)[1]
               for p in points if p.threshold in timed}
    # Against the same way of timing full depth, so threshold 0 reads 1.00x by construction.
    for point in points:
        if point.threshold in seconds:
            point.measured_speedup = seconds[0.0] / seconds[point.threshold]
    return points, recommended
