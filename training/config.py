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
