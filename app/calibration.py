"""Threshold sweeps through the real engine: accuracy, exit depth and measured speed.

Below both users: export and quantisation (`training/`) use `calibrate` to store the calibration
table and recommended threshold in the manifest; `offramp bench` (`bench/`) uses the same pieces
for its reports. The server itself never imports it.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np

from app.encoding import EncodedBatch, TextEncoder
from app.engine import Engine, ExitResult
from app.manifest import CalibrationPoint, Manifest, PolicyCalibration
from app.policies import MAX_PROB, PATIENCE, simulate_exits


def fine_grid(step: float) -> list[float]:
    return [round(x, 4) for x in np.arange(0.0, 1.0 + step / 2, step)]


def make_batches(encoder: TextEncoder, inputs: Sequence, batch_size: int) -> list[EncodedBatch]:
    """Batches in input order (labels stay aligned), each padded to its own longest row."""
    return [encoder.encode(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]


def layer_probabilities(engine: Engine, batches: list[EncodedBatch]) -> np.ndarray:
    """[layers, rows, classes] over all batches, rows in input order."""
    return np.concatenate([engine.all_layer_probabilities(b) for b in batches], axis=1)


def run_batches(engine: Engine, batches: list[EncodedBatch], threshold: float,
                min_layers: int = 1, max_layers: int | None = None, policy: int = 0,
                patience: int = 0) -> tuple[ExitResult, float]:
    """All batches through engine.run; returns the concatenated result and the wall time."""
    start = time.perf_counter()
    results = [engine.run(b, threshold, min_layers, max_layers, policy, patience) for b in batches]
    seconds = time.perf_counter() - start
    return ExitResult(
        np.concatenate([r.probabilities for r in results]),
        np.concatenate([r.exit_layer for r in results]),
        np.concatenate([r.uncertainty for r in results]),
    ), seconds


def timed_run(engine: Engine, batches: list[EncodedBatch], threshold: float,
              repeats: int = 2, policy: int = 0, patience: int = 0) -> tuple[ExitResult, float]:
    """Best of `repeats` wall times: the least disturbed by the rest of the machine."""
    runs = [run_batches(engine, batches, threshold, policy=policy, patience=patience) for _ in range(repeats)]
    return runs[0][0], min(seconds for _, seconds in runs)


def threshold_curve(layer_probs: np.ndarray, labels: np.ndarray, thresholds: Sequence[float],
                    policy: int = 0, temperatures: list[float] | None = None) -> list[CalibrationPoint]:
    num_layers = layer_probs.shape[0]
    points = []
    for threshold in thresholds:
        exit_layer, probs = simulate_exits(layer_probs, threshold, policy=policy, temperatures=temperatures)
        mean_exit = float(exit_layer.mean())
        points.append(CalibrationPoint(
            threshold=float(threshold),
            accuracy=float((probs.argmax(axis=1) == labels).mean()),
            mean_exit_layer=mean_exit,
            ideal_speedup=num_layers / mean_exit,
            agreement=float((probs.argmax(axis=1) == layer_probs[-1].argmax(axis=1)).mean()),
        ))
    return points


def patience_curve(layer_probs: np.ndarray, labels: np.ndarray) -> list[CalibrationPoint]:
    """PABEE at every patience the model has room for (1 .. layers - 1), and full depth."""
    num_layers = layer_probs.shape[0]
    points = []
    for patience in range(1, num_layers):
        exit_layer, probs = simulate_exits(layer_probs, 0.0, policy=PATIENCE, patience=patience)
        points.append(CalibrationPoint(threshold=None, patience=patience,
                                       accuracy=float((probs.argmax(axis=1) == labels).mean()),
                                       mean_exit_layer=float(exit_layer.mean()),
                                       ideal_speedup=num_layers / float(exit_layer.mean()),
                                       agreement=float((probs.argmax(1) == layer_probs[-1].argmax(1)).mean())))
    return points


def exit_temperatures(layer_probs: np.ndarray, labels: np.ndarray) -> list[float]:
    """Each exit's own temperature (for the max_prob policy)."""
    return [fit_temperature(layer_probs[i:i + 1], labels) for i in range(layer_probs.shape[0])]


def calibrate_policies(engine: Engine, batches: list[EncodedBatch], layer_probs: np.ndarray,
                       labels: np.ndarray, tolerance_points: float, step: float = 0.01,
                       repeats: int = 3) -> tuple[list[float] | None, dict[str, PolicyCalibration]]:
    """Exit temperatures (set on the engine's manifest) and the max_prob and patience tables (of
    those the engine runs), each with its recommended setting: the fastest within
    `tolerance_points` of full depth, its speed measured against full depth through the engine."""
    full_accuracy = float((layer_probs[-1].argmax(-1) == labels).mean())
    full_seconds = timed_run(engine, batches, 0.0, repeats)[1]
    within = lambda p: (full_accuracy - p.accuracy) * 100 <= tolerance_points + 1e-9  # noqa: E731
    temperatures, policies = None, {}
    if "max_prob" in engine.policies:
        # A cascade's stages carry their own temperatures (its manifest's stage temperatures).
        temperatures = None if engine.manifest.stages else exit_temperatures(layer_probs, labels)
        engine.manifest.exit_temperatures = temperatures  # what the timed runs below read
        points = threshold_curve(layer_probs, labels, fine_grid(step), MAX_PROB, temperatures)
        best = max((p for p in points if within(p)), key=lambda p: p.threshold)
        policies["max_prob"] = PolicyCalibration(points=points, recommended_threshold=best.threshold)
    if "patience" in engine.policies and layer_probs.shape[0] > 1:
        points = patience_curve(layer_probs, labels)
        fitting = [p for p in points if within(p)]
        best = min(fitting, key=lambda p: p.patience) if fitting else None
        policies["patience"] = PolicyCalibration(points=points,
                                                 recommended_patience=best.patience if best else None)
    for name, table in policies.items():
        setting = (table.recommended_threshold, table.recommended_patience)
        point = next((p for p in table.points if (p.threshold, p.patience) == setting), None)
        if point is not None:
            policy = MAX_PROB if name == "max_prob" else PATIENCE
            seconds = min(run_batches(engine, batches, point.threshold or 0.0, policy=policy,
                                      patience=point.patience or 0)[1] for _ in range(repeats))
            point.measured_speedup = full_seconds / seconds
    return temperatures, policies



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


def hoeffding_bentkus_p(risk: float, n: int, delta: float) -> float:
    """p-value of "the true mean of a [0, 1] loss exceeds delta" from its mean `risk` on n rows
    (Bates et al., 2021; the test CALM's Learn-then-Test calibration uses)."""
    if n == 0 or risk >= delta:
        return 1.0
    if risk <= 0.0:
        kl = -math.log1p(-delta)
    else:
        kl = risk * math.log(risk / delta) + (1 - risk) * math.log((1 - risk) / (1 - delta))
    hoeffding = math.exp(-n * kl)
    k = math.ceil(n * risk - 1e-9)  # P(Binomial(n, delta) <= k), summed in log space
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
             + i * math.log(delta) + (n - i) * math.log1p(-delta) for i in range(k + 1)]
    top = max(terms)
    bentkus = math.e * math.exp(top) * sum(math.exp(t - top) for t in terms)
    return min(1.0, hoeffding, bentkus)


def risk_controlled(losses: np.ndarray, delta: float, epsilon: float) -> int:
    """Index of the largest threshold certified by fixed-sequence testing (Learn-then-Test, as
    CALM calibrates): losses [thresholds, rows] in [0, 1], thresholds in ascending order; each
    threshold in turn must have p(mean loss > delta) <= epsilon, and the first that fails ends the
    search. With probability at least 1 - epsilon over the calibration rows, the chosen threshold's
    expected loss is at most delta. Threshold 0 (full depth, loss 0) is always allowed."""
    chosen = 0
    for i in range(1, losses.shape[0]):
        if hoeffding_bentkus_p(float(losses[i].mean()), losses.shape[1], delta) > epsilon:
            break
        chosen = i
    return chosen


def recommend(points: list[CalibrationPoint], tolerance_points: float) -> float:
    """The largest threshold whose accuracy is within `tolerance_points` (percentage points)
    of full depth (threshold 0)."""
    full = next(p.accuracy for p in points if p.threshold == 0.0)
    ok = [p.threshold for p in points if (full - p.accuracy) * 100 <= tolerance_points + 1e-9]
    return max(ok)


def calibrate(engine: Engine, encoder: TextEncoder, inputs: Sequence, labels: np.ndarray,
              tolerance_points: float = 0.5, step: float = 0.01, timed_step: float = 0.05,
              batch_size: int = 32, repeats: int = 3,
              manifest: Manifest | None = None) -> tuple[list[CalibrationPoint], float]:
    """Calibration table on a labelled dev set, and the recommended threshold.

    Accuracy and exit depth on a fine grid come from one full-depth pass; speed is measured by
    really running the engine at every `timed_step` threshold and at the recommended one. Given
    the `manifest` being written, its other policies' tables (and the exit temperatures the
    max_prob policy reads) are filled in from the same pass."""
    batches = make_batches(encoder, inputs, batch_size)
    layer_probs = layer_probabilities(engine, batches)
    if manifest is not None:
        manifest.exit_temperatures, manifest.policies = calibrate_policies(
            engine, batches, layer_probs, labels, tolerance_points, step, repeats)
    points = threshold_curve(layer_probs, labels, fine_grid(step))
    recommended = recommend(points, tolerance_points)
    timed = set(fine_grid(timed_step)) | {recommended, 0.0}
    seconds = {p.threshold: timed_run(engine, batches, p.threshold, repeats)[1]
               for p in points if p.threshold in timed}
    # Against the same way of timing full depth, so threshold 0 reads 1.00x by construction.
    for point in points:
        if point.threshold in seconds:
            point.measured_speedup = seconds[0.0] / seconds[point.threshold]
    return points, recommended
