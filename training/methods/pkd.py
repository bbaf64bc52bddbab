"""Patient knowledge distillation (Sun et al. 2019), PKD-Skip and PKD-Last: the student is the
teacher's first k layers; besides the soft predictions, its intermediate [CLS] states learn the
normalised [CLS] states of every L/k-th teacher layer (skip) or of the k-1 below the top (last).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from training import loop
from training.config import DistillConfig
from training.dataset import Batch
from training.methods import Method
from training.model import EarlyExitModel
from training.task import Task
from training.losses import cross_entropy, distillation_kl, normalized_cls_mse
from training.students import classifier_params, last_logits, parse_layer_map, same_width, student_like_teacher
from training.teacher import TeacherCache

log = logging.getLogger(__name__)


@dataclass
class PkdConfig(DistillConfig):
    """Sun et al. 2019 (PKD-Skip / PKD-Last): (1 - a) * CE + a * T^2 * KL + b * normalised [CLS]
    MSE. Student: the teacher's first k layers (k = student_layers, default half).
    lr 1e-5 is the paper's; it is far too low for tiny or short runs (tests set their own)."""
    alpha: float = 0.7
    temperature: float = 10.0
    beta: float = 500.0
    epochs: float = 4.0
    lr: float = 1e-5


def pkd_layer_map(student_layers: int, teacher_layers: int, variant: str) -> list[int]:
    """Teacher layers whose [CLS] states supervise student layers 1..k-1 (the last student
    layer learns from the teacher's predictions). 6 of 12: skip [2, 4, 6, 8, 10] (every
    L/k-th), last [7, 8, 9, 10, 11] (the k-1 below the top)."""
    k, L = student_layers, teacher_layers
    if variant == "skip":
        return [j * L // k for j in range(1, k)]
    if variant == "last":
        return [L - k + j for j in range(1, k)]
    raise ValueError(f"PKD variant must be 'skip' or 'last', not {variant!r}")


def distil_pkd(teacher: EarlyExitModel, task: Task, cfg: PkdConfig, variant: str) -> EarlyExitModel:
    L = teacher.num_layers
    k = cfg.student_layers or max(1, L // 2)
    same_width(teacher, cfg, f"pkd-{variant}")
    if not 1 <= k <= L:
        raise ValueError(f"pkd-{variant}: student layers must be in 1..{L}, not {k}")
    targets = parse_layer_map(cfg.layer_map, k - 1, L, f"pkd-{variant} (student layers 1..k-1)") \
        or pkd_layer_map(k, L, variant)
    log.info("pkd-%s: student = teacher layers 1..%d; [CLS] of its layers 1..%d learn from teacher layers %s",
             variant, k, k - 1, targets)
    student = student_like_teacher(teacher, range(1, k + 1), cfg)
    cache = TeacherCache(teacher, task.train, cls_layers=targets)

    def loss_fn(batch: Batch) -> torch.Tensor:
        logits, states = last_logits(student, batch)
        loss = ((1 - cfg.alpha) * cross_entropy(logits, batch.labels)
                + cfg.alpha * distillation_kl(cache.logits[batch.index], logits, cfg.temperature))
        if targets:
            student_cls = torch.stack([states[j][:, 0] for j in range(k - 1)], 1)
            loss = loss + cfg.beta * normalized_cls_mse(student_cls, cache.cls[batch.index])
        return loss

    loop.train_phase(f"pkd-{variant}", classifier_params(student), student, task.train, loss_fn,
                cfg.epochs, cfg.lr, cfg, task)
    return student


METHODS = (
    Method("pkd-skip", "distill", PkdConfig, "Patient KD, PKD-Skip: teacher layers 1..k; [CLS] of every L/k-th layer",
           lambda teacher, task, cfg: distil_pkd(teacher, task, cfg, "skip")),
    Method("pkd-last", "distill", PkdConfig, "Patient KD, PKD-Last: teacher layers 1..k; [CLS] of the k-1 below the top",
           lambda teacher, task, cfg: distil_pkd(teacher, task, cfg, "last")),
)
