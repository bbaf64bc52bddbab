"""HTTP layer: request -> schema -> engine (off the event loop) -> response.

Every error is JSON `{"error", "error_type", "field"}` with a 4xx status naming the field;
nothing reaches the client as a stack trace.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

import numpy as np
from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.registry import LoadedModel, Registry
from app.schemas import (
    ErrorResponse,
    ModelInfo,
    ModelList,
    Prediction,
    PredictRequest,
    PredictResponse,
    Timing,
)
from app.settings import Settings

log = logging.getLogger("offramp.server")


class ApiError(Exception):
    def __init__(self, status: int, message: str, error_type: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_type, self.field = status, message, error_type, field


def _error(status: int, message: str, error_type: str, field: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=message, error_type=error_type, field=field)
    return JSONResponse(body.model_dump(), status_code=status)


def _field_name(loc: tuple) -> str:
    """('body', 'inputs', 2, 'constrained-str') -> 'inputs[2]'."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif str(part).isidentifier():  # skips pydantic's union tags ('constrained-str', ...)
            name += ("." if name else "") + str(part)
    return name or "body"


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    settings = settings or Settings()
    registry = registry or Registry(settings.model_dir, settings.default_model, settings.provider,
                                    settings.intra_op_threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await to_thread.run_sync(registry.load_all)
        if not registry.models:
            log.error("no model loaded from %s: %s", settings.model_dir, registry.errors or "no bundles")
        yield

    app = FastAPI(title="offramp", version="0.1.0", lifespan=lifespan,
                  description="Early-exit text classification: every request picks its own "
                              "speed/accuracy trade-off with an uncertainty threshold.")
    app.state.registry = registry
    app.state.settings = settings
    errors = {422: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse}}

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.error_type, exc.field)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        field = _field_name(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            field, message = "body", f"invalid JSON: {first.get('ctx', {}).get('error', message)}"
        return _error(422, f"{field}: {message}", "validation", field)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unexpected error")
        return _error(500, "internal error", "internal")

    @app.get("/health/live")
    async def live():
        return {"status": "live"}

    @app.get("/health/ready", responses={503: {"model": ErrorResponse}})
    async def ready():
        if registry.default_name is None:
            return _error(503, "no model loaded", "unavailable")
        return {"status": "ready", "models": sorted(registry.models)}

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        default = registry.default_name
        return ModelList(models=[_info(m, m.name == default) for m in registry.models.values()],
                         failed=registry.errors)

    @app.post("/v1/models/{model}/predict", response_model=PredictResponse,
              response_model_exclude_none=True, responses=errors)
    async def predict(model: str, request: PredictRequest):
        loaded = registry.get(model)
        if loaded is None:
            raise ApiError(404, f"model: no model named {model!r}; loaded: {sorted(registry.models)}",
                           "not_found", "model")
        return await _predict(loaded, request, settings)

    return app


def _info(model: LoadedModel, default: bool) -> ModelInfo:
    m = model.manifest
    return ModelInfo(name=model.name, labels=m.labels, layers=m.num_layers, text_pair=m.text_pair,
                     max_seq_length=m.max_seq_length, recommended_threshold=m.recommended_threshold,
                     exit_head=m.exit_head, default=default)


def _check_inputs(model: LoadedModel, request: PredictRequest, settings: Settings) -> None:
    if len(request.inputs) > settings.max_inputs:
        raise ApiError(413, f"inputs: {len(request.inputs)} texts, at most {settings.max_inputs} "
                            "per request", "too_large", "inputs")
    pair_model = model.manifest.text_pair
    for i, item in enumerate(request.inputs):
        is_pair = not isinstance(item, str)
        if is_pair != pair_model:
            want = "[text, text_pair] pairs" if pair_model else "single texts"
            raise ApiError(422, f"inputs[{i}]: model {model.name!r} takes {want}", "validation",
                           f"inputs[{i}]")
        for text in (item if is_pair else [item]):
            if not text.strip():
                raise ApiError(422, f"inputs[{i}]: text is blank", "validation", f"inputs[{i}]")
            if len(text) > settings.max_text_chars:
                raise ApiError(413, f"inputs[{i}]: {len(text)} characters, at most "
                                    f"{settings.max_text_chars}", "too_large", f"inputs[{i}]")
    layers = model.manifest.num_layers
    if request.min_layers and request.max_layers and request.min_layers > request.max_layers:
        raise ApiError(422, f"min_layers: {request.min_layers} exceeds max_layers {request.max_layers}",
                       "validation", "min_layers")
    for name in ("min_layers", "max_layers"):
        value = getattr(request, name)
        if value is not None and value > layers:
            raise ApiError(422, f"{name}: {value} exceeds the model's {layers} layers",
                           "validation", name)


async def _predict(model: LoadedModel, request: PredictRequest, settings: Settings) -> PredictResponse:
    start = time.perf_counter()
    _check_inputs(model, request, settings)
    manifest = model.manifest
    threshold = manifest.recommended_threshold if request.threshold is None else request.threshold
    batch = model.encoder.encode(request.inputs)
    tokenized = time.perf_counter()
    result = await to_thread.run_sync(
        model.engine.run, batch, np.float32(threshold), request.min_layers or 1,
        request.max_layers or manifest.num_layers,
    )
    inferred = time.perf_counter()
    labels = manifest.labels
    predictions = []
    for row in range(len(request.inputs)):
        probs = result.probabilities[row]
        best = int(probs.argmax())
        predictions.append(Prediction(
            label=labels[best], label_id=best, score=float(probs[best]),
            probabilities={l: float(p) for l, p in zip(labels, probs)} if request.return_probabilities else None,
            exit_layer=int(result.exit_layer[row]), uncertainty=float(result.uncertainty[row]),
            truncated=bool(batch.truncated[row]),
        ))
    truncated = [i for i in range(len(request.inputs)) if batch.truncated[i]]
    warnings = [f"inputs{truncated} longer than {manifest.max_seq_length} tokens were truncated"] if truncated else []
    done = time.perf_counter()
    response = PredictResponse(
        model=model.name, threshold=threshold, predictions=predictions,
        layers_executed=result.layers_executed, layers_full=len(predictions) * manifest.num_layers,
        warnings=warnings,
        timing_ms=Timing(tokenize=(tokenized - start) * 1e3, inference=(inferred - tokenized) * 1e3,
                         total=(done - start) * 1e3),
    )
    log.info("predict model=%s rows=%d threshold=%.3f exit_layers=%s total_ms=%.1f", model.name,
             len(predictions), threshold, result.exit_layer.tolist(), response.timing_ms.total)
    return response
