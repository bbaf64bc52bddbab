"""Classification as every protocol asks for it: validate, tokenise, queue, return rows.

The HTTP layers (/v1, and /v2 Open Inference Protocol) only translate their wire formats to
and from this one function, so limits, batching and timing behave the same on all of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import numpy as np

from app.batcher import Job
from app.encoding import EncodedBatch, TextInput
from app.engine import ExitResult
from app.multitask import TaskBatch
from app.registry import LoadedModel
from app.request_policy import RequestError, exit_policy, resolve_task, takes_pairs, within_budget
from app.settings import Settings

request_log = logging.getLogger("offramp.requests")
__all__ = ["RequestError", "exit_policy", "resolve_task", "within_budget", "classify", "classify_for_http"]


@dataclass
class Classification:
    model: LoadedModel
    threshold: float | None  # None: a policy that reads none (patience alone)
    batch: EncodedBatch
    result: ExitResult
    tokenize_s: float
    queue_s: float
    inference_s: float
    total_s: float
    policy: str = "entropy"
    patience: int | None = None
    task: int | None = None  # a multi-task bundle's: position in manifest.tasks

    @property
    def task_head(self):
        return None if self.task is None else self.model.manifest.tasks[self.task]

    @property
    def mean_exit_layer(self) -> float:
        return float(self.result.exit_layer.mean())


# Characters that make no text on their own; the tokenizer's own verdict (a text that gives no
# token) catches the rest after tokenising.
INVISIBLE = "".join(map(chr, [*range(0x00, 0x21), *range(0x7F, 0xA1), 0xAD, 0x34F, 0x180E,
                              *range(0x200B, 0x2010), *range(0x2028, 0x202F), *range(0x2060, 0x2070),
                              0x3000, 0xFEFF]))
# Requests up to this many characters are tokenised on the event loop (well under a
# millisecond); larger ones in a worker thread, so that health probes never wait for them.
INLINE_TOKENIZE_CHARS = 4096
TOKENIZE_THREADS = 2
RETRIES_ON_RETIRED_VERSION = 3


def require_kind(model: LoadedModel, generation: bool) -> None:
    """A classifier asked to generate, or a generator asked to classify: a 422 on `model` naming
    the operation the model does serve (the /v2 layer makes it its 400)."""
    if model.is_generation == generation:
        return
    if generation:
        raise RequestError(422, "model", f"model {model.name!r} is a classification model: it does not generate; "
                           f"use POST /v1/models/{model.name}/predict (or /v2 infer)", "unsupported")
    raise RequestError(422, "model", f"model {model.name!r} is a generation model: it does not classify; "
                       f"use POST /v1/models/{model.name}/generate", "unsupported")


def check_inputs(model: LoadedModel, inputs: Sequence[TextInput], settings: Settings,
                 min_layers: int | None, max_layers: int | None, task: int | None = None) -> int:
    """The cheap checks, before anything is queued or tokenised: counts, types, sizes, bounds
    (the input kind: the model's, or its task's). Returns the request's characters."""
    if not inputs:
        raise RequestError(422, "inputs", "at least one input is needed")
    if len(inputs) > settings.max_inputs:
        raise RequestError(413, "inputs", f"{len(inputs)} texts, at most {settings.max_inputs} per request",
                           "too_large")
    pair_model = takes_pairs(model, task)
    owner = f"model {model.name!r}" if task is None else \
        f"task {model.manifest.tasks[task].name!r} of model {model.name!r}"
    characters = 0
    for i, item in enumerate(inputs):
        is_pair = not isinstance(item, str)
        if is_pair != pair_model:
            want = "[text, text_pair] pairs" if pair_model else "single texts"
            raise RequestError(422, f"inputs[{i}]", f"{owner} takes {want}")
        for text in (item if is_pair else [item]):
            if len(text) > settings.max_text_chars:
                raise RequestError(413, f"inputs[{i}]", f"{len(text)} characters, at most "
                                   f"{settings.max_text_chars}", "too_large")
            if not text.strip(INVISIBLE):
                raise RequestError(422, f"inputs[{i}]", "text is blank")
            characters += len(text)
    layers = model.manifest.num_layers
    if min_layers and max_layers and min_layers > max_layers:
        raise RequestError(422, "min_layers", f"{min_layers} exceeds max_layers {max_layers}")
    for name, value in (("min_layers", min_layers), ("max_layers", max_layers)):
        if value is not None and not 1 <= value <= layers:
            raise RequestError(422, name, f"{value} is outside the model's layers 1..{layers}")
    return characters


_tokenize_limiters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one per event loop


async def tokenize(model: LoadedModel, inputs: Sequence[TextInput], characters: int) -> EncodedBatch:
    from anyio import CapacityLimiter

    from app.threads import in_worker

    if characters <= INLINE_TOKENIZE_CHARS:
        batch = model.encoder.encode(list(inputs))
    else:
        loop = asyncio.get_running_loop()
        limiter = _tokenize_limiters.setdefault(loop, CapacityLimiter(TOKENIZE_THREADS))
        batch = await in_worker(model.encoder.encode, list(inputs), limiter=limiter)
    if batch.empty is not None and batch.empty.any():
        row = int(np.flatnonzero(batch.empty)[0])
        raise RequestError(422, f"inputs[{row}]", "text is blank: none of its characters makes a token")
    return batch


async def classify(
    model: LoadedModel,
    inputs: Sequence[TextInput],
    settings: Settings,
    threshold: float | None = None,
    min_layers: int | None = None,
    max_layers: int | None = None,
    timeout_ms: float | None = None,
    is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    policy: str | None = None,
    patience: int | None = None,
    max_accuracy_drop: float | None = None,
    task: str | None = None,
) -> Classification:
    """Admission first (cheap counts, then room in the queue, held while tokenising), so a
    request that will be refused costs next to nothing. `policy` None: the model's default."""
    start = time.monotonic()
    require_kind(model, generation=False)  # (a version that replaced a classifier may generate)
    task_id = resolve_task(model, task)
    characters = check_inputs(model, inputs, settings, min_layers, max_layers, task_id)
    code, threshold, patience_count, policy = exit_policy(model, policy, threshold, patience, max_accuracy_drop,
                                                          task_id)
    manifest = model.manifest
    reservation = model.batcher.reserve(len(inputs))
    try:
        batch = await tokenize(model, inputs, characters)
        if task_id is not None:
            # Rows carry their task into the batcher, which merges them with other tasks' rows.
            batch = TaskBatch.of(batch, task_id)
        tokenized = time.monotonic()
        timeout_ms = timeout_ms or settings.default_timeout_ms
        job = Job(batch, 0.0 if threshold is None else threshold, min_layers or 1,
                  max_layers or manifest.num_layers, deadline=start + timeout_ms / 1000 if timeout_ms else None,
                  is_disconnected=is_disconnected, policy=code, patience=patience_count)
        result = await model.batcher.submit(job, reservation)
    finally:
        reservation.release()
    done = time.monotonic()
    return Classification(model, threshold, batch, result, tokenized - start, job.queue_s,
                          job.inference_s, done - start, policy, patience_count if policy == "patience" else None,
                          task_id)


def find_model(registry, name: str, version: int | None) -> LoadedModel:
    model = registry.get(name, version)
    if model is not None:
        return model
    if name in registry.versions:
        asked = "of that many digits" if version is not None and version < 0 else version
        raise RequestError(404, "version", f"model {name!r} has no version {asked}; "
                           f"loaded: {sorted(registry.versions[name])}", "not_found")
    raise RequestError(404, "model", f"no model named {name!r}; loaded: {sorted(registry.versions)}",
                       "not_found")


def count_refusal(request, model_name: str, version: int | None, protocol: str, status: int) -> None:
    """A request refused before the service ran it: counted by status, and as a failure of the
    version it named (Triton's statistics count those too)."""
    app = request.app
    app.state.metrics.count_request(model_name, app.state.registry, protocol, status)
    model = app.state.registry.get(model_name, version)
    if model is not None:
        app.state.metrics.observe_request(model.name, model.version, 0.0, ok=False)


# The fewest bytes a row takes in a JSON body (`"x",`): a body of N bytes holds at most N / 4 rows.
MIN_ROW_BYTES = 4


def admit(request, model_name: str, version: int | None, protocol: str, generation: bool = False) -> None:
    """Before the body is read: unknown model, the wrong operation for it (generate / predict),
    shutting down, or no room in the queue for the
    most rows this body can hold (counted like every other refusal). Under overload the queue
    frees a batch at a time, so most refusals happen here, without reading or parsing the body;
    room is then reserved for the request's real rows before it is tokenised."""
    from app.batcher import QueueFull, ShuttingDown

    app = request.app
    registry, settings = app.state.registry, app.state.settings
    declared = request.headers.get("content-length", "")
    rows = settings.max_inputs
    if declared.isascii() and declared.isdigit() and not request.headers.get("content-encoding"):
        rows = max(1, min(rows, int(declared) // MIN_ROW_BYTES))
    try:
        model = find_model(registry, model_name, version)
        require_kind(model, generation)
        try:
            model.batcher.check_room(rows)
        except QueueFull as exc:
            raise RequestError(429, "inputs", f"server overloaded: {exc}, no room for up to {rows} more; "
                               "retry later", "overloaded") from exc
        except ShuttingDown:
            if app.state.draining:
                raise RequestError(503, "model", "the server is shutting down", "unavailable") from None
            # a version being retired: its successor takes the request once it is parsed
    except RequestError as exc:
        count_refusal(request, model_name, version, protocol, exc.status)
        raise


async def run_for_http(request, model_name: str, version: int | None, protocol: str,
                       timeout_ms: float | None, run: Callable[[LoadedModel, float | None], Awaitable]):
    """run(model, timeout_ms) for an HTTP request (classify or generate): model lookup, queue and
    deadline errors as RequestError, request metrics. A request that picked a version while it
    was being replaced goes to its successor rather than being refused. Returns (model, result)."""
    from app.batcher import DeadlineExceeded, QueueFull, ShuttingDown

    app = request.app
    settings, registry, metrics = app.state.settings, app.state.registry, app.state.metrics
    status, model, start = 200, None, time.monotonic()
    try:
        model = find_model(registry, model_name, version)
        timeout_ms = timeout_ms or settings.default_timeout_ms
        for attempt in range(RETRIES_ON_RETIRED_VERSION + 1):
            try:
                work = run(model, timeout_ms)
                result = await (asyncio.wait_for(work, timeout_ms / 1000) if timeout_ms else work)
                break
            except QueueFull as exc:
                raise RequestError(429, "inputs", f"server overloaded: {exc}; retry later", "overloaded") from exc
            except (DeadlineExceeded, asyncio.TimeoutError) as exc:
                raise RequestError(504, "timeout_ms", f"no answer within {timeout_ms:g} ms", "timeout") from exc
            except ShuttingDown as exc:
                successor = registry.get(model_name, version)
                if app.state.draining or successor is None or successor is model or \
                        attempt == RETRIES_ON_RETIRED_VERSION:
                    raise RequestError(503, "model", str(exc), "unavailable") from exc
                model = successor  # none of its rows was queued: the new version answers it
            except ConnectionAbortedError as exc:
                raise RequestError(499, "request", "client closed the request", "cancelled") from exc
    except RequestError as exc:
        status = exc.status
        if model is not None:
            metrics.observe_request(model.name, model.version, time.monotonic() - start, ok=False)
        raise
    finally:
        metrics.count_request(model_name, registry, protocol, status)
    metrics.observe_request(model.name, model.version, result.total_s, ok=True)
    return model, result


async def classify_for_http(request, model_name: str, version: int | None, inputs: Sequence[TextInput],
                            protocol: str, threshold: float | None = None, min_layers: int | None = None,
                            max_layers: int | None = None, timeout_ms: float | None = None,
                            policy: str | None = None, patience: int | None = None,
                            max_accuracy_drop: float | None = None, task: str | None = None) -> Classification:
    """classify() for an HTTP request (run_for_http), and one structured log line per request."""
    settings = request.app.state.settings

    def run(model: LoadedModel, timeout: float | None):
        return classify(model, inputs, settings, threshold, min_layers, max_layers, timeout,
                        request.is_disconnected, policy, patience, max_accuracy_drop, task)

    model, result = await run_for_http(request, model_name, version, protocol, timeout_ms, run)
    if model.controller is not None:
        model.controller.observe(result.total_s)
    entry = {"event": "predict", "protocol": protocol, "model": model.name, "version": model.version,
             "rows": len(inputs), "threshold": result.threshold, "policy": result.policy,
             **({"task": result.task_head.name} if result.task is not None else {}),
             "exit_layers": result.result.exit_layer.tolist(), "tokenize_ms": round(result.tokenize_s * 1e3, 3),
             "queue_ms": round(result.queue_s * 1e3, 3), "inference_ms": round(result.inference_s * 1e3, 3),
             "total_ms": round(result.total_s * 1e3, 3)}
    if settings.log_text:
        entry["inputs"] = list(inputs)
    request_log.info("predict", extra={"json": entry})
    return result


def timing_headers(result) -> dict[str, str]:
    """Of a Classification or a Generation (app/generation_service.py)."""
    return {"x-queue-time-ms": f"{result.queue_s * 1e3:.3f}",
            "x-inference-time-ms": f"{result.inference_s * 1e3:.3f}",
            "x-total-time-ms": f"{result.total_s * 1e3:.3f}",
            "x-mean-exit-layer": f"{result.mean_exit_layer:.3f}"}
