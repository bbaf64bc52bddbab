"""Classification as every protocol asks for it: validate, tokenise, queue, return rows.

The HTTP layers (/v1, and /v2 Open Inference Protocol) only translate their wire formats to
and from this one function, so limits, batching and timing behave the same on all of them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from app.batcher import Job
from app.encoding import EncodedBatch, TextInput
from app.engine import ExitResult
from app.registry import LoadedModel
from app.settings import Settings

request_log = logging.getLogger("offramp.requests")


class RequestError(Exception):
    """A request the server will not run: the HTTP layers map it to a 4xx naming the field."""

    def __init__(self, status: int, field: str, message: str, error_type: str = "validation"):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.error_type = status, field, error_type


@dataclass
class Classification:
    model: LoadedModel
    threshold: float
    batch: EncodedBatch
    result: ExitResult
    tokenize_s: float
    queue_s: float
    inference_s: float
    total_s: float

    @property
    def mean_exit_layer(self) -> float:
        return float(self.result.exit_layer.mean())


def check_inputs(model: LoadedModel, inputs: Sequence[TextInput], settings: Settings,
                 min_layers: int | None, max_layers: int | None) -> None:
    if not inputs:
        raise RequestError(422, "inputs", "at least one input is needed")
    if len(inputs) > settings.max_inputs:
        raise RequestError(413, "inputs", f"{len(inputs)} texts, at most {settings.max_inputs} per request",
                           "too_large")
    pair_model = model.manifest.text_pair
    for i, item in enumerate(inputs):
        is_pair = not isinstance(item, str)
        if is_pair != pair_model:
            want = "[text, text_pair] pairs" if pair_model else "single texts"
            raise RequestError(422, f"inputs[{i}]", f"model {model.name!r} takes {want}")
        for text in (item if is_pair else [item]):
            if not text.strip():
                raise RequestError(422, f"inputs[{i}]", "text is blank")
            if len(text) > settings.max_text_chars:
                raise RequestError(413, f"inputs[{i}]", f"{len(text)} characters, at most "
                                   f"{settings.max_text_chars}", "too_large")
    layers = model.manifest.num_layers
    if min_layers and max_layers and min_layers > max_layers:
        raise RequestError(422, "min_layers", f"{min_layers} exceeds max_layers {max_layers}")
    for name, value in (("min_layers", min_layers), ("max_layers", max_layers)):
        if value is not None and not 1 <= value <= layers:
            raise RequestError(422, name, f"{value} is outside the model's layers 1..{layers}")


async def classify(
    model: LoadedModel,
    inputs: Sequence[TextInput],
    settings: Settings,
    threshold: float | None = None,
    min_layers: int | None = None,
    max_layers: int | None = None,
    timeout_ms: float | None = None,
    is_disconnected: Callable[[], Awaitable[bool]] | None = None,
) -> Classification:
    start = time.monotonic()
    check_inputs(model, inputs, settings, min_layers, max_layers)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise RequestError(422, "threshold", f"{threshold} is outside [0, 1]")
    manifest = model.manifest
    threshold = manifest.recommended_threshold if threshold is None else float(threshold)
    batch = model.encoder.encode(list(inputs))
    tokenized = time.monotonic()
    timeout_ms = timeout_ms or settings.default_timeout_ms
    job = Job(batch, threshold, min_layers or 1, max_layers or manifest.num_layers,
              deadline=start + timeout_ms / 1000 if timeout_ms else None,
              is_disconnected=is_disconnected)
    result = await model.batcher.submit(job)
    done = time.monotonic()
    return Classification(model, threshold, batch, result, tokenized - start, job.queue_s,
                          job.inference_s, done - start)


async def classify_for_http(request, model_name: str, version: int | None, inputs: Sequence[TextInput],
                            protocol: str, threshold: float | None = None, min_layers: int | None = None,
                            max_layers: int | None = None, timeout_ms: float | None = None) -> Classification:
    """classify() for an HTTP request: model lookup, queue and deadline errors as RequestError,
    metrics and one structured log line per request."""
    import asyncio

    from app.batcher import DeadlineExceeded, QueueFull, ShuttingDown

    app = request.app
    settings, registry, metrics = app.state.settings, app.state.registry, app.state.metrics
    model = registry.get(model_name, version)
    status = 200
    try:
        if model is None:
            known = sorted(registry.versions)
            if model_name in registry.versions:
                raise RequestError(404, "version", f"model {model_name!r} has no version {version}; "
                                   f"loaded: {sorted(registry.versions[model_name])}", "not_found")
            raise RequestError(404, "model", f"no model named {model_name!r}; loaded: {known}", "not_found")
        timeout_ms = timeout_ms or settings.default_timeout_ms
        try:
            work = classify(model, inputs, settings, threshold, min_layers, max_layers, timeout_ms,
                            request.is_disconnected)
            result = await (asyncio.wait_for(work, timeout_ms / 1000) if timeout_ms else work)
        except QueueFull as exc:
            raise RequestError(429, "inputs", f"server overloaded: {exc}; retry later", "overloaded") from exc
        except (DeadlineExceeded, asyncio.TimeoutError) as exc:
            raise RequestError(504, "timeout_ms", f"no answer within {timeout_ms:g} ms", "timeout") from exc
        except ShuttingDown as exc:
            raise RequestError(503, "model", str(exc), "unavailable") from exc
        except ConnectionAbortedError as exc:
            raise RequestError(499, "request", "client closed the request", "cancelled") from exc
    except RequestError as exc:
        status = exc.status
        raise
    finally:
        metrics.requests.labels(model_name, protocol, str(status)).inc()
    metrics.request_duration.labels(model.name).observe(result.total_s)
    entry = {"event": "predict", "protocol": protocol, "model": model.name, "version": model.version,
             "rows": len(inputs), "threshold": result.threshold,
             "exit_layers": result.result.exit_layer.tolist(), "tokenize_ms": round(result.tokenize_s * 1e3, 3),
             "queue_ms": round(result.queue_s * 1e3, 3), "inference_ms": round(result.inference_s * 1e3, 3),
             "total_ms": round(result.total_s * 1e3, 3)}
    if settings.log_text:
        entry["inputs"] = list(inputs)
    request_log.info("predict", extra={"json": entry})
    return result


def timing_headers(result: Classification) -> dict[str, str]:
    return {"x-queue-time-ms": f"{result.queue_s * 1e3:.3f}",
            "x-inference-time-ms": f"{result.inference_s * 1e3:.3f}",
            "x-total-time-ms": f"{result.total_s * 1e3:.3f}",
            "x-mean-exit-layer": f"{result.mean_exit_layer:.3f}"}
