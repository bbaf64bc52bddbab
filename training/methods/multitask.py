"""MT-DNN with knowledge distillation (Liu et al. 2019), with FastBERT exits for every task.

1. Teachers: for each task an ensemble of K single-task models fine-tuned from the encoder with
   seeds seed .. seed + K - 1 (or given as checkpoints). Their averaged class probabilities
   (regression: averaged score) on the task's training rows are the soft targets, computed once
   per member and kept beside it.
2. Student: one shared encoder, one classifier per task; mini-batches drawn task by task in
   proportion to task size; loss per task the average of CE(hard labels) and CE(soft targets)
   (MSE for regression), a task without a teacher its plain loss. With `joint_exits` W > 0 the
   task's exits train with it (PABEE / ElasticBERT joint training, as `train fastbert
   --joint-exits`): loss = L(last) + W x mean_i L(exit i), the same loss at every exit.
3. Exits: each task's exits self-distilled from its own (frozen) classifier, FastBERT's stage 2.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from training import loop
from training.glue_metrics import task_metrics
from training.losses import (cross_entropy, mtdnn_kd_classification, mtdnn_kd_regression,
                             score_self_distillation, self_distillation)
from training.model import EarlyExitModel, load_backbone, make_head
from training.multitask_data import MultiTaskDataset, TaskPart
from training.multitask_model import MultiTaskModel
from training.runtime import Runtime

log = logging.getLogger("offramp.train")

MEMBER_META = "member.json"
TRAIN_OUTPUTS = "train_outputs.npy"


@dataclass
class MultiTaskConfig:
    exit_head: str = "fastbert"
    head_width: int = 128
    max_seq_length: int = 128
    batch_size: int = 32
    epochs: float = 3.0  # the multi-task student
    joint_exits: float = 0.0  # student loss + joint_exits x the mean loss of the exits; 0 = last only
    lr: float = 5e-5
    warmup: float = 0.1
    weight_decay: float = 0.01
    distill_epochs: float = 2.0  # every task's exits
    distill_lr: float = 5e-4
    dropout: float = 0.1
    seed: int = 42
    ensemble_size: int = 3  # teachers per task; 0: the multi-task student without distillation
    teacher_epochs: float = 3.0
    teacher_lr: float = 5e-5
    limit_train: int | None = None  # the first N rows of each task's training file (quick runs)


class OneTask(nn.Module):
    """A multi-task model seen as one task's early-exit model (what loop.layer_logits takes)."""

    def __init__(self, model: MultiTaskModel, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids, attention_mask, token_type_ids, self.task)


def outputs_to_targets(part: TaskPart, logits: np.ndarray) -> np.ndarray:
    """What a model's last-layer logits give as a soft target: probabilities, or the score."""
    if part.kind == "regression":
        return logits[:, 0].astype(np.float32)
    z = logits - logits.max(axis=-1, keepdims=True)
    return (np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)).astype(np.float32)


def evaluate(model: nn.Module, part: TaskPart, runtime: Runtime | None = None) -> list[dict[str, float]]:
    """Every GLUE metric of the task at every exit, on its dev rows."""
    logits = loop.layer_logits(model, part.dev, runtime=runtime)
    targets = part.dev.targets if part.kind == "regression" else part.dev.labels
    return [task_metrics(part.kind, layer, targets, part.positive) for layer in logits]


# -- 1. the teacher ensembles -------------------------------------------------------------------
def fine_tune_single(part: TaskPart, encoder: str, cfg: MultiTaskConfig, seed: int, runtime: Runtime | None,
                     log_file: Path | None) -> EarlyExitModel:
    """A single-task model fine-tuned from the encoder (its last head; the exits are unused)."""
    loop.seed_everything(seed)
    model = EarlyExitModel(load_backbone(encoder), part.width, cfg.exit_head, cfg.head_width, cfg.dropout)
    last = model.num_layers - 1

    def loss(batch):
        out = model.exit_logits(last, model.hidden_states(*batch.inputs())[-1], batch.attention_mask)
        if part.kind == "regression":
            return mtdnn_kd_regression(out, batch.labels, None)
        return cross_entropy(out, batch.labels)

    loop.train(f"teacher {part.name} seed {seed}", list(model.backbone.parameters()) + list(model.heads[-1].parameters()),
               model, part.train, loss, cfg.teacher_epochs, cfg.teacher_lr, cfg.batch_size, cfg.warmup,
               cfg.weight_decay, seed, log_file, runtime=runtime)
    return model.eval()


def member_outputs(member: Path, part: TaskPart, runtime: Runtime | None) -> np.ndarray:
    """A member's soft targets on the task's training rows, computed once and kept beside it
    (keyed by the training rows, so another split or limit recomputes them)."""
    key = {"train": part.records["train"].model_dump(), "rows": len(part.train)}
    cache, meta_file = member / TRAIN_OUTPUTS, member / "train_outputs.json"
    if cache.is_file() and meta_file.is_file() and json.loads(meta_file.read_text()) == key:
        return np.load(cache)
    model, _ = EarlyExitModel.load(member)
    logits = loop.layer_logits(_LastOnly(model), part.train, runtime=runtime)[-1]
    outputs = outputs_to_targets(part, logits)
    if runtime is None or runtime.is_main:
        np.save(cache, outputs)
        meta_file.write_text(json.dumps(key))
    return outputs


class _LastOnly(nn.Module):
    """The last exit alone (soft targets need no other)."""

    def __init__(self, model: EarlyExitModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        m = self.model
        return [m.exit_logits(m.num_layers - 1, m.hidden_states(input_ids, attention_mask, token_type_ids)[-1],
                              attention_mask)]


@dataclass
class Ensemble:
    members: list[Path]
    dev: list[dict[str, float]]  # each member's dev metrics (the single-task models)
    dev_ensemble: dict[str, float]  # the averaged members' dev metrics
    soft_targets: np.ndarray  # [train rows, classes] probabilities, or [train rows] scores


def build_ensemble(part: TaskPart, encoder: str, cfg: MultiTaskConfig, directory: Path,
                   given: Sequence[Path] = (), runtime: Runtime | None = None) -> Ensemble:
    """The task's K members (`given`, else trained into directory/seedS, a finished member
    reused on a rerun), their dev metrics, and the averaged soft targets."""
    members = [Path(p) for p in given]
    for seed in ([] if given else range(cfg.seed, cfg.seed + cfg.ensemble_size)):
        member = directory / part.name / f"seed{seed}"
        if not (member / MEMBER_META).is_file():
            start = time.perf_counter()
            model = fine_tune_single(part, encoder, cfg, seed, runtime, None)
            if runtime is None or runtime.is_main:
                model.cpu().save(member, {"task": part.name, "kind": part.kind, "labels": part.labels,
                                          "source_labels": part.source_labels, "seed": seed})
                metrics = evaluate(model, part)[-1]
                (member / MEMBER_META).write_text(json.dumps({"seed": seed, "dev": metrics,
                                                             "wall_time_s": round(time.perf_counter() - start, 1)}))
                log.info("teacher %s seed %d: dev %s", part.name, seed, _show(metrics))
            if runtime is not None:
                runtime.accelerator.wait_for_everyone()
        members.append(member)
    dev, dev_outputs, train_outputs = [], [], []
    for member in members:
        model, meta = EarlyExitModel.load(member)
        if meta.get("kind", part.kind) != part.kind or model.num_labels != part.width:
            raise ValueError(f"{member}: a {meta.get('kind')} model of {model.num_labels} outputs, not task "
                             f"{part.name}'s ({part.kind}, {part.width})")
        logits = loop.layer_logits(_LastOnly(model), part.dev, runtime=runtime)[-1]
        dev_outputs.append(outputs_to_targets(part, logits))
        dev.append(_metrics(part, dev_outputs[-1]))
        train_outputs.append(member_outputs(member, part, runtime))
    averaged = np.mean(dev_outputs, axis=0)
    ensemble = Ensemble(members, dev, _metrics(part, averaged), np.mean(train_outputs, axis=0).astype(np.float32))
    log.info("task %s: %d teachers, dev each %s; ensemble %s", part.name, len(members),
             "; ".join(_show(d) for d in dev), _show(ensemble.dev_ensemble))
    return ensemble


def _metrics(part: TaskPart, outputs: np.ndarray) -> dict[str, float]:
    targets = part.dev.targets if part.kind == "regression" else part.dev.labels
    return task_metrics(part.kind, outputs, targets, part.positive)


def _show(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


# -- 2. the multi-task student, 3. its exits ----------------------------------------------------
def train_student(parts: Sequence[TaskPart], encoder: str, cfg: MultiTaskConfig,
                  soft_targets: dict[str, np.ndarray], runtime: Runtime | None = None,
                  log_file: Path | None = None) -> MultiTaskModel:
    """The shared encoder and every task's classifier on all tasks' batches, then the exits."""
    loop.seed_everything(cfg.seed)
    model = MultiTaskModel(load_backbone(encoder), [(p.name, p.width) for p in parts], cfg.exit_head,
                           cfg.head_width, cfg.dropout)
    device = runtime.device if runtime is not None else torch.device("cpu")
    targets = {name: torch.from_numpy(t).to(device) for name, t in soft_targets.items()}
    data = MultiTaskDataset([p.train for p in parts])
    last = model.num_layers - 1
    if cfg.joint_exits < 0:
        raise ValueError(f"joint_exits must be >= 0, not {cfg.joint_exits}")
    joint = cfg.joint_exits > 0 and last > 0

    def student_loss(batch):
        part = parts[batch.task]
        teacher = targets[part.name][batch.index.to(device)] if part.name in targets else None
        return student_task_loss(model, part, model.hidden_states(*batch.inputs()), batch, teacher, cfg.joint_exits)

    classifiers = [p for part in parts
                   for head in (model.task_heads[part.name] if joint else [model.last_head(part.name)])
                   for p in head.parameters()]
    loop.train("multi-task student", list(model.backbone.parameters()) + classifiers, model, data, student_loss,
               cfg.epochs, cfg.lr, cfg.batch_size, cfg.warmup, cfg.weight_decay, cfg.seed, log_file, runtime=runtime)
    self_distil_task_exits(model, parts, cfg, runtime, log_file)
    return model.eval()


def student_task_loss(model: MultiTaskModel, part: TaskPart, states: Sequence[torch.Tensor], batch,
                      teacher: torch.Tensor | None, joint_exits: float = 0.0) -> torch.Tensor:
    """MT-DNN-KD's loss L at the task's last classifier, plus joint_exits x the mean of the same
    L at each of its exits below the last (0: the last alone)."""
    task_loss = mtdnn_kd_regression if part.kind == "regression" else mtdnn_kd_classification

    def at(layer: int) -> torch.Tensor:
        return task_loss(model.task_logits(part.name, layer, states[layer], batch.attention_mask),
                         batch.labels, teacher)

    last = len(states) - 1
    if joint_exits == 0 or last == 0:
        return at(last)
    return at(last) + joint_exits * torch.stack([at(i) for i in range(last)]).mean()


def retrain_exits(checkpoint: Path, parts: Sequence[TaskPart], cfg: MultiTaskConfig,
                  runtime: Runtime | None = None, log_file: Path | None = None) -> tuple[MultiTaskModel, dict]:
    """A finished student's encoder and classifiers from `checkpoint`, its exits made afresh
    (seeded, the same initialisation for every rerun) and self-distilled with this config's
    distill options: exit training tried without training the student again."""
    model, meta = MultiTaskModel.load(checkpoint)
    wanted = [(p.name, p.width) for p in parts]
    if [tuple(t) for t in model.tasks] != wanted:
        raise ValueError(f"{checkpoint}: a student of tasks {[tuple(t) for t in model.tasks]}, not {wanted}")
    if model.exit_head != cfg.exit_head or model.head_width != cfg.head_width:
        raise ValueError(f"{checkpoint}: exit heads {model.exit_head}/{model.head_width}, not "
                         f"{cfg.exit_head}/{cfg.head_width}")
    files = {p.name: {"train": p.records["train"].sha256, "dev": p.records["dev"].sha256} for p in parts}
    trained_on = (meta.get("recipe") or {}).get("tasks")
    if trained_on is not None and trained_on != files:
        raise ValueError("its student was trained on other task files than these (compare the sha256 in its "
                         "multitask.json recipe)")
    torch.manual_seed(cfg.seed + 2)
    hidden = model.config.hidden_size
    for name, width in model.tasks:
        heads = model.task_heads[name]
        for i in range(len(heads) - 1):
            heads[i] = make_head(cfg.exit_head, hidden, width, cfg.head_width, cfg.dropout)
    model.train()
    self_distil_task_exits(model, parts, cfg, runtime, log_file)
    return model.eval(), meta


def self_distil_task_exits(model: MultiTaskModel, parts: Sequence[TaskPart], cfg: MultiTaskConfig,
                           runtime: Runtime | None, log_file: Path | None) -> None:
    """Every task's exits 1..L-1 learn from its own frozen last head, on that task's batches."""
    frozen = list(model.backbone.parameters()) + [p for part in parts for p in model.last_head(part.name).parameters()]
    for p in frozen:
        p.requires_grad_(False)
    exits = [p for part in parts for head in model.task_heads[part.name][:-1] for p in head.parameters()]

    def exit_loss(batch):
        part = parts[batch.task]
        with torch.no_grad():
            model.backbone.eval()
            states = model.hidden_states(*batch.inputs())
            teacher = model.last_head(part.name)(states[-1], batch.attention_mask)
        outs = [model.task_logits(part.name, i, h, batch.attention_mask) for i, h in enumerate(states[:-1])]
        return score_self_distillation(teacher, outs) if part.kind == "regression" else self_distillation(teacher, outs)

    if exits and cfg.distill_epochs > 0:
        loop.train("self-distil every task's exits", exits, model, MultiTaskDataset([p.train for p in parts]),
                   exit_loss, cfg.distill_epochs, cfg.distill_lr, cfg.batch_size, cfg.warmup, 0.0, cfg.seed + 1,
                   log_file, runtime=runtime)
    for p in model.parameters():
        p.requires_grad_(True)
