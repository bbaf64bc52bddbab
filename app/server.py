"""The FastAPI application: lifecycle, errors, limits, health and metrics; the protocols are
routers (app/api_v1.py, app/api_v2.py) over one classification service (app/service.py), and
generate (app/api_generate.py) over the generation service (app/generation_service.py).

Every error is JSON with a 4xx status naming the field; nothing reaches a client as a trace.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.batcher import Batcher
from app.http_body import field_name
from app.metrics import Metrics
from app.registry import LoadedModel, Registry
from app.openapi import complete as complete_openapi
from app.schemas import ErrorResponse
from app.service import RequestError
from app.settings import Settings
from app.threads import in_worker, release_free_memory, set_worker_nice

log = logging.getLogger("offramp.server")

RETRY_AFTER_S = 1
MEMORY_TRIM_INTERVAL_S = 10.0


async def _release_free_memory_every(seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        await in_worker(release_free_memory)


def error_response(status: int, message: str, error_type: str, field: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = ErrorResponse(error=message, error_type=error_type, field=field)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class BodyGuard:
    """ASGI middleware: a body over the size limit gets 413 (by its header, or by counting a
    chunked one), and a body that does not arrive within the time limit gets 408, so a stalled
    or slow client cannot hold a connection (and its memory) indefinitely."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_error(send, 413, f"body: larger than {self.max_bytes} bytes", "too_large")
        seen, deadline = 0, asyncio.get_running_loop().time() + self.timeout_s
        body_done = False

        async def guarded_receive():
            nonlocal seen, body_done
            if body_done:  # after the body only a disconnect can come: no deadline then
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - asyncio.get_running_loop().time(), 0))
            except asyncio.TimeoutError:
                raise _BodyTimeout() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
                body_done = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, guarded_receive, send)
        except _TooLarge:
            await _send_error(send, 413, f"body: larger than {self.max_bytes} bytes", "too_large")
        except _BodyTimeout:
            log.warning("request body not received within %g s: connection closed", self.timeout_s)
            await _send_error(send, 408, f"body: not received within {self.timeout_s:g} s", "timeout")


async def _send_error(send, status: int, message: str, error_type: str) -> None:
    response = error_response(status, message, error_type, "body")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                            (b"content-length", str(len(response.body)).encode())]})
    await send({"type": "http.response.body", "body": response.body})


class _TooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


CONTROL_INTERVAL_S = 0.5


async def _control_thresholds(registry, metrics, interval_s: float) -> None:
    """Every interval, each model's latency controller takes a step (app/controller.py)."""
    while True:
        await asyncio.sleep(interval_s)
        for model in registry.models.values():
            if model.controller is not None:
                metrics.default_threshold.labels(model.name).set(model.controller.update())


def create_app(settings: Settings | None = None) -> FastAPI:
    from app import api_generate, api_v1, api_v2, api_v2_repository, playground

    settings = settings or Settings()
    set_worker_nice(settings.worker_nice)
    metrics = Metrics()

    def make_batcher(model: LoadedModel) -> Batcher:
        def on_batch(stats):
            metrics.observe_batch(model.name, model.version, model.manifest.num_layers, stats)

        # Neither the latency controller nor the agreement monitor is attached to a multi-task
        # bundle: each reads one calibration table (and the monitor one label space), and a
        # multi-task bundle has one per task (docs/serving.md); nor to a generation bundle, whose
        # rows are texts of many tokens with no label to agree on.
        single = not model.is_multitask and not model.is_generation
        if settings.target_p99_ms and single:
            from app.controller import ThresholdController, threshold_steps

            model.controller = ThresholdController(threshold_steps(model.manifest, settings.max_accuracy_drop),
                                                   settings.target_p99_ms)
        auditor = None
        if settings.audit_fraction > 0 and single:
            from app.audit import Auditor

            auditor = Auditor(settings.audit_fraction, model.manifest,
                              lambda *counts: metrics.observe_audit(model.name, *counts))
        return Batcher(model.engine, settings.max_batch_rows, settings.max_batch_tokens,
                       settings.max_wait_ms, settings.max_queue_rows,
                       merge_requests=settings.batching, on_batch=on_batch, auditor=auditor)

    registry = Registry(settings.model_dir, settings.default_model, settings.provider,
                        settings.intra_op_threads, make_batcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await registry.load_all()
        if not registry.versions:
            log.error("no model loaded from %s: %s", settings.model_dir, registry.errors or "no bundles")
        watcher = (asyncio.create_task(registry.watch(settings.watch_interval_s))
                   if settings.watch_interval_s > 0 else None)
        trimmer = asyncio.create_task(_release_free_memory_every(MEMORY_TRIM_INTERVAL_S))
        controlling = (asyncio.create_task(_control_thresholds(registry, metrics, CONTROL_INTERVAL_S))
                       if settings.target_p99_ms else None)
        yield
        app.state.draining = True
        trimmer.cancel()
        if controlling is not None:
            controlling.cancel()
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
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError):
        headers = {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if exc.status in (429, 503):
            headers["Retry-After"] = str(RETRY_AFTER_S)
        if exc.status == 429 and settings.overload_hold_ms:
            # A refusal costs the server little but a client that retries at once sends the next
            # request at once: held, the refusals of even 64 such clients stay a small load.
            await asyncio.sleep(settings.overload_hold_ms / 1000)
        return error_response(exc.status, str(exc), exc.error_type, exc.field, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        field = field_name(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            field, message = "body", f"invalid JSON: {first.get('ctx', {}).get('error', message)}"
        return error_response(422, f"{field}: {message}", "validation", field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # Routing's own answers (unknown path, wrong method) in the one error shape.
        if exc.status_code == 404:
            return error_response(404, f"path: no route {request.url.path[:200]!r}", "not_found", "path")
        if exc.status_code == 405:
            return error_response(405, f"method: {request.method} is not allowed on this route", "method",
                                  "method", headers=exc.headers)
        return error_response(exc.status_code, str(exc.detail), "http", None, headers=exc.headers)

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

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse,
             responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def prometheus_metrics():
        for model in registry.all_loaded():
            if model.batcher is not None:
                metrics.queue_rows.labels(model.name).set(model.batcher.queued_rows)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(api_v1.router)
    app.include_router(api_generate.router)
    app.include_router(api_v2_repository.router)  # first: /v2/models/stats is no model named "stats"
    app.include_router(api_v2.router)
    app.include_router(playground.router)
    fastapi_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = complete_openapi(fastapi_openapi())
        return app.openapi_schema

    app.openapi = openapi
    return app
