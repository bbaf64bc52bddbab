"""FastBERT (Liu et al. 2020): fine-tune backbone + teacher classifier, then self-distil the exits.

Stage 1 trains the backbone and the last layer's classifier with cross-entropy on labels.
With `joint_exits` > 0 it trains every exit with them (the joint training of PABEE and
ElasticBERT): the loss adds joint_exits x the mean cross-entropy of the exits before the last, so
the early layers learn to carry the answer instead of only passing features on.
Stage 2 freezes both and trains every other exit with sum_i KL(p_teacher || p_exit_i); it needs
no labels, so extra unlabeled text of the domain can join the training text.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from training import loop
from training.losses import cross_entropy, joint_exits_cross_entropy, self_distillation
from training.methods import Method
from training.model import EarlyExitModel, load_backbone
from training.task import Task

log = logging.getLogger(__name__)


@dataclass
class FastBertConfig:
    exit_head: str = "fastbert"
    head_width: int = 128
    max_seq_length: int = 128
    batch_size: int = 32
    epochs: float = 2.0  # stage 1 (fine-tuning); 0 skips it, with --from-checkpoint
    lr: float = 2e-5
    warmup: float = 0.1
    weight_decay: float = 0.01
    distill_epochs: float = 2.0
    distill_lr: float = 2e-4
    dropout: float = 0.1
    seed: int = 42
    limit_train: int | None = None  # use only the first N training rows (quick runs)
    # Stage 1 also trains the exits: loss = CE(last) + joint_exits * mean_i CE(exit i); 0 = FastBERT.
    joint_exits: float = 0.0


def train_fastbert(task: Task, cfg: FastBertConfig, model: EarlyExitModel | None = None) -> EarlyExitModel:
    """Both FastBERT stages on `task`; returns the trained model (in eval mode).

    Given a fine-tuned `model` (from a checkpoint) and epochs = 0, only the exits are trained,
    which is how exit-head shapes are compared on one frozen backbone."""
    loop.seed_everything(cfg.seed)
    if model is None:
        model = EarlyExitModel(load_backbone(task.teacher), len(task.labels), cfg.exit_head,
                               cfg.head_width, cfg.dropout)
    elif model.exit_head != cfg.exit_head:
        model.replace_exits(cfg.exit_head)
    if cfg.epochs > 0:
        fine_tune(model, task, cfg)
    self_distil_exits(model, task, cfg)
    return model.eval()


def fine_tune(model: EarlyExitModel, task: Task, cfg: FastBertConfig) -> None:
    """Stage 1: backbone + teacher classifier (and, jointly, the exits), cross-entropy on labels."""
    if cfg.joint_exits < 0:
        raise ValueError(f"joint_exits must be >= 0, not {cfg.joint_exits}")
    joint = cfg.joint_exits > 0 and model.num_layers > 1
    heads = model.heads if joint else model.heads[-1:]

    def fine_tune_loss(batch):
        states = model.hidden_states(*batch.inputs())
        last = model.num_layers - 1
        loss = cross_entropy(model.exit_logits(last, states[-1], batch.attention_mask), batch.labels)
        if joint:
            loss = loss + cfg.joint_exits * joint_exit_loss(model, states, batch)
        return loss

    start = time.perf_counter()
    done = loop.train(
        "stage 1: fine-tune" + (" with joint exits" if joint else ""),
        list(model.backbone.parameters()) + [p for head in heads for p in head.parameters()],
        model, task.train, fine_tune_loss, cfg.epochs, cfg.lr, cfg.batch_size, cfg.warmup,
        cfg.weight_decay, cfg.seed, task.log_file, runtime=task.runtime,
    )
    if done:  # not when a resumed run skipped it
        log.info("stage 1 done in %.0fs; teacher dev accuracy %.4f",
                 time.perf_counter() - start, loop.layer_accuracy(model, task.dev, task.runtime)[-1])


def joint_exit_loss(model: EarlyExitModel, states, batch) -> torch.Tensor:
    """Mean cross-entropy on labels of the exits before the last."""
    return joint_exits_cross_entropy([model.exit_logits(i, h, batch.attention_mask)
                                      for i, h in enumerate(states[:model.num_layers - 1])], batch.labels)


def self_distil_exits(model: EarlyExitModel, task: Task, cfg: FastBertConfig) -> None:
    """Stage 2: train exits 1..L-1 towards the (frozen) teacher classifier."""
    for p in list(model.backbone.parameters()) + list(model.heads[-1].parameters()):
        p.requires_grad_(False)
    exits = [p for head in model.heads[:-1] for p in head.parameters()]

    def distil_loss(batch):
        with torch.no_grad():
            model.backbone.eval()
            states = model.hidden_states(*batch.inputs())
            teacher = model.heads[-1](states[-1], batch.attention_mask)
        logits = [model.exit_logits(i, h, batch.attention_mask) for i, h in enumerate(states[:-1])]
        return self_distillation(teacher, logits)

    if exits:
        loop.train("stage 2: self-distil exits", exits, model, task.distill_data, distil_loss,
                   cfg.distill_epochs, cfg.distill_lr, cfg.batch_size, cfg.warmup, 0.0,
                   cfg.seed + 1, task.log_file, runtime=task.runtime)
    for p in model.parameters():
        p.requires_grad_(True)


METHOD = Method("fastbert", "fastbert", FastBertConfig,
                "FastBERT: fine-tune, then self-distil an exit after every layer", train_fastbert)
