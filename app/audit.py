"""The online agreement monitor: a sampled fraction of served rows runs again to full depth once
the queue is idle, after their answers were sent, and /metrics counts how often the early answer
agreed with full depth beside what the calibration table expected at the same setting. An
operator sees drift without labels (Apparate watches its exits the same way).

Rows that already ran to full depth agree by construction and cost nothing; only early rows are
run again, at most `max_pending` waiting at a time (the oldest go first when more arrive).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from app.encoding import EncodedBatch
from app.manifest import CalibrationPoint, Manifest
from app.policies import MAX_PROB, PATIENCE, ENTROPY


@dataclass
class AuditRow:
    batch: EncodedBatch  # the row alone
    label: int  # the served answer
    expected: float | None  # the calibration table's agreement at the row's setting


def expected_agreement(manifest: Manifest, policy: int, threshold: float, patience: int) -> float | None:
    """The agreement with full depth that calibration measured at the nearest setting."""
    if policy == ENTROPY:
        points: list[CalibrationPoint] = manifest.calibration
    else:
        table = manifest.policies.get("max_prob" if policy == MAX_PROB else "patience")
        points = table.points if table else []
    points = [p for p in points if p.agreement is not None]
    if not points or policy not in (ENTROPY, MAX_PROB, PATIENCE):
        return None
    if policy == PATIENCE:
        return min(points, key=lambda p: abs((p.patience or 0) - patience)).agreement
    return min(points, key=lambda p: abs((p.threshold or 0.0) - threshold)).agreement


class Auditor:
    def __init__(self, fraction: float, manifest: Manifest,
                 on_result: Callable[[int, int, float, int], None], seed: int | None = None,
                 max_pending: int = 256):
        self.fraction = fraction
        self.manifest = manifest
        self.on_result = on_result  # (rows, agreed, expected agreement summed, rows with an expectation)
        self.rng = np.random.default_rng(seed)
        self.pending: deque[AuditRow] = deque(maxlen=max_pending)

    def sample(self, batch: EncodedBatch, probabilities: np.ndarray, exit_layer: np.ndarray,
               policy: np.ndarray, threshold: np.ndarray, patience: np.ndarray) -> None:
        """Draw this batch's audited rows: full-depth ones are counted now, early ones queued."""
        chosen = np.flatnonzero(self.rng.random(len(exit_layer)) < self.fraction)
        if not chosen.size:
            return
        expected = [expected_agreement(self.manifest, int(policy[i]), float(threshold[i]), int(patience[i]))
                    for i in chosen]
        full = exit_layer[chosen] >= self.manifest.num_layers
        known = [e for e, f in zip(expected, full) if f and e is not None]
        if full.any():
            self.on_result(int(full.sum()), int(full.sum()), float(sum(known)), len(known))
        for i, e, f in zip(chosen, expected, full):
            if not f:
                self.pending.append(AuditRow(batch.rows(np.array([i])), int(probabilities[i].argmax()), e))

    def take(self, rows: int) -> list[AuditRow]:
        return [self.pending.popleft() for _ in range(min(rows, len(self.pending)))]

    def check(self, engine, rows: list[AuditRow]) -> None:
        """Run `rows` to full depth and report how many agree (called off the event loop)."""
        if not rows:
            return
        merged = type(rows[0].batch).gather([(row.batch, 0) for row in rows])
        full = engine.run(merged, 0.0).probabilities.argmax(axis=1)
        agreed = int(sum(int(f) == row.label for f, row in zip(full, rows)))
        known = [row.expected for row in rows if row.expected is not None]
        self.on_result(len(rows), agreed, float(sum(known)), len(known))
