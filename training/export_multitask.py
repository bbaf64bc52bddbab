"""Export a MultiTaskModel to one verified, calibrated bundle (app/manifest.py, multi-task).

The shared layers once (layer_NN.onnx: hidden states only), each task's exits beside them
(heads/TASK/exit_NN.onnx: that exit's logits or score), the embeddings and tokenizer as in any
bundle. Every task's every exit is checked against PyTorch through the graphs; each task is
calibrated on its own held-out rows (entropy for classification, PABEE's regression rule for
regression), and its recommended setting's dev figures and wall-time speed-up recorded.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from app.calibration import exit_temperatures, fine_grid, risk_controlled
from app.encoding import EncodedBatch, TextEncoder
from app.manifest import (CalibrationPoint, Graphs, Manifest, PolicyCalibration, Provenance, TaskHead,
                          TaskLayerResult, Verification, describe_file, write_manifest)
from app.policies import ENTROPY, MAX_PROB, PATIENCE, REGRESSION, ExitSettings, simulate_exits, simulate_regression
from app.uncertainty import softmax
from training import progress
from training.dataset import model_input
from training.export import EMBEDDINGS_FILE, TOLERANCE, _Embeddings, _export, layer_file, random_batch
from training.glue_metrics import task_metrics
from training.multitask_data import TaskPart
from training.multitask_model import MultiTaskModel
from training.staging import Staged

log = logging.getLogger(__name__)

PATIENCES = (1, 2, 3)


def exit_file(task: str, index: int) -> str:
    return f"heads/{task}/exit_{index + 1:02d}.onnx"


class _SharedLayer(nn.Module):
    def __init__(self, model: MultiTaskModel, index: int):
        super().__init__()
        self.model, self.index = model, index

    def forward(self, hidden, attention_mask):
        return self.model.run_layer(self.index, hidden, attention_mask)


class _TaskExit(nn.Module):
    def __init__(self, model: MultiTaskModel, task: str, index: int):
        super().__init__()
        self.model, self.task, self.index = model, task, index

    def forward(self, hidden, attention_mask):
        return self.model.task_logits(self.task, self.index, hidden, attention_mask)


def export_graphs(model: MultiTaskModel, out_dir: Path) -> Graphs:
    model.eval()
    ids = torch.ones(2, 8, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    count = 1 + model.num_layers * (1 + len(model.tasks))
    with torch.no_grad(), progress.bar(total=count, desc="ONNX export", unit="graph") as bar:
        _export(_Embeddings(model), (ids, torch.zeros_like(ids)), out_dir / EMBEDDINGS_FILE,
                ["input_ids", "token_type_ids"], ["hidden"])
        hidden = model.embed(ids, mask, torch.zeros_like(ids))
        for index in range(model.num_layers):
            example = torch.randn_like(hidden)
            _export(_SharedLayer(model, index), (example, mask), out_dir / layer_file(index),
                    ["hidden", "attention_mask"], ["hidden_out"])
            hidden = model.run_layer(index, example, mask)
            for task in model.task_names:
                (out_dir / exit_file(task, index)).parent.mkdir(parents=True, exist_ok=True)
                _export(_TaskExit(model, task, index), (hidden, mask), out_dir / exit_file(task, index),
                        ["hidden", "attention_mask"], ["logits"])
                bar.update()
            bar.update()
        bar.update()
    return Graphs(embeddings=EMBEDDINGS_FILE, layers=[layer_file(i) for i in range(model.num_layers)])


class GraphRunner:
    """The bundle's graphs run one task at a time, every exit (full depth): for verification and
    calibration, on exactly the graphs the server runs."""

    def __init__(self, bundle_dir: Path, graphs: Graphs, tasks: Sequence[str], threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads

        def session(name):
            return ort.InferenceSession(str(bundle_dir / name), sess_options=options,
                                        providers=["CPUExecutionProvider"])

        self.embeddings = session(graphs.embeddings)
        self.embedding_inputs = {i.name for i in self.embeddings.get_inputs()}
        self.layers = [session(g) for g in graphs.layers]
        self.heads = {t: [session(exit_file(t, i)) for i in range(len(graphs.layers))] for t in tasks}

    def outputs(self, task: str, batch: EncodedBatch) -> np.ndarray:
        """[layers, rows, width] logits (scores) of every exit of `task`."""
        feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                 "token_type_ids": batch.token_type_ids}
        hidden = self.embeddings.run(None, {k: v for k, v in feeds.items() if k in self.embedding_inputs})[0]
        out = []
        for layer, heads in zip(self.layers, self.heads[task]):
            hidden = layer.run(None, {"hidden": hidden, "attention_mask": batch.attention_mask})[0]
            out.append(heads.run(None, {"hidden": hidden, "attention_mask": batch.attention_mask})[0])
        return np.stack(out)

    def all_outputs(self, task: str, encoder: TextEncoder, inputs: Sequence, batch_size: int = 32) -> np.ndarray:
        return np.concatenate([self.outputs(task, encoder.encode(list(inputs[i:i + batch_size])))
                               for i in range(0, len(inputs), batch_size)], axis=1)


def verify(model: MultiTaskModel, runner: GraphRunner, checks: dict[str, dict[str, EncodedBatch]]) -> Verification:
    """Largest |ONNX - PyTorch| per layer over every task's exits and every check batch."""
    worst = np.zeros(model.num_layers)
    with torch.no_grad():
        for task, batches in checks.items():
            for batch in batches.values():
                expected = np.stack([t.numpy() for t in model(torch.from_numpy(batch.input_ids),
                                                               torch.from_numpy(batch.attention_mask),
                                                               torch.from_numpy(batch.token_type_ids), task)])
                diff = np.abs(expected - runner.outputs(task, batch))
                worst = np.maximum(worst, diff.reshape(model.num_layers, -1).max(axis=1))
    inputs = sorted({name for batches in checks.values() for name in batches})
    return Verification(passed=bool((worst <= TOLERANCE).all()), tolerance=TOLERANCE,
                        max_abs_logit_diff=[float(x) for x in worst], inputs=inputs)


def _inputs(dataset) -> list:
    return [model_input(e) for e in dataset.examples]


def _targets(part: TaskPart, dataset) -> np.ndarray:
    return dataset.targets if part.kind == "regression" else dataset.labels


def _point(part: TaskPart, layers: int, exit_layer: np.ndarray, outputs: np.ndarray, full: np.ndarray,
           targets: np.ndarray, threshold: float, patience: int | None) -> CalibrationPoint:
    metrics = task_metrics(part.kind, outputs, targets, part.positive)
    mean_exit = float(exit_layer.mean())
    if part.kind == "regression":
        agreement = None
    else:
        agreement = float((outputs.argmax(-1) == full.argmax(-1)).mean())
    return CalibrationPoint(threshold=threshold, patience=patience, accuracy=metrics.get("accuracy"),
                            metric=metrics[part.metric], mean_exit_layer=mean_exit,
                            ideal_speedup=layers / mean_exit, agreement=agreement)


def sweep(part: TaskPart, layer_outputs: np.ndarray, targets: np.ndarray,
          step: float = 0.01) -> tuple[list[CalibrationPoint], np.ndarray | None]:
    """The task's calibration table from its exits' full-depth outputs [layers, rows, width]:
    entropy thresholds (classification, with each threshold's drop_loss [thresholds, rows]), or
    thresholds x patiences of the regression rule (no losses)."""
    layers, rows = layer_outputs.shape[:2]
    if part.kind == "regression":
        scores, width = layer_outputs[..., 0], part.score_range[1] - part.score_range[0]
        points = []
        for patience in PATIENCES:
            for threshold in fine_grid(step * 2):
                settings = ExitSettings.of(rows, threshold, 1, layers, REGRESSION, patience)
                exit_layer, final = simulate_regression(scores, settings, width)
                points.append(_point(part, layers, exit_layer, final, scores[-1], targets, threshold, patience))
        return points, None
    probs = softmax(layer_outputs)
    points, losses = [], []
    for threshold in fine_grid(step):
        exit_layer, final = simulate_exits(probs, threshold, policy=ENTROPY)
        points.append(_point(part, layers, exit_layer, final, probs[-1], targets, threshold, None))
        losses.append(drop_loss(probs[-1], final, targets))
    return points, np.stack(losses)


def other_policies(part: TaskPart, layer_outputs: np.ndarray, targets: np.ndarray, rule: CalibrationRule,
                   step: float = 0.01) -> tuple[list[float], dict[str, PolicyCalibration]]:
    """A classification task's exit temperatures and its max_prob and patience tables, each with
    its recommended setting (the same rule as entropy's)."""
    probs = softmax(layer_outputs)
    layers = probs.shape[0]
    temperatures = exit_temperatures(probs, targets)
    max_prob, max_prob_losses = [], []
    for threshold in fine_grid(step):
        exit_layer, final = simulate_exits(probs, threshold, policy=MAX_PROB, temperatures=temperatures)
        max_prob.append(_point(part, layers, exit_layer, final, probs[-1], targets, threshold, None))
        max_prob_losses.append(drop_loss(probs[-1], final, targets))
    best = rule.choose(max_prob, np.stack(max_prob_losses))
    policies = {"max_prob": PolicyCalibration(points=max_prob, recommended_threshold=best.threshold)}
    patience, patience_losses = [], []
    for count in range(layers - 1, 0, -1):  # the most cautious first
        exit_layer, final = simulate_exits(probs, 0.0, policy=PATIENCE, patience=count)
        patience.append(_point(part, layers, exit_layer, final, probs[-1], targets, None, count))
        patience_losses.append(drop_loss(probs[-1], final, targets))
    if patience:
        full = _point(part, layers, np.full(probs.shape[1], layers), probs[-1], probs[-1], targets, 0.0, None)
        if rule.kind == "risk":  # full depth first, the always-allowed setting
            losses = np.stack([np.zeros(len(targets)), *patience_losses])
            chosen = rule.choose([full, *patience], losses).patience
        else:
            fitting = [p.patience for p in patience if (full.metric - p.metric) * 100 <= rule.tolerance_points + 1e-9]
            chosen = min(fitting) if fitting else None
        patience.reverse()
        policies["patience"] = PolicyCalibration(points=patience, recommended_patience=chosen)
    return temperatures, policies


def recommend(points: list[CalibrationPoint], tolerance_points: float) -> CalibrationPoint:
    """The fastest setting whose metric is within `tolerance_points` (x 100) of full depth; ties
    go to the more cautious one (smaller threshold, larger patience)."""
    full = next(p.metric for p in points if p.threshold == 0.0)
    fitting = [p for p in points if (full - p.metric) * 100 <= tolerance_points + 1e-9]
    return min(fitting, key=lambda p: (round(p.mean_exit_layer, 6), p.threshold, -(p.patience or 0)))


def drop_loss(full: np.ndarray, final: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per row: 1 where full depth is right and the exit answer is wrong. Its mean bounds the
    accuracy a setting loses (the rows it fixes are not counted)."""
    return ((full.argmax(-1) == targets) & (final.argmax(-1) != targets)).astype(np.float64)


@dataclass(frozen=True)
class CalibrationRule:
    """How a task's recommended setting is chosen on its calibration rows.

    "risk" (default): the most aggressive setting that Learn-then-Test certifies (as CALM does;
    app/calibration.py risk_controlled) to lose at most `tolerance_points` of accuracy with
    probability 1 - epsilon, the loss of a row being "full depth right, exit wrong"; settings are
    tested from the most cautious on, so a noisy table cannot hand out a lucky aggressive one.
    "tolerance": the fastest setting whose metric on the calibration rows is within
    `tolerance_points` of full depth (the rule of the single-task bundles). Regression tasks
    always use "tolerance" (their loss is not a [0, 1] one)."""

    kind: str = "risk"
    tolerance_points: float = 1.0
    epsilon: float = 0.1

    def choose(self, points: list[CalibrationPoint], losses: np.ndarray) -> CalibrationPoint:
        """points from the most cautious setting to the most aggressive; losses [points, rows]."""
        if self.kind == "tolerance":
            return recommend(points, self.tolerance_points)
        return points[risk_controlled(losses, self.tolerance_points / 100, self.epsilon)]

    def record(self, rows: int, kind: str) -> dict:
        rule = "tolerance" if kind == "regression" else self.kind
        return {"rule": rule, "tolerance_points": self.tolerance_points, "rows": rows,
                **({"epsilon": self.epsilon} if rule == "risk" else {})}


def export_multitask_bundle(model: MultiTaskModel, parts: Sequence[TaskPart], tokenizer_file: Path, out_dir: Path, *,
                            name: str, max_seq_length: int, provenance: Provenance,
                            dev_results: dict[str, list[dict[str, float]]],
                            rule: CalibrationRule = CalibrationRule(), timing_rows: int = 256) -> Manifest:
    """Write the bundle to out_dir (replacing it only once everything has passed)."""
    out_dir = Path(out_dir)
    with Staged(out_dir) as staged:
        staging = staged.path
        with progress.phase("ONNX export", f"{1 + model.num_layers * (1 + len(parts))} graphs for {out_dir}"):
            graphs = export_graphs(model, staging)
        shutil.copyfile(tokenizer_file, staging / "tokenizer.json")
        encoder = TextEncoder.from_file(staging / "tokenizer.json", max_seq_length)
        runner = GraphRunner(staging, graphs, [p.name for p in parts])
        checks = {}
        for i, part in enumerate(parts):
            pairs = random_batch(model.config.vocab_size, seed=i)
            if part.text_pair:  # the second text's tokens, as a pair's would be
                pairs.token_type_ids[:, pairs.input_ids.shape[1] // 2:] = pairs.attention_mask[:, pairs.input_ids.shape[1] // 2:]
            rows = part.calibration if part.calibration is not None else part.dev
            checks[part.name] = {"random": pairs, "real": encoder.encode(_inputs(rows)[:32])}
        with progress.phase("verification against PyTorch", f"{len(parts)} tasks") as p:
            verification = verify(model, runner, checks)
            p.result = f"max |diff| {max(verification.max_abs_logit_diff):.2e}"
        if not verification.passed:
            raise RuntimeError(f"ONNX export does not match PyTorch: max |diff| per layer "
                               f"{verification.max_abs_logit_diff} > {TOLERANCE}")
        heads = []
        for part in parts:
            rows = part.calibration if part.calibration is not None else part.dev
            with progress.phase(f"calibration of task {part.name}", f"{len(rows):,} rows"):
                outputs = runner.all_outputs(part.name, encoder, _inputs(rows))
                targets = _targets(part, rows)
                points, losses = sweep(part, outputs, targets)
                if part.kind == "regression":
                    best, temperatures, policies = recommend(points, rule.tolerance_points), None, {}
                else:
                    best = rule.choose(points, losses)
                    temperatures, policies = other_policies(part, outputs, targets, rule)
            heads.append(TaskHead(
                name=part.name, kind=part.kind, labels=part.labels, source_labels=part.source_labels or None,
                text_pair=part.text_pair, metric=part.metric,
                exits=[exit_file(part.name, i) for i in range(model.num_layers)], score_range=part.score_range,
                recommended_threshold=best.threshold, recommended_patience=best.patience, calibration=points,
                calibration_rule=rule.record(len(rows), part.kind),
                exit_temperatures=temperatures, policies=policies,
                dev_results=[TaskLayerResult(layer=i, metrics=m) for i, m in enumerate(dev_results[part.name], 1)],
                calibration_data=part.records.get("calibration", part.records["dev"]),
                train=part.records["train"], dev=part.records["dev"]))
        files = [describe_file(staging, f) for f in ["tokenizer.json", graphs.embeddings, *graphs.layers,
                                                      *[e for h in heads for e in h.exits]]]
        manifest = Manifest(name=name, task="multitask", max_seq_length=max_seq_length, num_layers=model.num_layers,
                            hidden_size=model.config.hidden_size, exit_head=model.exit_head,
                            teacher_head=model.exit_head, graphs=graphs, tasks=heads, files=files,
                            provenance=provenance, verification=verification)
        for part, head in zip(parts, heads):
            head.dev_at_recommended = dev_at_recommended(staging, manifest, runner, encoder, part, head, timing_rows)
            log.info("task %s: recommended threshold %.2f%s; dev at it %s", part.name, head.recommended_threshold,
                     f" patience {head.recommended_patience}" if head.recommended_patience else "",
                     ", ".join(f"{k} {v:.4f}" for k, v in head.dev_at_recommended.items()))
        write_manifest(staging, manifest)
        staged.publish()
        return manifest


def dev_at_recommended(bundle_dir: Path, manifest: Manifest, runner: GraphRunner, encoder: TextEncoder,
                       part: TaskPart, head: TaskHead, timing_rows: int) -> dict[str, float]:
    """Dev metrics with exits at the task's recommended setting (out of sample: calibrated on
    other rows), its mean exit layer, and the wall-time speed-up against full depth of the
    served engine on the first `timing_rows` dev rows."""
    outputs = runner.all_outputs(part.name, encoder, _inputs(part.dev))
    rows = outputs.shape[1]
    if part.kind == "regression":
        settings = ExitSettings.of(rows, head.recommended_threshold, 1, manifest.num_layers, REGRESSION,
                                   head.recommended_patience or 1)
        exit_layer, final = simulate_regression(outputs[..., 0], settings, part.score_range[1] - part.score_range[0])
    else:
        exit_layer, final = simulate_exits(softmax(outputs), head.recommended_threshold, policy=ENTROPY)
    out = task_metrics(part.kind, final, _targets(part, part.dev), part.positive)
    out["mean_exit_layer"] = float(exit_layer.mean())
    out["measured_speedup"] = measured_speedup(bundle_dir, manifest, encoder, part, head, timing_rows)
    return out


def measured_speedup(bundle_dir: Path, manifest: Manifest, encoder: TextEncoder, part: TaskPart, head: TaskHead,
                     rows: int, batch_size: int = 32, repeats: int = 3) -> float:
    """Full depth's wall time over the recommended setting's, through the served engine (best
    of `repeats`, batches of `batch_size`)."""
    import time

    from app.multitask import MultiTaskEngine, TaskBatch

    engine = MultiTaskEngine(bundle_dir, manifest)
    index = manifest.task_index(part.name)
    inputs = _inputs(part.dev)[:rows]
    batches = [TaskBatch.of(encoder.encode(inputs[i:i + batch_size]), index) for i in range(0, len(inputs), batch_size)]
    code = REGRESSION if part.kind == "regression" else ENTROPY

    def seconds(threshold: float, patience: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for b in batches:
                engine.run(b, threshold, 1, manifest.num_layers, code, patience)
            best = min(best, time.perf_counter() - start)
        return best

    full = seconds(0.0, head.recommended_patience or 0)
    return full / seconds(head.recommended_threshold, head.recommended_patience or 0)
