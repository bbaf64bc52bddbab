"""Recipe configurations: plain dataclasses (no torch), so the CLI can list their options and
TOML recipe files can set them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


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


def config_from(config_cls, values: dict):
    """A recipe config from a dict (a TOML file merged with command-line options)."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {config_cls.__name__} keys: {unknown} (known: {sorted(known)})")
    return config_cls(**values)


# -- distillation recipes (`offramp train distill --method ...`; see docs/distillation.md) ------

@dataclass
class DistillConfig:
    """What every distillation recipe shares: the student's size, the optimiser, the exits.

    `layer_map` is a comma-separated list of 1-based teacher layers, one per student layer that
    learns from a teacher layer (its meaning per method is in docs/distillation.md); empty means
    the method's default mapping. After distillation every student gets FastBERT exits,
    self-distilled from its own last classifier for `exit_epochs` at `exit_lr`."""
    student_layers: int | None = None  # None: the method's default depth
    student_hidden: int | None = None  # None: the method's default width
    max_seq_length: int = 128
    batch_size: int = 32
    epochs: float = 3.0
    lr: float = 5e-5
    warmup: float = 0.1
    weight_decay: float = 0.01
    layer_map: str | None = None
    exit_head: str = "fastbert"
    head_width: int = 128
    exit_epochs: float = 2.0
    exit_lr: float = 2e-4
    dropout: float = 0.1
    seed: int = 42
    limit_train: int | None = None


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


# `offramp train distill --method NAME`: each method's config.
DISTILL_METHODS: dict[str, type[DistillConfig]] = {
    "distilbert": DistilBertConfig,
    "tinybert": TinyBertConfig,
    "pkd-skip": PkdConfig,
    "pkd-last": PkdConfig,
    "mobilebert": MobileBertConfig,
}
