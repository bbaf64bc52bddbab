"""Cascades: whole bundles run in order as one early-exit network (`offramp cascade` builds them).

A cheap model (a BiLSTM) answers the rows it is sure of; only the others go on to the next stage
(an early-exit transformer), whose own exits still apply. The layers are numbered on through
the stages, and one rule decides every exit: the request's policy (app/policies.py) on the
cascade's layer number, with its one threshold and depth bounds. So a cascade is calibrated, swept and
served as one model, and a row's answer never depends on its batch-mates (each stage's engine
keeps that promise, and which rows go on is decided row by row). Each stage's exits may carry a
temperature fitted when the cascade was built, so that the one threshold means the same
confidence in a BiLSTM as in a transformer. Every stage tokenises with its own tokenizer: a
batch carries each stage's ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from app.encoding import EncodedBatch, TextEncoder, TextInput
from app.engine import GROUP_CALL_COST_TOKENS, Engine, ExitResult
from app.manifest import Manifest, read_manifest
from app.threads import cpu_quota
from app.policies import ENTROPY, MAX_PROB, POLICIES, ExitSettings, ExitState, step


@dataclass
class CascadeBatch(EncodedBatch):
    """Every stage's encoding of the same rows. The batch's own arrays are the last stage's
    (the costly one), so the batcher groups and budgets rows by the tokens that cost most."""

    stages: tuple[EncodedBatch, ...] = field(default=())

    @classmethod
    def of(cls, stages: Sequence[EncodedBatch]) -> CascadeBatch:
        last = stages[-1]
        truncated = np.logical_or.reduce([s.truncated for s in stages])
        empties = [s.empty for s in stages if s.empty is not None]
        empty = np.logical_or.reduce(empties) if empties else None
        return cls(last.input_ids, last.attention_mask, last.token_type_ids, truncated, empty, tuple(stages))

    def rows(self, index: np.ndarray) -> CascadeBatch:
        return CascadeBatch.of([s.rows(index) for s in self.stages])

    @classmethod
    def gather(cls, parts: Sequence[tuple[CascadeBatch, int]]) -> CascadeBatch:
        count = len(parts[0][0].stages)
        return cls.of([EncodedBatch.gather([(b.stages[s], row) for b, row in parts]) for s in range(count)])


class CascadeEncoder:
    def __init__(self, encoders: Sequence[TextEncoder]):
        self.encoders = list(encoders)
        self.max_seq_length = self.encoders[-1].max_seq_length

    def encode(self, inputs: Sequence[TextInput]) -> CascadeBatch:
        return CascadeBatch.of([encoder.encode(inputs) for encoder in self.encoders])


def label_order(stage_labels: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Columns of a stage's probabilities in the cascade's label order."""
    if sorted(stage_labels) != sorted(labels):
        raise ValueError(f"labels {list(stage_labels)} are not the cascade's {list(labels)}")
    return np.array([list(stage_labels).index(label) for label in labels])


class CascadeEngine:
    """The Engine interface (run, all_layer_probabilities) over a cascade bundle's stages."""

    def __init__(self, bundle_dir: Path, manifest: Manifest | None = None, provider: str = "cpu",
                 intra_op_threads: int | None = None, io_binding: bool | None = None,
                 group_call_cost_tokens: float | None = GROUP_CALL_COST_TOKENS):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest or read_manifest(self.bundle_dir)
        if not self.manifest.stages:
            raise ValueError(f"{self.bundle_dir} is not a cascade bundle")
        self.num_layers = self.manifest.num_layers
        self.output_width = len(self.manifest.labels)
        self.intra_op_threads = intra_op_threads or cpu_quota()
        self.provider = provider
        self.stages = self.manifest.stages
        # The cascade's manifest lists (and its reader verified) every stage file.
        self.engines = [Engine(self.bundle_dir / s.path, read_manifest(self.bundle_dir / s.path, verify_files=False),
                               provider, self.intra_op_threads, io_binding, group_call_cost_tokens, s.temperature)
                        for s in self.stages]
        self.orders = [label_order(e.manifest.labels, self.manifest.labels) for e in self.engines]
        for engine in self.engines:  # the stage temperatures calibrate a cascade's exits, for every policy
            engine.manifest.exit_temperatures = None
        last = self.engines[-1]
        self.active_provider, self.device, self.io_binding = last.active_provider, last.device, last.io_binding

    # Patience counts exits in a row, and a stage boundary would reset the count.
    policies = tuple(p for p in POLICIES if p != "patience")

    def run(self, batch: CascadeBatch, threshold: float | np.ndarray, min_layers: int | np.ndarray = 1,
            max_layers: int | np.ndarray | None = None, policy: int | np.ndarray = ENTROPY,
            patience: int | np.ndarray = 0) -> ExitResult:
        rows = batch.input_ids.shape[0]
        settings = ExitSettings.of(rows, threshold, min_layers,
                                   self.num_layers if max_layers is None else max_layers, policy, patience)
        if not np.isin(settings.policy, (ENTROPY, MAX_PROB)).all():
            raise ValueError(f"a cascade runs the policies {list(self.policies)}")
        result = ExitResult(np.zeros((rows, len(self.manifest.labels)), dtype=np.float32),
                            np.zeros(rows, dtype=np.int64), np.zeros(rows, dtype=np.float32))
        waiting = np.arange(rows)  # rows no stage has answered yet
        for stage, engine, order, encoded in zip(self.stages, self.engines, self.orders, batch.stages):
            offset, last = stage.first_layer - 1, stage.last_layer
            # A row that may not leave before a later stage skips this one.
            here = waiting[settings.min_layers[waiting] <= last] if last < self.num_layers else waiting
            if here.size:
                mine = settings.take(here)
                part = engine.run(encoded.rows(here), mine.threshold,
                                  np.clip(mine.min_layers - offset, 1, stage.num_layers),
                                  np.clip(mine.max_layers - offset, 1, stage.num_layers), mine.policy)
                # Inside the stage its engine's rule is the cascade's; at the stage's last layer the
                # engine lets every row out, and the cascade's rule says which really leave.
                done = part.exit_layer < stage.num_layers
                end = ~done
                if end.any():
                    done[end] = step(last, self.num_layers, part.probabilities[end], mine.take(end),
                                     ExitState.start(int(end.sum())),
                                     engine.exit_temperature(stage.num_layers - 1))[0]
                answered = here[done]
                result.probabilities[answered] = part.probabilities[done][:, order]
                result.exit_layer[answered] = part.exit_layer[done] + offset
                result.uncertainty[answered] = part.uncertainty[done]
                waiting = np.setdiff1d(waiting, answered)
            if not waiting.size:
                break
        return result

    def all_layer_probabilities(self, batch: CascadeBatch) -> np.ndarray:
        """[layers, rows, classes] of every stage's every exit, in the cascade's label order."""
        return np.concatenate([engine.all_layer_probabilities(encoded)[:, :, order]
                               for engine, order, encoded in zip(self.engines, self.orders, batch.stages)])

