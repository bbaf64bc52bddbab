"""TinyBERT (Jiao et al. 2020), task distillation: a narrower, shallower student learns the
teacher's embeddings, attention scores and hidden states layer by layer (through a learnt
projection), on augmented data, then its predictions; optionally general distillation first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

import torch

from training import loop
from training.config import DistillConfig
from training.dataset import Batch
from training.methods import Method
from training.model import EarlyExitModel
from training.task import Task
from training.augment import augment_examples
from training.dataset import EncodedDataset
from training.losses import attention_score_mse, hidden_mse, soft_cross_entropy
from training.model import backbone_from_config
from training.students import (attention_scores, classifier_params, embeddings_from_teacher, last_logits,
                               layer_states, parse_layer_map, uniform_layer_map, with_heads)
from training.teacher import TeacherCache

log = logging.getLogger(__name__)


@dataclass
class TinyBertConfig(DistillConfig):
    """Jiao et al. 2020: optional general distillation (attention + hidden on unlabeled text),
    then task distillation on augmented data: intermediate layers (attention-score MSE, hidden
    MSE through a learnt projection, embedding MSE), then the prediction layer (soft CE, T)."""
    student_layers: int | None = 4
    student_hidden: int | None = 312
    student_heads: int | None = None  # None: the teacher's; different counts match head-averaged
    student_intermediate: int | None = None  # None: 4 x student_hidden
    temperature: float = 1.0
    general_epochs: float = 0.0  # > 0: general distillation on the training + --unlabeled text
    general_lr: float = 1e-4
    intermediate_epochs: float = 10.0
    intermediate_lr: float = 5e-5
    epochs: float = 3.0  # prediction-layer distillation
    lr: float = 3e-5
    embedding_init: str = "teacher"  # "teacher" (principal directions, see docs) or "random"
    aug_copies: int = 20  # N augmented copies per example (0: no augmentation)
    aug_p: float = 0.4
    aug_k: int = 15


def tinybert_student(teacher: EarlyExitModel, cfg: TinyBertConfig) -> EarlyExitModel:
    t = teacher.config
    layers = cfg.student_layers or max(1, teacher.num_layers // 3)
    width = cfg.student_hidden or t.hidden_size
    heads = cfg.student_heads or t.num_attention_heads
    if width % heads:
        raise ValueError(f"tinybert: student width {width} is not a multiple of {heads} attention heads"
                         f"{' (the teacher count)' if not cfg.student_heads else ''}: pass --student-heads "
                         f"(attention is then matched head-averaged) or a width that {heads} divides")
    backbone = backbone_from_config(
        vocab_size=t.vocab_size, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=cfg.student_intermediate or 4 * width,
        max_position_embeddings=t.max_position_embeddings, type_vocab_size=t.type_vocab_size,
        pad_token_id=t.pad_token_id)
    return with_heads(backbone, teacher, cfg)


def augmented_dataset(teacher: EarlyExitModel, task: Task, cfg: TinyBertConfig) -> EncodedDataset:
    examples = augment_examples(task.train.examples, task.encoder.tokenizer,
                                teacher.backbone.embeddings.word_embeddings.weight,
                                cfg.aug_copies, cfg.aug_p, cfg.aug_k, cfg.seed)
    log.info("tinybert: %d training rows augmented to %d (teacher-labelled)", len(task.train), len(examples))
    return EncodedDataset(examples, task.encoder, task.source_labels)


def distil_tinybert(teacher: EarlyExitModel, task: Task, cfg: TinyBertConfig) -> EarlyExitModel:
    torch.manual_seed(cfg.seed)
    student = tinybert_student(teacher, cfg)
    M, L = student.num_layers, teacher.num_layers
    g = parse_layer_map(cfg.layer_map, M, L, "tinybert (g(m) for m = 1..M)") or uniform_layer_map(M, L)
    log.info("tinybert: %d layers x %d wide; g(m) = %s", M, student.config.hidden_size, g)
    # W_h: student width -> teacher width, shared by the embeddings (as the reference's fit_dense);
    # used for training only, not part of the student.
    projection = nn.Linear(student.config.hidden_size, teacher.config.hidden_size)
    P = embeddings_from_teacher(student, teacher, cfg.embedding_init)
    if P is not None:  # W_h starts as P: the student's directions mapped back to the teacher's
        with torch.no_grad():
            projection.weight.copy_(P)
            projection.bias.zero_()
    both = nn.ModuleList([student, projection])
    intermediate_params = list(student.backbone.parameters()) + list(projection.parameters())

    def intermediate_loss(batch: Batch) -> torch.Tensor:
        mask = batch.attention_mask
        s = layer_states(student, batch)
        with torch.no_grad():
            t = layer_states(teacher, batch, upto=max(g))
        loss = hidden_mse(projection(s[0]), t[0], mask)  # embedding layer (m = 0)
        for m, gm in enumerate(g, 1):
            s_scores = attention_scores(student.layers[m - 1], s[m - 1])
            with torch.no_grad():
                t_scores = attention_scores(teacher.layers[gm - 1], t[gm - 1])
            if s_scores.size(1) != t_scores.size(1):  # different head counts: compare head averages
                s_scores, t_scores = s_scores.mean(1, keepdim=True), t_scores.mean(1, keepdim=True)
            loss = loss + attention_score_mse(s_scores, t_scores, mask) + hidden_mse(projection(s[m]), t[gm], mask)
        return loss

    loop.train_phase("tinybert: general distillation", intermediate_params, both, task.distill_data,
                intermediate_loss, cfg.general_epochs, cfg.general_lr, cfg, task, seed_offset=10)
    data = augmented_dataset(teacher, task, cfg) if cfg.aug_copies > 0 else task.train
    loop.train_phase("tinybert: intermediate layers", intermediate_params, both, data, intermediate_loss,
                cfg.intermediate_epochs, cfg.intermediate_lr, cfg, task, seed_offset=20)
    cache = TeacherCache(teacher, data)

    def prediction_loss(batch: Batch) -> torch.Tensor:
        logits, _ = last_logits(student, batch)
        return soft_cross_entropy(cache.logits[batch.index], logits, cfg.temperature)

    loop.train_phase("tinybert: prediction layer", classifier_params(student), student, data, prediction_loss,
                cfg.epochs, cfg.lr, cfg, task, seed_offset=30)
    return student


METHOD = Method("tinybert", "distill", TinyBertConfig,
                "TinyBERT: narrower and shallower; embeddings, attention and hidden states layer by layer, "
                "on augmented data, then predictions", distil_tinybert)
