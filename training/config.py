"""Recipe configurations: what every distillation method shares (each method's own options
live in its file under training/methods/), and reading a config from a TOML recipe + flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


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


_MOVED = {"FastBertConfig": "fastbert", "DistilBertConfig": "distilbert", "PkdConfig": "pkd",
          "TinyBertConfig": "tinybert", "MobileBertConfig": "mobilebert"}


def __getattr__(name: str):
    """Each method's config now lives in its file under training/methods/; the old import path
    `from training.config import TinyBertConfig` still works."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"training.methods.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
