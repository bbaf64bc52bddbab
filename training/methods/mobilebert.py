"""MobileBERT (Sun et al. 2020): a bottleneck student as deep as the teacher (training/mobilebert.py),
trained block by block (progressive knowledge transfer of feature maps and attention), then on
the teacher's predictions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from training import loop
from training.config import DistillConfig
from training.dataset import Batch
from training.methods import Method
from training.model import EarlyExitModel
from training.task import Task
from training.losses import attention_kl, cross_entropy, distillation_kl, feature_map_mse
from training.mobilebert import BottleneckConfig, MobileBertBackbone
from training.students import (attention_scores, classifier_params, embeddings_from_teacher, last_logits,
                               layer_states, parse_layer_map, uniform_layer_map, with_heads)
from training.teacher import TeacherCache

log = logging.getLogger(__name__)


@dataclass
class MobileBertConfig(DistillConfig):
    """Sun et al. 2020: a bottleneck student (inter-block width = the teacher's, `student_hidden`
    = intra-block width), trained block by block (progressive knowledge transfer: feature-map
    MSE x fmt_weight + attention KL x at_weight, lower blocks frozen), then prediction
    distillation alpha * T^2 * KL + (1 - alpha) * CE."""
    student_layers: int | None = None  # None: as many blocks as the teacher has layers
    student_hidden: int | None = None  # intra-block width; None: teacher width / 4
    num_ffn: int = 4  # stacked feed-forward networks per block
    ffn_size: int | None = None  # None: 4 x intra-block width
    embedding_size: int | None = None  # trigram word embedding width; None: intra-block width
    norm: str = "nonorm"  # "nonorm" (g * h + b) or "layernorm"
    activation: str = "relu"  # "relu" or "gelu"
    embedding_init: str = "teacher"  # "teacher" (principal directions, see docs) or "random"
    fmt_weight: float = 100.0
    at_weight: float = 1.0
    stage_epochs: float = 1.0  # per progressive stage (one more block each)
    stage_lr: float = 5e-4
    alpha: float = 0.5  # prediction distillation: share of the KD term
    temperature: float = 1.0
    lr: float = 5e-5


def mobilebert_student(teacher: EarlyExitModel, cfg: MobileBertConfig) -> EarlyExitModel:
    t = teacher.config
    intra = cfg.student_hidden or t.hidden_size // 4
    heads = t.num_attention_heads
    if intra % heads:
        raise ValueError(f"mobilebert: intra-block width {intra} is not a multiple of the teacher's {heads} "
                         f"attention heads (the student's attention maps are matched to them one to one)")
    backbone = MobileBertBackbone(BottleneckConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intra_size=intra,
        num_hidden_layers=cfg.student_layers or teacher.num_layers, num_attention_heads=heads,
        num_ffn=cfg.num_ffn, ffn_size=cfg.ffn_size or 4 * intra, embedding_size=cfg.embedding_size or intra,
        max_position_embeddings=t.max_position_embeddings, type_vocab_size=t.type_vocab_size,
        pad_token_id=t.pad_token_id or 0, norm=cfg.norm, activation=cfg.activation, dropout=cfg.dropout))
    return with_heads(backbone, teacher, cfg)


def transfer_stage(student: EarlyExitModel, teacher: EarlyExitModel, task: Task, cfg: MobileBertConfig,
                   g: Sequence[int], stage: int) -> None:
    """Progressive knowledge transfer, stage `stage` (1-based): block `stage` (and, at stage 1, the
    embeddings) learns teacher layer g(stage)'s output (feature-map MSE) and attention maps
    (KL); the blocks below are frozen (eval mode, no gradients), those above are not run."""
    block, target = student.layers[stage - 1], g[stage - 1]
    params = list(block.parameters())
    if stage == 1:
        params += list(student.backbone.embeddings.parameters())

    def loss_fn(batch: Batch) -> torch.Tensor:
        mask = batch.attention_mask
        if stage == 1:
            hidden = student.embed(*batch.inputs())
        else:
            with torch.no_grad():
                student.backbone.embeddings.eval()
                for frozen in student.layers[: stage - 1]:
                    frozen.eval()
                hidden = layer_states(student, batch, upto=stage - 1)[-1]
        out = student.run_layer(stage - 1, hidden, mask)
        s_scores = attention_scores(block, hidden)
        with torch.no_grad():
            t = layer_states(teacher, batch, upto=target)
            t_scores = attention_scores(teacher.layers[target - 1], t[target - 1])
        return (cfg.fmt_weight * feature_map_mse(out, t[target], mask)
                + cfg.at_weight * attention_kl(t_scores, s_scores, mask))

    loop.train_phase(f"mobilebert: transfer block {stage}", params, student, task.distill_data, loss_fn,
                cfg.stage_epochs, cfg.stage_lr, cfg, task, seed_offset=stage)


def distil_mobilebert(teacher: EarlyExitModel, task: Task, cfg: MobileBertConfig) -> EarlyExitModel:
    torch.manual_seed(cfg.seed)
    student = mobilebert_student(teacher, cfg)
    embeddings_from_teacher(student, teacher, cfg.embedding_init)
    M, L = student.num_layers, teacher.num_layers
    g = parse_layer_map(cfg.layer_map, M, L, "mobilebert (the teacher layer of each block)") or uniform_layer_map(M, L)
    log.info("mobilebert: %d blocks, %d wide between, %d inside; block m learns teacher layer %s",
             M, student.config.hidden_size, student.config.intra_size, g)
    for stage in range(1, M + 1):
        transfer_stage(student, teacher, task, cfg, g, stage)
    cache = TeacherCache(teacher, task.train)

    def prediction_loss(batch: Batch) -> torch.Tensor:
        logits, _ = last_logits(student, batch)
        return (cfg.alpha * distillation_kl(cache.logits[batch.index], logits, cfg.temperature)
                + (1 - cfg.alpha) * cross_entropy(logits, batch.labels))

    loop.train_phase("mobilebert: prediction distillation", classifier_params(student), student, task.train,
                prediction_loss, cfg.epochs, cfg.lr, cfg, task, seed_offset=100)
    return student


METHOD = Method("mobilebert", "distill", MobileBertConfig,
                "MobileBERT: a bottleneck student, block-by-block transfer, then predictions", distil_mobilebert)
