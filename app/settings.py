"""Every server setting in one place: flags of `offramp serve` and OFFRAMP_* variables.
docs/serving.md is the reference; each field's description is its documentation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OFFRAMP_", protected_namespaces=())

    # where and what
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="a bundle, or a folder of bundles (NAME/ or NAME/VERSION/)")
    default_model: str | None = Field(None, description="model of /v1/predict; default: the first classifier by name")
    watch_interval_s: float = Field(0.0, ge=0, description="poll the model folder and reload changes every N s; 0: off")
    # engine
    provider: Literal["cpu", "cuda", "openvino"] = Field(
        "cpu", description="runtime: ONNX Runtime cpu or cuda (falls back to cpu), or openvino (extra: offramp[openvino])")
    intra_op_threads: int | None = Field(None, ge=1, description="threads per inference; default: the cgroup CPU quota")
    shared_thread_pool: bool = Field(True, description="one ONNX Runtime pool, spinning between calls, for every "
                                     "session (docs/benchmarks.md); false: a pool per session, sleeping between calls")
    worker_nice: int = Field(5, ge=0, le=19, description="compute threads run this much nicer than the HTTP loop (0: off)")
    # batching
    batching: bool = Field(True, description="merge concurrent requests into shared batches")
    max_batch_rows: int = Field(32, ge=1, description="rows per batch (the engine splits a batch into length groups: docs/serving.md)")
    max_batch_tokens: int = Field(8192, ge=1, description="padded tokens per batch (rows x longest row)")
    max_wait_ms: float = Field(2.0, ge=0, description="how long the first row of a batch waits for company")
    max_queue_rows: int = Field(2048, ge=1, description="rows waiting per model; beyond: 429 with Retry-After")
    target_p99_ms: float | None = Field(
        None, gt=0, description="latency objective: above it the default threshold rises, within max_accuracy_drop")
    max_accuracy_drop: float = Field(
        1.0, ge=0, le=100, description="how far (points below full depth, from the calibration table) the latency "
                                       "controller may take the default threshold")
    audit_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="fraction of served rows run again to full depth when idle, to report "
                                         "agreement on /metrics (0: off)")
    overload_hold_ms: float = Field(
        1000.0, ge=0, description="a 429 is answered after this pause, so clients that retry at once cannot spin the server")
    default_timeout_ms: float | None = Field(None, gt=0, description="deadline of requests that set no timeout_ms")
    # limits
    max_inputs: int = Field(256, ge=1, description="texts per request (413 beyond)")
    max_text_chars: int = Field(20_000, ge=1, description="characters per text (413 beyond)")
    max_beams: int = Field(8, ge=1, description="beams a generate request may ask for (num_beams; 422 beyond)")
    max_body_bytes: int = Field(2_000_000, ge=1, description="request body size (413 beyond)")
    body_timeout_s: float = Field(30.0, gt=0, description="time a request body may take to arrive (408 beyond)")
    header_timeout_s: float = Field(
        10.0, gt=0, description="time a connection may take to send a request's headers (closed beyond)")
    # operations
    api_key: SecretStr | None = Field(None, description="Bearer key for predict and admin routes; unset: open")
    allow_anonymous: bool = Field(
        False, description="serve without an api_key on a non-loopback address (refused otherwise)")
    log_level: str = Field("info", description="log level")
    log_text: bool = Field(False, description="include input texts in request logs")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight work may take")


def reference_table() -> str:
    """The settings reference of docs/serving.md (`python -m app.settings` prints it)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if name == "model_dir":
            default = "models/ beside the app"
        rows.append(f"| `OFFRAMP_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_table())
