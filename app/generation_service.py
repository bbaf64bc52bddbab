"""Text generation as the HTTP layer asks for it: validate, fill in the model's defaults,
tokenise, queue, return texts.

The same admission, queue, deadlines, retries across a version swap and request metrics as
classification (app/service.py run_for_http); the rows go through the model's batcher as a
GenerationJob, so concurrent requests share batches whatever their decoding parameters.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from app.batcher import GenerationJob
from app.manifest import GenerationSpec
from app.registry import LoadedModel
from app.request_policy import RequestError
from app.service import check_inputs, require_kind, run_for_http, tokenize
from app.settings import Settings

request_log = logging.getLogger("offramp.requests")


@dataclass
class Generation:
    model: LoadedModel
    threshold: float
    max_new_tokens: int
    num_beams: int
    no_repeat_ngram_size: int
    batch: Any  # SourceBatch (app/generation.py)
    outputs: list  # Generated, one per input
    tokenize_s: float
    queue_s: float
    inference_s: float
    total_s: float

    @property
    def exit_layers(self) -> list[int]:
        """Of every decoding step (a token, the final eos included), over every output."""
        return [layer for output in self.outputs for layer in output.exit_layers]

    @property
    def mean_exit_layer(self) -> float:
        layers = self.exit_layers
        return float(np.mean(layers)) if layers else 0.0


def default_new_tokens(spec: GenerationSpec) -> int:
    """The model's default, within the decoder's positions (the first one is the start token)."""
    return max(1, min(spec.max_new_tokens, spec.max_target_length - 1))


def default_beams(spec: GenerationSpec, settings: Settings) -> int:
    """The model's default, within what the server allows (OFFRAMP_MAX_BEAMS caps the compute a
    request may ask for, its default included)."""
    return min(spec.num_beams, settings.max_beams)


def decoding(model: LoadedModel, settings: Settings, max_new_tokens: int | None, num_beams: int | None,
             threshold: float | None, no_repeat_ngram_size: int | None) -> tuple[int, int, float, int]:
    """(max_new_tokens, num_beams, threshold, no_repeat_ngram_size) of a request, its defaults
    filled in from the model, each out-of-range value a 422 naming its field."""
    spec = model.manifest.generation
    longest = spec.max_target_length - 1
    max_new_tokens = default_new_tokens(spec) if max_new_tokens is None else max_new_tokens
    if not 1 <= max_new_tokens <= longest:
        raise RequestError(422, "max_new_tokens", f"{max_new_tokens} is outside the model's 1..{longest} "
                           "(its decoder's positions)")
    num_beams = default_beams(spec, settings) if num_beams is None else num_beams
    if not 1 <= num_beams <= settings.max_beams:
        raise RequestError(422, "num_beams", f"{num_beams} is outside 1..{settings.max_beams} (the server's "
                           "max_beams)")
    threshold = model.manifest.recommended_threshold if threshold is None else threshold
    if not 0.0 <= threshold <= 1.0:
        raise RequestError(422, "threshold", f"{threshold} is outside [0, 1]")
    ngram = spec.no_repeat_ngram_size if no_repeat_ngram_size is None else no_repeat_ngram_size
    if not 0 <= ngram <= spec.max_target_length:
        raise RequestError(422, "no_repeat_ngram_size", f"{ngram} is outside 0..{spec.max_target_length} "
                           "(the model's target length)")
    return max_new_tokens, num_beams, float(threshold), ngram


async def generate(model: LoadedModel, inputs: Sequence[str], settings: Settings,
                   max_new_tokens: int | None = None, num_beams: int | None = None,
                   threshold: float | None = None, no_repeat_ngram_size: int | None = None,
                   timeout_ms: float | None = None,
                   is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> Generation:
    """Admission first (counts and bounds, then room in the queue, held while tokenising), as
    classify does: a refused request costs next to nothing."""
    start = time.monotonic()
    require_kind(model, generation=True)
    characters = check_inputs(model, inputs, settings, None, None)
    new_tokens, beams, threshold, ngram = decoding(model, settings, max_new_tokens, num_beams, threshold,
                                                   no_repeat_ngram_size)
    reservation = model.batcher.reserve(len(inputs))
    try:
        batch = await tokenize(model, inputs, characters)  # (refuses a text that gives no token)
        tokenized = time.monotonic()
        timeout_ms = timeout_ms or settings.default_timeout_ms
        job = GenerationJob(batch, new_tokens, beams, threshold, ngram,
                            deadline=start + timeout_ms / 1000 if timeout_ms else None,
                            is_disconnected=is_disconnected)
        outputs = await model.batcher.submit(job, reservation)
    finally:
        reservation.release()
    return Generation(model, threshold, new_tokens, beams, ngram, batch, outputs, tokenized - start,
                      job.queue_s, job.inference_s, time.monotonic() - start)


async def generate_for_http(request, model_name: str, version: int | None, inputs: Sequence[str],
                            max_new_tokens: int | None = None, num_beams: int | None = None,
                            threshold: float | None = None, no_repeat_ngram_size: int | None = None,
                            timeout_ms: float | None = None) -> Generation:
    """generate() for an HTTP request (app/service.py run_for_http), one log line a request."""
    settings = request.app.state.settings

    def run(model: LoadedModel, timeout: float | None):
        return generate(model, inputs, settings, max_new_tokens, num_beams, threshold, no_repeat_ngram_size,
                        timeout, request.is_disconnected)

    model, result = await run_for_http(request, model_name, version, "v1", timeout_ms, run)
    entry = {"event": "generate", "protocol": "v1", "model": model.name, "version": model.version,
             "rows": len(inputs), "threshold": result.threshold, "max_new_tokens": result.max_new_tokens,
             "num_beams": result.num_beams, "no_repeat_ngram_size": result.no_repeat_ngram_size,
             "generated_tokens": [len(o.token_ids) for o in result.outputs],
             "mean_exit_layer": round(result.mean_exit_layer, 3),
             "tokenize_ms": round(result.tokenize_s * 1e3, 3), "queue_ms": round(result.queue_s * 1e3, 3),
             "inference_ms": round(result.inference_s * 1e3, 3), "total_ms": round(result.total_s * 1e3, 3)}
    if settings.log_text:
        entry["inputs"] = list(inputs)
        entry["outputs"] = [o.text for o in result.outputs]
    request_log.info("generate", extra={"json": entry})
    return result


def generation_calibration(model: LoadedModel, task: str | None):
    """GET /v1/models/{m}/calibration of a generation model: its per-token exit's table (dev
    ROUGE and decoder depth per threshold) under `token_exit`."""
    from app.schemas import CalibrationInfo, PolicyTable

    if task is not None:
        raise RequestError(422, "task", f"model {model.name!r} takes no task: it is a generation model")
    m, spec = model.manifest, model.manifest.generation
    points = [p.model_dump() for p in spec.calibration]
    if spec.full_depth is not None and not any(p.threshold == 0.0 for p in spec.calibration):
        points.insert(0, spec.full_depth.model_dump())
    return CalibrationInfo(model=model.name, layers=m.num_layers,
                           policies={"token_exit": PolicyTable(points=points,
                                                               recommended_threshold=m.recommended_threshold)},
                           calibration_data=m.calibration_data.model_dump() if m.calibration_data else None)
