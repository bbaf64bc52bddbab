"""The FastAPI application: lifecycle, errors, limits, health and metrics; the protocols are
routers (app/api_v1.py, app/api_v2.py) over one classification service (app/service.py).

Every error is JSON with a 4xx status naming the field; nothing reaches a client as a trace.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.batcher import Batcher
from app.metrics import Metrics
from app.registry import LoadedModel, Registry
from app.schemas import ErrorResponse
from app.service import RequestError
from app.settings import Settings

log = logging.getLogger("offramp.server")

RETRY_AFTER_S = 1


def error_response(status: int, message: str, error_type: str, field: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = ErrorResponse(error=message, error_type=error_type, field=field)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def field_name(loc: tuple) -> str:
    """('body', 'inputs', 2, 'constrained-str') -> 'inputs[2]'."""
    name = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif str(part).isidentifier():  # skips pydantic's union tags ('constrained-str', ...)
            name += ("." if name else "") + str(part)
    return name or "body"


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over the limit, by header or by counting (chunked)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send):
        response = error_response(413, f"body: larger than {self.max_bytes} bytes", "too_large", "body")
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(response.body)).encode())]})
        await send({"type": "http.response.body", "body": response.body})


class _TooLarge(Exception):
    pass


def create_app(settings: Settings | None = None) -> FastAPI:
    from app import api_v1, api_v2

    settings = settings or Settings()
    metrics = Metrics()

    def make_batcher(model: LoadedModel) -> Batcher:
        def on_batch(stats):
            metrics.observe_batch(model.name, model.manifest.num_layers, stats)

        return Batcher(model.engine, settings.max_batch_rows, settings.max_batch_tokens,
                       settings.max_wait_ms, settings.max_queue_rows,
                       merge_requests=settings.batching, on_batch=on_batch)

    registry = Registry(settings.model_dir, settings.default_model, settings.provider,
                        settings.intra_op_threads, make_batcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await registry.load_all()
        if not registry.versions:
            log.error("no model loaded from %s: %s", settings.model_dir, registry.errors or "no bundles")
        watcher = (asyncio.create_task(registry.watch(settings.watch_interval_s))
                   if settings.watch_interval_s > 0 else None)
        yield
        app.state.draining = True
        if watcher is not None:
            watcher.cancel()
        await registry.stop()  # queued rows are answered before the process exits

    app = FastAPI(title="offramp", version="0.1.0", lifespan=lifespan,
                  description="Early-exit text classification: every request picks its own "
                              "speed/accuracy trade-off with an uncertainty threshold.")
    app.state.registry = registry
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.draining = False
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError):
        headers = {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if exc.status in (429, 503):
            headers["Retry-After"] = str(RETRY_AFTER_S)
        return error_response(exc.status, str(exc), exc.error_type, exc.field, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        field = field_name(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            field, message = "body", f"invalid JSON: {first.get('ctx', {}).get('error', message)}"
        return error_response(422, f"{field}: {message}", "validation", field)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unexpected error")
        return error_response(500, "internal error", "internal")

    @app.get("/health/live", tags=["health"])
    async def live():
        return {"status": "live"}

    @app.get("/health/ready", tags=["health"], responses={503: {"model": ErrorResponse}})
    async def ready():
        if app.state.draining:
            return error_response(503, "shutting down", "unavailable")
        if registry.default_name is None:
            return error_response(503, "no model loaded", "unavailable")
        return {"status": "ready", "models": sorted(registry.versions)}

    @app.get("/metrics", tags=["health"])
    async def prometheus_metrics():
        for model in registry.all_loaded():
            if model.batcher is not None:
                metrics.queue_rows.labels(model.name).set(model.batcher.queued_rows)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(api_v1.router)
    app.include_router(api_v2.router)
    return app
