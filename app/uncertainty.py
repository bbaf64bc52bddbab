"""The one definition of a sample's uncertainty and of the exit rule (FastBERT).

Training, export calibration, the engine and the benchmark all call these functions, so a
threshold means the same thing everywhere.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for stable probabilities, returned as float32."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """U = -sum_c p_c log p_c / log C, in [0, 1]: 0 is certain, 1 is uniform."""
    p = probs.astype(np.float64)
    num_classes = p.shape[-1]
    if num_classes < 2:
        return np.zeros(p.shape[:-1], dtype=np.float32)
    # 0 * log 0 is 0; clip only inside the log so exact zeros contribute nothing.
    entropy = -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=-1)
    return np.clip(entropy / np.log(num_classes), 0.0, 1.0).astype(np.float32)


def exits_at(
    layer: int | np.ndarray,
    num_layers: int,
    uncertainty: np.ndarray,
    threshold: np.ndarray,
    min_layers: np.ndarray,
    max_layers: np.ndarray,
) -> np.ndarray:
    """Which rows leave after `layer` (1-based; one for all rows, or each row's own).

    A row leaves at the first layer whose U < its threshold, never before its min_layers and
    always at its max_layers or the last layer. A threshold of 1 means "the first exit allowed",
    even for a perfectly uniform distribution whose U is exactly 1.
    """
    confident = (uncertainty < threshold) | (threshold >= 1.0)
    return (layer >= num_layers) | (layer >= max_layers) | ((layer >= min_layers) & confident)


def simulate_exits(
    layer_probs: np.ndarray,
    threshold: float,
    min_layers: int = 1,
    max_layers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exit layer (1-based) and final probabilities of each row, given every layer's
    probabilities [layers, rows, classes]. The engine applies the same rule layer by layer; this
    form lets calibration and benchmarks sweep many thresholds from one full-depth pass."""
    num_layers, rows, _ = layer_probs.shape
    max_layers = num_layers if max_layers is None else max_layers
    thresholds = np.full(rows, threshold, dtype=np.float32)
    lo, hi = np.full(rows, min_layers), np.full(rows, max_layers)
    exit_layer = np.zeros(rows, dtype=np.int64)
    for layer in range(1, num_layers + 1):
        undecided = exit_layer == 0
        u = normalized_entropy(layer_probs[layer - 1])
        leaving = undecided & exits_at(layer, num_layers, u, thresholds, lo, hi)
        exit_layer[leaving] = layer
    probs = layer_probs[exit_layer - 1, np.arange(rows)]
    return exit_layer, probs
