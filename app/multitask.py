"""Multi-task bundles: one shared encoder, an exit head per task after every layer.

A batch may hold rows of several tasks (the batcher merges concurrent requests whatever their
task, since they share the encoder's layers): each layer runs once for every row still in the
batch, then each task's head runs on that task's rows alone, and every row leaves by its own
rule: a classification task's by the request's policy (app/policies.py `step`, with the task's
exit temperatures for max_prob), a regression task's by PABEE's regression rule
(`regression_step`, whatever policy code the row carries). Leaving rows are compacted away as in
app/engine.py. The shared layers and the heads are row-wise (padding masked, on the right), so a
row's answer never depends on its batch-mates, of its task or another.

Output: `ExitResult.probabilities` is [rows, output_width], output_width the widest task: a
classification row's probabilities over its task's labels in the first columns (zeros after), a
regression row's score in column 0. `uncertainty` is the normalised entropy of a classification
row, and for a regression row how far its score moved at its exit layer, as a fraction of the
task's score range (1 at the first exit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from app.backends import make_backend
from app.encoding import EncodedBatch, TextEncoder
from app.engine import GROUP_CALL_COST_TOKENS, ExitResult, compact, length_groups
from app.manifest import Manifest, TaskHead, read_manifest
from app.policies import ENTROPY, POLICIES, REGRESSION, ExitSettings, ExitState, regression_step, step
from app.threads import cpu_quota
from app.uncertainty import softmax


@dataclass
class TaskBatch(EncodedBatch):
    """Rows of a multi-task bundle, each with the task it is for."""

    task: np.ndarray | None = None  # int64 [rows]: position in manifest.tasks

    def __post_init__(self) -> None:
        rows = self.input_ids.shape[0]
        self.task = np.zeros(rows, dtype=np.int64) if self.task is None else \
            np.broadcast_to(np.asarray(self.task, dtype=np.int64), (rows,)).copy()

    @classmethod
    def of(cls, batch: EncodedBatch, task: int | np.ndarray) -> TaskBatch:
        return cls(batch.input_ids, batch.attention_mask, batch.token_type_ids, batch.truncated, batch.empty, task)

    def rows(self, index: np.ndarray) -> TaskBatch:
        return TaskBatch.of(EncodedBatch.rows(self, index), self.task[index])

    @classmethod
    def gather(cls, parts: Sequence[tuple[EncodedBatch, int]]) -> TaskBatch:
        # A part that is no TaskBatch (a plain encoding) is taken as the first task's.
        tasks = [int(b.task[row]) if isinstance(b, TaskBatch) else 0 for b, row in parts]
        return cls.of(EncodedBatch.gather(parts), np.array(tasks, dtype=np.int64))


def warm_up_batch(manifest: Manifest, encoder: TextEncoder) -> TaskBatch:
    """One row per task, in the input kind the task takes: every head gets run once at load."""
    parts = []
    for i, task in enumerate(manifest.tasks):
        parts.append(TaskBatch.of(encoder.encode([("warm up", "warm up") if task.text_pair else "warm up"]), i))
    return TaskBatch.gather([(part, 0) for part in parts])


class MultiTaskEngine:
    """The Engine interface (run, all_layer_probabilities, output_width, policies) over a
    multi-task bundle; the batches it runs are TaskBatches."""

    policies = POLICIES  # of classification tasks; a regression task has its one rule

    def __init__(self, bundle_dir: Path, manifest: Manifest | None = None, provider: str = "cpu",
                 intra_op_threads: int | None = None, io_binding: bool | None = None,
                 group_call_cost_tokens: float | None = GROUP_CALL_COST_TOKENS):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest or read_manifest(self.bundle_dir)
        if not self.manifest.tasks:
            raise ValueError(f"{self.bundle_dir} is not a multi-task bundle")
        self.tasks: list[TaskHead] = self.manifest.tasks
        self.num_layers = self.manifest.num_layers
        self.intra_op_threads = intra_op_threads or cpu_quota()
        self.provider = provider
        self.backend = make_backend(self.bundle_dir, self.manifest, provider, self.intra_op_threads, io_binding)
        self.active_provider = self.backend.active_provider
        self.device = self.backend.device
        self.io_binding = self.backend.io_binding
        self.group_call_cost_tokens = group_call_cost_tokens
        self.output_width = max(task.width for task in self.tasks)
        self.is_regression = np.array([task.kind == "regression" for task in self.tasks])

    def task_index(self, name: str) -> int | None:
        return self.manifest.task_index(name)

    def exit_temperature(self, task: int, index: int) -> float:
        temperatures = self.tasks[task].exit_temperatures
        return float(temperatures[index]) if temperatures else 1.0

    def score_range(self, task: int) -> float:
        low, high = self.tasks[task].score_range
        return float(high - low)

    def _tasks_of(self, batch: EncodedBatch) -> np.ndarray:
        if isinstance(batch, TaskBatch):
            task = batch.task
        elif len(self.tasks) == 1:
            task = np.zeros(batch.input_ids.shape[0], dtype=np.int64)
        else:
            raise ValueError("a multi-task bundle of several tasks runs TaskBatches (each row's task)")
        if task.size and not (0 <= task.min() and task.max() < len(self.tasks)):
            raise ValueError(f"task ids must be in 0..{len(self.tasks) - 1}")
        return task

    def groups(self, batch: EncodedBatch) -> list[np.ndarray]:
        if self.group_call_cost_tokens is None:
            return [np.arange(batch.input_ids.shape[0])]
        return length_groups(batch.lengths, self.group_call_cost_tokens)

    def run(self, batch: EncodedBatch, threshold: float | np.ndarray, min_layers: int | np.ndarray = 1,
            max_layers: int | np.ndarray | None = None, policy: int | np.ndarray = ENTROPY,
            patience: int | np.ndarray = 0) -> ExitResult:
        """Every row through the shared layers until its own rule lets it leave."""
        rows = batch.input_ids.shape[0]
        task = self._tasks_of(batch)
        settings = ExitSettings.of(rows, threshold, min_layers,
                                   self.num_layers if max_layers is None else max_layers, policy, patience)
        if (settings.policy[~self.is_regression[task]] == REGRESSION).any():
            raise ValueError("the regression rule is for regression tasks' rows only")
        result = ExitResult(np.zeros((rows, self.output_width), dtype=np.float32),
                            np.zeros(rows, dtype=np.int64), np.zeros(rows, dtype=np.float32))
        groups = self.groups(batch)
        if len(groups) == 1:
            self._run_group(batch, task, settings, result, np.arange(rows))
            return result
        for index in groups:
            self._run_group(batch.rows(index), task[index], settings.take(index), result, index)
        return result

    def _exits(self, index: int, hidden, mask: np.ndarray, task: np.ndarray):
        """Each task's exit after layer `index` on that task's rows: (task id, its rows' positions
        in `task`, their logits) per task present."""
        for t in np.unique(task):
            mine = np.flatnonzero(task == t)
            if len(mine) == len(task):
                yield int(t), mine, self.backend.head(int(t), index, hidden, mask)
            else:
                # Its rows alone, trimmed to their own longest (what they would be alone).
                longest = int(mask[mine].sum(axis=1).max())
                yield int(t), mine, self.backend.head(int(t), index, self.backend.select(hidden, mine, longest),
                                                      mask[mine, :longest])

    def _decide(self, layer: int, t: int, logits: np.ndarray, settings: ExitSettings, state: ExitState):
        """(leaving, uncertainty, new state, output columns) of one task's rows at this exit."""
        if self.is_regression[t]:
            scores = logits[:, 0].astype(np.float32)
            leaving, u, new = regression_step(layer, self.num_layers, scores, settings, state, self.score_range(t))
            return leaving, u, new, scores[:, None]
        probs = softmax(logits)
        leaving, u, new = step(layer, self.num_layers, probs, settings, state, self.exit_temperature(t, layer - 1))
        return leaving, u, new, probs

    def _run_group(self, batch: EncodedBatch, task: np.ndarray, settings: ExitSettings, result: ExitResult,
                   where: np.ndarray) -> None:
        rows = batch.input_ids.shape[0]
        active = np.arange(rows)  # row of the group of each row still running
        state = ExitState.start(rows)
        hidden, mask = self.backend.embed(batch), batch.attention_mask
        for index in range(self.num_layers):
            layer = index + 1
            hidden, _ = self.backend.layer(index, hidden, mask)  # the shared layer, every task's rows
            mine_settings = settings.take(active)
            leaving = np.zeros(len(active), dtype=bool)
            for t, mine, logits in self._exits(index, hidden, mask, task[active]):
                out, u, new, values = self._decide(layer, t, logits, mine_settings.take(mine), state.take(mine))
                state.previous[mine], state.streak[mine], state.score[mine] = new.previous, new.streak, new.score
                leaving[mine] = out
                done = where[active[mine[out]]]
                result.probabilities[done, :values.shape[1]] = values[out]
                result.exit_layer[done] = layer
                result.uncertainty[done] = u[out]
            if leaving.any():
                staying = ~leaving
                if not staying.any():
                    break
                active = active[staying]
                state = state.take(staying)
                hidden, mask = compact(self.backend, hidden, mask, staying)

    def all_layer_probabilities(self, batch: EncodedBatch) -> np.ndarray:
        """Every exit's output for every row, [layers, rows, output_width] (full depth): each
        row's own task's probabilities, or a regression row's score in column 0."""
        rows = batch.input_ids.shape[0]
        task = self._tasks_of(batch)
        out = np.zeros((self.num_layers, rows, self.output_width), dtype=np.float32)
        for index in self.groups(batch):
            part = batch.rows(index)
            hidden, mask = self.backend.embed(part), part.attention_mask
            for layer in range(self.num_layers):
                hidden, _ = self.backend.layer(layer, hidden, mask)
                for t, mine, logits in self._exits(layer, hidden, mask, task[index]):
                    values = logits[:, :1] if self.is_regression[t] else softmax(logits)
                    out[layer, index[mine], :values.shape[1]] = values
        return out


__all__ = ["MultiTaskEngine", "TaskBatch", "warm_up_batch"]
