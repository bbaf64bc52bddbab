"""Every server setting in one place: flags of `offramp serve` and OFFRAMP_* variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OFFRAMP_", protected_namespaces=())

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model_dir: Path = DEFAULT_MODEL_DIR
    default_model: str | None = None  # the only or first bundle when unset
    provider: Literal["cpu", "cuda"] = "cpu"
    intra_op_threads: int | None = Field(default=None, ge=1)  # None: the cgroup CPU quota
    max_inputs: int = Field(default=256, ge=1)  # texts per request
    max_text_chars: int = Field(default=20_000, ge=1)
    log_level: str = "info"
