"""The early-exit engine: runs a bundle layer by layer with per-row early exit.

After every layer, rows whose uncertainty is under their own threshold leave; the others go on
as a smaller batch, trimmed to their own longest row, so the cost follows the layers (and tokens)
each row really needs. A batch of ragged rows is first split into groups of similar length
(`length_groups`), so that short rows do not pay for the padding of long ones. Rows never
influence each other: padding is masked and on the right, and every quantisation scale is fixed
offline, so grouping changes the cost of a row, never its answer. The runtime below (ONNX Runtime
or OpenVINO) is `app.backends`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.backends import PROVIDER_NAMES, make_backend
from app.encoding import EncodedBatch
from app.manifest import Manifest, read_manifest
from app.threads import cpu_quota
from app.policies import ENTROPY, POLICIES, ExitSettings, ExitState, may_leave, step
from app.uncertainty import softmax

log = logging.getLogger(__name__)

# What one more graph call costs, in padded tokens' worth of compute: a group is split off only
# where the padding it saves outweighs the calls it adds (measured: docs/benchmarks.md).
GROUP_CALL_COST_TOKENS = 96


@dataclass
class ExitResult:
    probabilities: np.ndarray  # float32 [rows, classes], from the exit each row left at
    exit_layer: np.ndarray  # int64 [rows], 1-based
    uncertainty: np.ndarray  # float32 [rows], at the exit layer

    @property
    def layers_executed(self) -> int:
        return int(self.exit_layer.sum())


def length_groups(lengths: np.ndarray, call_cost_tokens: float = GROUP_CALL_COST_TOKENS) -> list[np.ndarray]:
    """Row indices split into groups of similar length, minimising padded tokens plus
    `call_cost_tokens` per group (exact dynamic programme over the rows sorted by length)."""
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    if len(order) <= 1 or lengths[order[0]] == lengths[order[-1]]:
        return [order]
    ordered = lengths[order].astype(np.float64)
    n = len(ordered)
    # best[i]: cheapest cost of the first i rows; a group of rows j..i-1 is padded to ordered[i-1].
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        starts = np.arange(i)
        costs = best[:i] + (i - starts) * ordered[i - 1] + call_cost_tokens
        j = int(costs.argmin())
        best[i], cut[i] = costs[j], j
    bounds, i = [], n
    while i > 0:
        bounds.append((cut[i], i))
        i = cut[i]
    return [order[a:b] for a, b in reversed(bounds)]


def compact(backend, hidden, mask: np.ndarray, staying: np.ndarray):
    """The staying rows' hidden states and mask, trimmed to the longest of them."""
    longest = int(mask[staying].sum(axis=1).max())
    return backend.select(hidden, staying, longest), mask[staying, :longest]


class Engine:
    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest | None = None,
        provider: str = "cpu",
        intra_op_threads: int | None = None,
        io_binding: bool | None = None,
        group_call_cost_tokens: float | None = GROUP_CALL_COST_TOKENS,
        temperature: float = 1.0,
    ):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest or read_manifest(self.bundle_dir)
        if self.manifest.tasks:
            raise ValueError(f"{self.bundle_dir} is a multi-task bundle: app/multitask.py MultiTaskEngine runs it")
        self.num_layers = self.manifest.num_layers
        self.output_width = len(self.manifest.labels)  # columns of ExitResult.probabilities
        self.intra_op_threads = intra_op_threads or cpu_quota()
        self.provider = provider
        self.backend = make_backend(self.bundle_dir, self.manifest, provider,
                                    self.intra_op_threads, io_binding)
        self.active_provider = self.backend.active_provider
        self.device = self.backend.device
        self.io_binding = self.backend.io_binding
        # None: a batch always runs as one group (the batcher, or the caller, already grouped it).
        self.group_call_cost_tokens = group_call_cost_tokens
        # Every exit's logits are divided by it (a cascade stage's calibration; 1 elsewhere).
        self.temperature = float(temperature)

    def embed(self, batch: EncodedBatch) -> np.ndarray:
        return self.backend.to_numpy(self.backend.embed(batch))

    def layer(self, index: int, hidden: np.ndarray, attention_mask: np.ndarray):
        """Layer `index` (0-based) -> (hidden states, exit logits), as numpy."""
        hidden, logits = self.backend.layer(index, hidden, attention_mask)
        return self.backend.to_numpy(hidden), logits

    policies = POLICIES  # the exit policies it runs (app/policies.py)

    def exit_temperature(self, index: int) -> float:
        """The max_prob policy's temperature of exit `index` (0-based)."""
        temperatures = self.manifest.exit_temperatures
        return float(temperatures[index]) if temperatures else 1.0

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits / self.temperature if self.temperature != 1.0 else logits)

    def groups(self, batch: EncodedBatch) -> list[np.ndarray]:
        if self.group_call_cost_tokens is None:
            return [np.arange(batch.input_ids.shape[0])]
        return length_groups(batch.lengths, self.group_call_cost_tokens)

    def run(
        self,
        batch: EncodedBatch,
        threshold: float | np.ndarray,
        min_layers: int | np.ndarray = 1,
        max_layers: int | np.ndarray | None = None,
        policy: int | np.ndarray = ENTROPY,
        patience: int | np.ndarray = 0,
    ) -> ExitResult:
        """Every row through the layers until its own policy (app/policies.py) lets it leave."""
        rows = batch.input_ids.shape[0]
        settings = ExitSettings.of(rows, threshold, min_layers,
                                   self.num_layers if max_layers is None else max_layers, policy, patience)
        groups = self.groups(batch)
        if len(groups) == 1:
            return self._run_group(batch, settings)
        result = ExitResult(np.zeros((rows, len(self.manifest.labels)), dtype=np.float32),
                            np.zeros(rows, dtype=np.int64), np.zeros(rows, dtype=np.float32))
        for index in groups:
            part = self._run_group(batch.rows(index), settings.take(index))
            result.probabilities[index] = part.probabilities
            result.exit_layer[index] = part.exit_layer
            result.uncertainty[index] = part.uncertainty
        return result

    def _run_group(self, batch: EncodedBatch, settings: ExitSettings) -> ExitResult:
        rows = batch.input_ids.shape[0]
        probabilities = np.zeros((rows, len(self.manifest.labels)), dtype=np.float32)
        exit_layer = np.zeros(rows, dtype=np.int64)
        uncertainty = np.zeros(rows, dtype=np.float32)

        active = np.arange(rows)  # original row index of each row still running
        state = ExitState.start(rows)
        hidden, mask = self.backend.embed(batch), batch.attention_mask
        running = settings
        for index in range(self.num_layers):
            layer = index + 1
            hidden, logits = self.backend.layer(index, hidden, mask)
            # Where no row may leave (full depth, or below min_layers) no policy needs to run.
            if not may_leave(layer, self.num_layers, running):
                continue
            probs = self.probabilities(logits)
            leaving, u, state = step(layer, self.num_layers, probs, running, state, self.exit_temperature(index))
            if leaving.any():
                done = active[leaving]
                probabilities[done] = probs[leaving]
                exit_layer[done] = layer
                uncertainty[done] = u[leaving]
                staying = ~leaving
                if not staying.any():
                    break
                active = active[staying]
                running = running.take(staying)
                state = state.take(staying)
                hidden, mask = compact(self.backend, hidden, mask, staying)
        return ExitResult(probabilities, exit_layer, uncertainty)

    def all_layer_probabilities(self, batch: EncodedBatch) -> np.ndarray:
        """Probabilities of every exit for every row, [layers, rows, classes] (full depth)."""
        rows = batch.input_ids.shape[0]
        out = np.zeros((self.num_layers, rows, len(self.manifest.labels)), dtype=np.float32)
        for index in self.groups(batch):
            part = batch.rows(index)
            hidden = self.backend.embed(part)
            for layer in range(self.num_layers):
                hidden, logits = self.backend.layer(layer, hidden, part.attention_mask)
                out[layer, index] = self.probabilities(logits)
        return out


__all__ = ["Engine", "ExitResult", "length_groups", "PROVIDER_NAMES"]
