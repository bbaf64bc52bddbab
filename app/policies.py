"""Exit policies: the one definition of which rows leave after a layer.

Every policy reads a row's `threshold` the same way, as the uncertainty below which it may
leave: 0 = full depth, 1 = the first exit allowed. So one slider means the same on every policy.

- entropy (FastBERT, the default): leave when the normalised entropy of the exit is under the
  threshold.
- max_prob (Schwartz et al., 2020): leave when the top probability of the exit, calibrated by
  that exit's temperature (from the manifest), passes 1 - threshold * (1 - 1/C): the same scale
  as the entropy's, 0 for a certain exit and 1 for a uniform one.
- patience (PABEE, Zhou et al., 2020): leave when the prediction has not changed for `patience`
  consecutive exits (so no earlier than exit patience + 1). With a threshold as well (PCEE-BERT,
  Zhang et al., 2022): leave after `patience` consecutive exits whose entropy is under it.

A regression task's rows (multi-task bundles) have one rule, PABEE's for regression: leave after
`patience` consecutive exits whose score moved less than threshold x the task's score range
from the exit before (`regression_step`).

Whatever the policy, a row never leaves before its min_layers and always leaves at its
max_layers or the last layer. The engine applies `step` layer by layer to the rows still running
(rows are independent: a row's state is its own), and `simulate` applies the same `step` to
full-depth probabilities, for calibration and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from app.uncertainty import normalized_entropy, softmax

POLICIES = ("entropy", "max_prob", "patience")
ENTROPY, MAX_PROB, PATIENCE, CONFIDENT_PATIENCE, REGRESSION = 0, 1, 2, 3, 4


def policy_code(name: str, threshold: float | None) -> int:
    """The code of a named policy; patience with a threshold is PCEE-BERT's combination."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {list(POLICIES)}, not {name!r}")
    if name == "patience":
        return PATIENCE if threshold is None else CONFIDENT_PATIENCE
    return ENTROPY if name == "entropy" else MAX_PROB


def _rows(value, rows: int, dtype) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    return np.full(rows, arr, dtype=dtype) if arr.ndim == 0 else arr


@dataclass
class ExitSettings:
    """What each row asked for: [rows] arrays."""

    threshold: np.ndarray
    min_layers: np.ndarray
    max_layers: np.ndarray
    policy: np.ndarray
    patience: np.ndarray
    # The policy codes present (a superset for rows taken from other settings): carried along
    # by `take` rather than recomputed after every layer.
    kinds: frozenset

    # The first layer (1-based) after which any row may leave, for the entropy and max_prob
    # policies (`may_leave`); computed when first asked, since `take` makes new settings.
    _first_exit: int | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, rows: int, threshold, min_layers, max_layers, policy=ENTROPY, patience=0) -> ExitSettings:
        codes = _rows(policy, rows, np.int64)
        kinds = frozenset((int(policy),)) if np.ndim(policy) == 0 else frozenset(np.unique(codes).tolist())
        return cls(_rows(threshold, rows, np.float32), _rows(min_layers, rows, np.int64),
                   _rows(max_layers, rows, np.int64), codes, _rows(patience, rows, np.int64), kinds)

    def take(self, index) -> ExitSettings:
        return ExitSettings(self.threshold[index], self.min_layers[index], self.max_layers[index],
                            self.policy[index], self.patience[index], self.kinds)

    def first_exit(self) -> int:
        """The first layer at which some row reaches its max_layers, or its min_layers with a
        threshold above 0 (the only rows an uncertainty, never below 0, can let leave)."""
        if self._first_exit is None:
            layers = np.concatenate([self.max_layers, self.min_layers[self.threshold > 0.0]])
            self._first_exit = int(layers.min()) if layers.size else np.iinfo(np.int64).max  # no rows
        return self._first_exit


@dataclass
class ExitState:
    """What each row carries from one exit to the next: its last prediction and its streak."""

    previous: np.ndarray  # class id at the last exit, -1 before the first
    streak: np.ndarray
    score: np.ndarray | None = None  # regression rows: the score at the last exit, NaN before the first

    @classmethod
    def start(cls, rows: int) -> ExitState:
        return cls(np.full(rows, -1, dtype=np.int64), np.zeros(rows, dtype=np.int64),
                   np.full(rows, np.nan, dtype=np.float64))

    def take(self, index) -> ExitState:
        return ExitState(self.previous[index], self.streak[index],
                         None if self.score is None else self.score[index])


def top_probability_uncertainty(probs: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(1 - max p) / (1 - 1/C) of the temperature-scaled probabilities: 0 certain, 1 uniform."""
    if temperature != 1.0:
        probs = softmax(np.log(np.clip(probs, 1e-30, None)) / temperature)
    classes = probs.shape[-1]
    return ((1.0 - probs.max(axis=-1)) / (1.0 - 1.0 / classes)).astype(np.float32)


def step(layer: int, num_layers: int, probs: np.ndarray, settings: ExitSettings, state: ExitState,
         temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray, ExitState]:
    """After exit `layer` (1-based): (which rows leave, their normalised entropy, the new state)."""
    entropy = normalized_entropy(probs)
    threshold, policy = settings.threshold, settings.policy
    prediction = probs.argmax(axis=-1)
    first = threshold >= 1.0  # "the first exit allowed", even for a uniform distribution
    confident_layer = (entropy < threshold) | first
    kinds = settings.kinds
    # Each policy's rule is computed only where a row asks for it (the engine calls this after
    # every layer, so at one row a batch the rules nobody asked for would be most of its time).
    if kinds <= {ENTROPY}:
        streak, confident = np.where(confident_layer, state.streak + 1, 0), confident_layer
    elif kinds <= {MAX_PROB}:
        streak = np.where(confident_layer, state.streak + 1, 0)
        confident = (top_probability_uncertainty(probs, temperature) < threshold) | first
    else:
        unchanged = prediction == state.previous
        streak = np.where(policy == PATIENCE, np.where(unchanged, state.streak + 1, 0),
                          np.where(confident_layer, state.streak + 1, 0))
        top = (top_probability_uncertainty(probs, temperature) < threshold) | first if MAX_PROB in kinds \
            else confident_layer
        confident = np.select([policy == ENTROPY, policy == MAX_PROB], [confident_layer, top],
                              default=streak >= settings.patience)
    leaving = (layer >= num_layers) | (layer >= settings.max_layers) | \
        ((layer >= settings.min_layers) & confident)
    return leaving, entropy, ExitState(prediction, streak, state.score)


def may_leave(layer: int, num_layers: int, settings: ExitSettings) -> bool:
    """Whether any of these rows could leave after exit `layer` (1-based), so that the policy
    must run. A row of the entropy or max_prob policy at threshold 0 (full depth) or below its
    min_layers cannot (neither uncertainty is ever below 0), and needs nothing from this exit:
    its state is only read by the patience policies, whose rows need every exit."""
    if layer >= num_layers:
        return True
    if not settings.kinds <= {ENTROPY, MAX_PROB}:
        return True
    return layer >= settings.first_exit()


def regression_step(layer: int, num_layers: int, scores: np.ndarray, settings: ExitSettings, state: ExitState,
                    score_range: float) -> tuple[np.ndarray, np.ndarray, ExitState]:
    """After exit `layer` (1-based), for regression rows of scores [rows]: (which rows leave, how
    far each score moved from the exit before as a fraction of the score range (1 at the first
    exit), the new state). PABEE's regression rule; a patience below 1 counts as 1."""
    previous = state.score if state.score is not None else np.full(len(scores), np.nan)
    moved = np.where(np.isnan(previous), 1.0, np.abs(scores - previous) / score_range).astype(np.float32)
    steady = (moved < settings.threshold) | ((settings.threshold >= 1.0) & ~np.isnan(previous))
    streak = np.where(steady, state.streak + 1, 0)
    leaving = (layer >= num_layers) | (layer >= settings.max_layers) | \
        ((layer >= settings.min_layers) & (streak >= np.maximum(settings.patience, 1)))
    return leaving, moved, ExitState(state.previous, streak, scores.astype(np.float64))


def simulate_regression(layer_scores: np.ndarray, settings: ExitSettings,
                        score_range: float) -> tuple[np.ndarray, np.ndarray]:
    """Exit layer (1-based) and final score of each row from every exit's scores [layers, rows],
    by the same `regression_step` the engine takes."""
    num_layers, rows = layer_scores.shape
    exit_layer = np.zeros(rows, dtype=np.int64)
    state = ExitState.start(rows)
    for layer in range(1, num_layers + 1):
        leaving, _, state = regression_step(layer, num_layers, layer_scores[layer - 1], settings, state, score_range)
        exit_layer[(exit_layer == 0) & leaving] = layer
    return exit_layer, layer_scores[exit_layer - 1, np.arange(rows)]


def simulate(layer_probs: np.ndarray, settings: ExitSettings,
             temperatures: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exit layer (1-based) and final probabilities of each row from every exit's probabilities
    [layers, rows, classes], by the same `step` the engine takes."""
    num_layers, rows, _ = layer_probs.shape
    exit_layer = np.zeros(rows, dtype=np.int64)
    state = ExitState.start(rows)
    for layer in range(1, num_layers + 1):
        t = temperatures[layer - 1] if temperatures else 1.0
        leaving, _, state = step(layer, num_layers, layer_probs[layer - 1], settings, state, t)
        exit_layer[(exit_layer == 0) & leaving] = layer
    return exit_layer, layer_probs[exit_layer - 1, np.arange(rows)]


def simulate_exits(layer_probs: np.ndarray, threshold: float, min_layers: int = 1,
                   max_layers: int | None = None, policy: int = ENTROPY, patience: int = 0,
                   temperatures: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`simulate` for one setting shared by every row: what a threshold sweep needs from one
    full-depth pass."""
    num_layers, rows, _ = layer_probs.shape
    settings = ExitSettings.of(rows, threshold, min_layers, num_layers if max_layers is None else max_layers,
                               policy, patience)
    return simulate(layer_probs, settings, temperatures)
