"""Task-specific knowledge distillation of an early-exit teacher into a smaller student.

A recipe is its config (training/config.py) + the one training loop (training.loop.train) + the
shared losses (training/losses.py) + the parts that differ: how the student is built and
initialised, which teacher layer each student layer learns from, and the loss of one batch.
Each recipe returns the student with its last classifier trained; `distil` then self-distils
FastBERT exits into it (training/fastbert.py, stage 2, the student as its own teacher), so every
student exports to the same ONNX bundle and serves like any other.

Teacher outputs that do not change are computed once (TeacherCache, looked up by Batch.index):
logits always, the supervised layers' [CLS] states for PKD, and DistilBERT's last-layer token
states when they fit a memory budget. TinyBERT and MobileBERT match full hidden states and
attention maps ([rows, heads, t, t]) of several layers: kept for a whole training set those
would take tens of GB, so they are recomputed per batch under no_grad.

Methods, formulas and what differs from the papers: docs/distillation.md.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from torch import nn

from training import loop
from training.augment import augment_examples
from training.config import (
    DistilBertConfig,
    DistillConfig,
    FastBertConfig,
    MobileBertConfig,
    PkdConfig,
    TinyBertConfig,
)
from training.dataset import Batch, EncodedDataset
from training.fastbert import self_distil_exits
from training.losses import (
    attention_kl,
    attention_score_mse,
    cosine_embedding,
    cross_entropy,
    distillation_kl,
    feature_map_mse,
    hidden_mse,
    normalized_cls_mse,
    soft_cross_entropy,
)
from training.mobilebert import BottleneckConfig, MobileBertBackbone
from training.model import CHECKPOINT_META, EarlyExitModel, backbone_from_config
from training.task import Task

log = logging.getLogger(__name__)


# -- the teacher ------------------------------------------------------------------------------

def load_teacher(directory: Path) -> tuple[EarlyExitModel, dict]:
    """A frozen early-exit checkpoint written by `offramp train fastbert` (its --checkpoint
    folder); its last head is the fine-tuned teacher classifier."""
    directory = Path(directory)
    if not (directory / CHECKPOINT_META).is_file():
        hint = ""
        if (directory / "manifest.json").is_file():
            provenance = json.loads((directory / "manifest.json").read_text()).get("provenance") or {}
            hint = ("; it is an ONNX bundle: pass the checkpoint it was exported from"
                    + (f" ({provenance['checkpoint']})" if provenance.get("checkpoint") else ""))
        raise ValueError(f"{directory}: not an early-exit checkpoint (no {CHECKPOINT_META}); the teacher "
                         f"must be a folder written by `offramp train fastbert --checkpoint DIR`{hint}")
    teacher, meta = EarlyExitModel.load(directory)
    teacher.requires_grad_(False)
    return teacher.eval(), meta


def find_tokenizer(teacher_dir: Path, explicit: Path | None = None) -> Path:
    """--tokenizer (a tokenizer.json or a folder with one), else the teacher folder's."""
    teacher_dir = Path(teacher_dir)
    if explicit is not None:
        explicit = Path(explicit)
        candidates = [explicit / "tokenizer.json" if explicit.is_dir() else explicit]
    else:
        candidates = [teacher_dir / "tokenizer.json", teacher_dir / "tokenizer" / "tokenizer.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ValueError(f"no tokenizer.json at {', '.join(map(str, candidates))}: pass --tokenizer "
                     f"(the teacher's tokenizer.json, e.g. the one in a bundle exported from it)")


class TeacherCache:
    """The frozen teacher's outputs over one dataset, computed once, looked up by Batch.index:
    logits [rows, classes]; optionally the [CLS] states of `cls_layers` (1-based)
    [rows, layers, width]; optionally every token's state at `token_layer`, kept in fp16 when
    they fit `budget_mb` (token_states() then gives None and the caller recomputes)."""

    def __init__(self, teacher: EarlyExitModel, dataset: EncodedDataset, cls_layers: Sequence[int] = (),
                 token_layer: int | None = None, budget_mb: float = 0, batch_size: int = 64):
        width = teacher.config.hidden_size
        lengths = np.array([len(ids) for ids in dataset.ids], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.logits = torch.empty(len(dataset), teacher.num_labels)
        self.cls = torch.empty(len(dataset), len(cls_layers), width) if cls_layers else None
        fits = token_layer is not None and int(lengths.sum()) * width * 2 <= budget_mb * 2 ** 20
        self.tokens = torch.empty(int(lengths.sum()), width, dtype=torch.float16) if fits else None
        teacher.eval()
        with torch.no_grad():
            for batch in tqdm(dataset.batches(batch_size, shuffle=False), desc="teacher outputs",
                              total=dataset.num_batches(batch_size), unit="batch", mininterval=2.0):
                states = teacher.hidden_states(*batch.inputs())
                self.logits[batch.index] = teacher.exit_logits(teacher.num_layers - 1, states[-1],
                                                               batch.attention_mask)
                if self.cls is not None:
                    self.cls[batch.index] = torch.stack([states[l - 1][:, 0] for l in cls_layers], 1)
                if self.tokens is not None:
                    for row, r in enumerate(batch.index.tolist()):
                        start, end = self.offsets[r], self.offsets[r + 1]
                        self.tokens[start:end] = states[token_layer - 1][row, : end - start]

    def token_states(self, batch: Batch) -> torch.Tensor | None:
        if self.tokens is None:
            return None
        out = torch.zeros(*batch.input_ids.shape, self.tokens.size(-1))
        for row, r in enumerate(batch.index.tolist()):
            start, end = self.offsets[r], self.offsets[r + 1]
            out[row, : end - start] = self.tokens[start:end].float()
        return out


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


def train_phase(name: str, params, module: nn.Module, dataset: EncodedDataset,
                loss_fn: Callable[[Batch], torch.Tensor], epochs: float, lr: float,
                cfg: DistillConfig, task: Task, seed_offset: int = 0) -> None:
    """One phase through the shared loop; epochs <= 0 skips it."""
    if epochs > 0:
        loop.train(name, params, module, dataset, loss_fn, epochs, lr, cfg.batch_size, cfg.warmup,
                   cfg.weight_decay, cfg.seed + seed_offset, task.log_file)


def _same_width(teacher: EarlyExitModel, cfg: DistillConfig, method: str) -> None:
    width = teacher.config.hidden_size
    if cfg.student_hidden not in (None, width):
        raise ValueError(f"{method}: the student keeps the teacher's width ({width}), not "
                         f"{cfg.student_hidden}; tinybert and mobilebert students can be narrower")


# -- DistilBERT -------------------------------------------------------------------------------

def distil_distilbert(teacher: EarlyExitModel, task: Task, cfg: DistilBertConfig) -> EarlyExitModel:
    L = teacher.num_layers
    M = cfg.student_layers or max(1, L // 2)
    _same_width(teacher, cfg, "distilbert")
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

    train_phase("distilbert", classifier_params(student), student, task.train, loss_fn, cfg.epochs, cfg.lr, cfg, task)
    return student


# -- Patient KD -------------------------------------------------------------------------------

def distil_pkd(teacher: EarlyExitModel, task: Task, cfg: PkdConfig, variant: str) -> EarlyExitModel:
    L = teacher.num_layers
    k = cfg.student_layers or max(1, L // 2)
    _same_width(teacher, cfg, f"pkd-{variant}")
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

    train_phase(f"pkd-{variant}", classifier_params(student), student, task.train, loss_fn,
                cfg.epochs, cfg.lr, cfg, task)
    return student


# -- TinyBERT ---------------------------------------------------------------------------------

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

    train_phase("tinybert: general distillation", intermediate_params, both, task.distill_data,
                intermediate_loss, cfg.general_epochs, cfg.general_lr, cfg, task, seed_offset=10)
    data = augmented_dataset(teacher, task, cfg) if cfg.aug_copies > 0 else task.train
    train_phase("tinybert: intermediate layers", intermediate_params, both, data, intermediate_loss,
                cfg.intermediate_epochs, cfg.intermediate_lr, cfg, task, seed_offset=20)
    cache = TeacherCache(teacher, data)

    def prediction_loss(batch: Batch) -> torch.Tensor:
        logits, _ = last_logits(student, batch)
        return soft_cross_entropy(cache.logits[batch.index], logits, cfg.temperature)

    train_phase("tinybert: prediction layer", classifier_params(student), student, data, prediction_loss,
                cfg.epochs, cfg.lr, cfg, task, seed_offset=30)
    return student


# -- MobileBERT -------------------------------------------------------------------------------

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

    train_phase(f"mobilebert: transfer block {stage}", params, student, task.distill_data, loss_fn,
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

    train_phase("mobilebert: prediction distillation", classifier_params(student), student, task.train,
                prediction_loss, cfg.epochs, cfg.lr, cfg, task, seed_offset=100)
    return student


# -- every method ------------------------------------------------------------------------------

RECIPES: dict[str, Callable[[EarlyExitModel, Task, DistillConfig], EarlyExitModel]] = {
    "distilbert": distil_distilbert,
    "tinybert": distil_tinybert,
    "pkd-skip": lambda teacher, task, cfg: distil_pkd(teacher, task, cfg, "skip"),
    "pkd-last": lambda teacher, task, cfg: distil_pkd(teacher, task, cfg, "last"),
    "mobilebert": distil_mobilebert,
}


def add_exits(student: EarlyExitModel, task: Task, cfg: DistillConfig) -> None:
    """FastBERT stage 2 on the student: its exits learn from its own (frozen) last classifier."""
    if cfg.exit_epochs > 0:
        self_distil_exits(student, task, FastBertConfig(
            exit_head=cfg.exit_head, head_width=cfg.head_width, batch_size=cfg.batch_size, warmup=cfg.warmup,
            distill_epochs=cfg.exit_epochs, distill_lr=cfg.exit_lr, seed=cfg.seed))


def distil(method: str, teacher: EarlyExitModel, task: Task, cfg: DistillConfig) -> EarlyExitModel:
    """Distil `teacher` into a new student by `method`, then give it FastBERT exits."""
    if method not in RECIPES:
        raise ValueError(f"method must be one of {sorted(RECIPES)}, not {method!r}")
    loop.seed_everything(cfg.seed)
    teacher.eval()
    student = RECIPES[method](teacher, task, cfg)
    add_exits(student, task, cfg)
    return student.eval()
