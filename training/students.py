"""What the distillation recipes share: layer mappings between teacher and student, students
built from the teacher's own layers or embeddings, and the per-layer views of a model that the
intermediate-layer losses compare. One file per method (training/methods/) adds the rest.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Sequence

import torch
from torch import nn

from training.config import DistillConfig
from training.dataset import Batch
from training.mobilebert import MobileBertBackbone
from training.model import EarlyExitModel

log = logging.getLogger(__name__)


# -- layer mappings (teacher layers are 1-based; 0 is the embeddings) --------------------------

def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """TinyBERT's g(m) = m * L / M for m = 1..M, rounded down: 4 of 12 -> [3, 6, 9, 12]."""
    return [max(1, m * teacher_layers // student_layers) for m in range(1, student_layers + 1)]


def alternate_layers(student_layers: int, teacher_layers: int) -> list[int]:
    """DistilBERT's initialisation: M teacher layers spread evenly from the first to the last;
    6 of 12 -> [1, 3, 5, 8, 10, 12] (the reference's 0, 2, 4, 7, 9, 11, counted from 0)."""
    if student_layers == 1:
        return [teacher_layers]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [math.floor(i * step + 0.5) + 1 for i in range(student_layers)]


def parse_layer_map(text: str | None, count: int, teacher_layers: int, what: str) -> list[int] | None:
    """--layer-map "3,6,9,12" -> [3, 6, 9, 12], checked; None when not given."""
    if not text:
        return None
    try:
        layers = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        layers = []
    if len(layers) != count or not all(1 <= l <= teacher_layers for l in layers):
        raise ValueError(f"--layer-map {text!r}: {what} needs {count} comma-separated teacher "
                         f"layers in 1..{teacher_layers}")
    return layers


# -- students ---------------------------------------------------------------------------------

def with_heads(backbone: nn.Module, teacher: EarlyExitModel, cfg: DistillConfig,
               sources: Sequence[int] | None = None) -> EarlyExitModel:
    """The backbone with an exit after every layer. Where shapes allow, each head starts as the
    teacher's head on the layer the student layer was copied from (`sources`, 1-based), so a
    student made of teacher layers starts with classifiers already trained on those very states
    (PKD's student = teacher layers 1..k starts at the teacher's layer-k accuracy); otherwise
    only the last classifier starts from the teacher's."""
    student = EarlyExitModel(backbone, teacher.num_labels, cfg.exit_head, cfg.head_width, cfg.dropout,
                             teacher_head=teacher.teacher_head)
    last = len(student.heads) - 1
    candidates = {last: [teacher.num_layers - 1]}
    for i, source in enumerate(sources or ()):
        candidates[i] = [source - 1] + candidates.get(i, [])
    for student_index, teacher_indices in candidates.items():
        target = student.heads[student_index].state_dict()
        for teacher_index in teacher_indices:
            source = teacher.heads[teacher_index].state_dict()
            if source.keys() == target.keys() and all(source[k].shape == target[k].shape for k in source):
                student.heads[student_index].load_state_dict(source)
                break
    return student


def student_like_teacher(teacher: EarlyExitModel, sources: Sequence[int], cfg: DistillConfig) -> EarlyExitModel:
    """The teacher's architecture with len(sources) layers: its embeddings, and as layer i a
    copy of teacher layer sources[i] (1-based)."""
    from transformers import AutoModel

    if getattr(teacher.backbone, "backbone_kind", None):
        raise ValueError("this method copies teacher layers: the teacher must be a transformers encoder")
    config = copy.deepcopy(teacher.backbone.config)
    config.num_hidden_layers = len(sources)
    try:
        backbone = AutoModel.from_config(config, attn_implementation="eager", add_pooling_layer=False)
    except TypeError:  # encoders without a pooler
        backbone = AutoModel.from_config(config, attn_implementation="eager")
    backbone.embeddings.load_state_dict(teacher.backbone.embeddings.state_dict())
    for layer, source in zip(backbone.encoder.layer, sources):
        layer.load_state_dict(teacher.layers[source - 1].state_dict())
    return with_heads(backbone, teacher, cfg, sources)


def principal_directions(table: torch.Tensor, k: int) -> torch.Tensor:
    """[width, k]: the top-k right singular vectors of `table` [rows, width] (the directions that
    keep most of it: table ~ table @ P @ P.T)."""
    table = table.detach().double()
    values, vectors = torch.linalg.eigh(table.T @ table)
    return vectors[:, values.argsort(descending=True)[:k]].float().contiguous()


@torch.no_grad()
def embeddings_from_teacher(student: EarlyExitModel, teacher: EarlyExitModel,
                            embedding_init: str) -> torch.Tensor | None:
    """Not in the papers (their students start from general distillation on a large corpus):
    narrow embeddings initialised from the teacher's through P, the top principal directions of
    its word-embedding table: word rows W_t P; a BERT student's position and token-type rows
    times P as well; a MobileBERT student (embedding output as wide as the teacher) copies those
    and its trigram projection starts as [0, P, 0], so its embeddings start near the teacher's.
    Returns P [teacher width, student embedding width], or None when not applied."""
    if embedding_init == "random":
        return None
    if embedding_init != "teacher":
        raise ValueError(f"embedding_init must be 'teacher' or 'random', not {embedding_init!r}")
    if getattr(teacher.backbone, "backbone_kind", None):
        log.info("teacher embeddings are not BERT's: random initialisation")
        return None
    source, target = teacher.backbone.embeddings, student.backbone.embeddings
    narrow = target.word_embeddings.weight.size(1)
    if narrow > source.word_embeddings.weight.size(1):
        log.info("student embeddings wider than the teacher's: random initialisation")
        return None
    P = principal_directions(source.word_embeddings.weight, narrow)
    target.word_embeddings.weight.copy_(source.word_embeddings.weight @ P)
    if isinstance(student.backbone, MobileBertBackbone):
        target.position_embeddings.weight.copy_(source.position_embeddings.weight)
        target.token_type_embeddings.weight.copy_(source.token_type_embeddings.weight)
        target.trigram.weight.zero_()
        target.trigram.weight[:, narrow:2 * narrow].copy_(P)
    else:
        target.position_embeddings.weight.copy_(source.position_embeddings.weight @ P)
        target.token_type_embeddings.weight.copy_(source.token_type_embeddings.weight @ P)
    return P


def layer_states(model: EarlyExitModel, batch: Batch, upto: int | None = None) -> list[torch.Tensor]:
    """[embeddings, output of layer 1, ..., of layer `upto` (default: all)]: index m is layer m."""
    hidden = model.embed(*batch.inputs())
    states = [hidden]
    for index in range(model.num_layers if upto is None else upto):
        hidden = model.run_layer(index, hidden, batch.attention_mask)
        states.append(hidden)
    return states


def attention_scores(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A layer's pre-softmax attention scores q k^T / sqrt(d), [rows, heads, t, t], computed from
    its own query and key projections of its input `hidden` (no mask added)."""
    if hasattr(layer, "attention_scores"):  # MobileBERT blocks
        return layer.attention_scores(hidden)
    attn = layer.attention.self  # BERT-family layer

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(*hidden.shape[:2], attn.num_attention_heads, attn.attention_head_size).transpose(1, 2)

    return split(attn.query(hidden)) @ split(attn.key(hidden)).transpose(-1, -2) * attn.attention_head_size ** -0.5


def classifier_params(student: EarlyExitModel) -> list[nn.Parameter]:
    """Backbone + last classifier: what distillation trains (the exits come afterwards)."""
    return list(student.backbone.parameters()) + list(student.heads[-1].parameters())


def last_logits(student: EarlyExitModel, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    states = student.hidden_states(*batch.inputs())
    return student.exit_logits(student.num_layers - 1, states[-1], batch.attention_mask), states


def same_width(teacher: EarlyExitModel, cfg: DistillConfig, method: str) -> None:
    width = teacher.config.hidden_size
    if cfg.student_hidden not in (None, width):
        raise ValueError(f"{method}: the student keeps the teacher's width ({width}), not "
                         f"{cfg.student_hidden}; tinybert and mobilebert students can be narrower")
