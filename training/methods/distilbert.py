"""DistilBERT (Sanh et al. 2019), distilled task-specifically: a student of the teacher's width
with half its layers, initialised from every other teacher layer, trained on the teacher's
softened predictions, the labels, and the cosine between last hidden states. See
docs/distillation.md for what differs from the paper (no MLM term).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from training.config import DistillConfig
from training.dataset import Batch
from training import loop
from training.methods import Method
from training.model import EarlyExitModel
from training.task import Task
from training.losses import cosine_embedding, cross_entropy, distillation_kl
from training.students import alternate_layers, classifier_params, last_logits, parse_layer_map, same_width, \
    student_like_teacher
from training.teacher import TeacherCache

log = logging.getLogger(__name__)


@dataclass
class DistilBertConfig(DistillConfig):
    """Sanh et al. 2019: a_ce * T^2 * KL + a_task * CE(labels) + a_cos * cosine(last hidden).
    Student: the teacher's width, half its layers (default), initialised from alternate layers.
    The task CE replaces the paper's MLM term (a_mlm = 2). Teacher last-layer token states are
    cached when they fit in `cache_mb` (fp16), else recomputed per batch."""
    alpha_ce: float = 5.0
    alpha_task: float = 2.0
    alpha_cos: float = 1.0
    temperature: float = 2.0
    cache_mb: int = 2048


def distil_distilbert(teacher: EarlyExitModel, task: Task, cfg: DistilBertConfig) -> EarlyExitModel:
    L = teacher.num_layers
    M = cfg.student_layers or max(1, L // 2)
    same_width(teacher, cfg, "distilbert")
    if not 1 <= M <= L:
        raise ValueError(f"distilbert: student layers must be in 1..{L}, not {M}")
    sources = parse_layer_map(cfg.layer_map, M, L, "distilbert (the layer each student layer is copied from)") \
        or alternate_layers(M, L)
    log.info("distilbert: %d-layer student initialised from teacher layers %s", M, sources)
    student = student_like_teacher(teacher, sources, cfg)
    cache = TeacherCache(teacher, task.train, token_layer=L if cfg.alpha_cos else None, budget_mb=cfg.cache_mb)

    def loss_fn(batch: Batch) -> torch.Tensor:
        logits, states = last_logits(student, batch)
        loss = (cfg.alpha_ce * distillation_kl(cache.logits[batch.index], logits, cfg.temperature)
                + cfg.alpha_task * cross_entropy(logits, batch.labels))
        if cfg.alpha_cos:
            teacher_last = cache.token_states(batch)
            if teacher_last is None:
                with torch.no_grad():
                    teacher_last = teacher.hidden_states(*batch.inputs())[-1]
            loss = loss + cfg.alpha_cos * cosine_embedding(states[-1], teacher_last, batch.attention_mask)
        return loss

    loop.train_phase("distilbert", classifier_params(student), student, task.train, loss_fn, cfg.epochs, cfg.lr, cfg, task)
    return student


METHOD = Method("distilbert", "distill", DistilBertConfig,
                "DistilBERT: half the layers, from alternate teacher layers; soft targets + CE + cosine",
                distil_distilbert)
