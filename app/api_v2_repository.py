"""The /v2 routes Triton adds to the Open Inference Protocol, so that `tritonclient` calls
beyond infer work too: model configuration, statistics, and the model repository (index, and
load as a reload from disk). Unload is not offered: the model folder is what is served.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from app.api_v2 import lookup, parse_version, task_list
from app.api_v2_request import input_names, output_names
from app.api_v2_types import ERRORS, USED_PARAMETERS
from app.auth import require_api_key
from app.metrics import Duration, ModelStats
from app.registry import LoadedModel
from app.service import RequestError

router = APIRouter(prefix="/v2", tags=["v2"])
TRITON_TYPES = {"label": "TYPE_STRING", "label_id": "TYPE_INT64", "probabilities": "TYPE_FP32",
                "exit_layer": "TYPE_INT32", "uncertainty": "TYPE_FP32", "score": "TYPE_FP32"}


def model_config(request: Request, model: LoadedModel) -> dict:
    """Triton's model configuration, as far as it describes this server's models."""
    settings = request.app.state.settings
    m = model.manifest
    classes = len(m.labels) if m.tasks is None else -1  # a multi-task model's: its task's
    return {
        "name": model.name,
        "platform": "offramp",
        "backend": "onnxruntime" if settings.provider != "openvino" else "openvino",
        "version_policy": {"specific": {"versions": [model.version]}},
        "max_batch_size": 0,  # one request's rows are its first dimension; the server batches them
        "input": [{"name": n, "data_type": "TYPE_STRING", "dims": [-1]} for n in input_names(model)],
        "output": [] if m.is_generation else [
            {"name": n, "data_type": TRITON_TYPES[n], "dims": [-1, classes] if n == "probabilities" else [-1],
             **({"label_filename": ""} if n == "label" else {})} for n in output_names(model)],
        "dynamic_batching": {"max_queue_delay_microseconds": int(settings.max_wait_ms * 1000),
                             "preferred_batch_size": [settings.max_batch_rows]} if settings.batching else None,
        "instance_group": [{"count": 1, "kind": "KIND_GPU" if settings.provider == "cuda" else "KIND_CPU"}],
        "parameters": {
            "labels": {"string_value": ",".join(m.labels)},
            "layers": {"string_value": str(m.num_layers)},
            "recommended_threshold": {"string_value": str(m.recommended_threshold)},
            "max_seq_length": {"string_value": str(m.max_seq_length)},
            "exit_head": {"string_value": m.exit_head},
            # a cascade's stages, NAME:FIRST_LAYER-LAST_LAYER in the order they run
            **({"stages": {"string_value": ",".join(f"{s.name}:{s.first_layer}-{s.last_layer}" for s in m.stages)}}
               if m.stages else {}),
            # a multi-task model's tasks, NAME:KIND[:pair] (a request names one: parameter task)
            **({"tasks": {"string_value": task_list(model)}} if m.tasks else {}),
            # a generation model: served by /v1 generate, not by infer
            **({"task": {"string_value": "generation"}} if m.is_generation else {}),
            "request_parameters": {"string_value": ",".join(USED_PARAMETERS)},
        },
    }


def _duration(d: Duration) -> dict:
    return {"count": d.count, "ns": d.ns}


def version_stats(name: str, version: int, stats: ModelStats) -> dict:
    zero = {"count": 0, "ns": 0}
    return {
        "name": name, "version": str(version),
        "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "inference_stats": {"success": _duration(stats.success), "fail": _duration(stats.fail),
                            "queue": _duration(stats.queue), "compute_input": zero,
                            "compute_infer": _duration(stats.compute_infer), "compute_output": zero,
                            "cache_hit": zero, "cache_miss": zero},
        "batch_stats": [{"batch_size": size, "compute_input": zero, "compute_infer": _duration(d),
                         "compute_output": zero} for size, d in sorted(stats.batches.items())],
        # offramp's own: how many rows left at each layer (1-based)
        "exit_layer_counts": {str(layer): count for layer, count in sorted(stats.exit_layers.items())},
    }


def stats_response(request: Request, models: list[LoadedModel]) -> dict:
    metrics = request.app.state.metrics
    return {"model_stats": [version_stats(m.name, m.version, metrics.model_stats(m.name, m.version))
                            for m in models]}


@router.get("/models/stats", responses=ERRORS)
async def all_stats(request: Request):
    registry = request.app.state.registry
    return stats_response(request, sorted(registry.all_loaded(), key=lambda m: (m.name, m.version)))


@router.get("/models/{model}/stats", responses=ERRORS)
async def model_stats(model: str, request: Request):
    lookup(request, model, None)
    versions = request.app.state.registry.versions[model]
    return stats_response(request, [versions[v] for v in sorted(versions)])


@router.get("/models/{model}/versions/{version}/stats", responses=ERRORS)
async def model_version_stats(model: str, version: str, request: Request):
    return stats_response(request, [lookup(request, model, parse_version(version))])


@router.get("/models/{model}/config", responses=ERRORS)
async def get_config(model: str, request: Request):
    return model_config(request, lookup(request, model, None))


@router.get("/models/{model}/versions/{version}/config", responses=ERRORS)
async def get_version_config(model: str, version: str, request: Request):
    return model_config(request, lookup(request, model, parse_version(version)))


@router.post("/repository/index", responses=ERRORS)
async def repository_index(request: Request):
    """Every version on disk: READY when serving, UNAVAILABLE with the reason when it failed.
    The optional body {"ready": true} lists only the ready ones."""
    raw = await request.body()
    ready_only = False
    if raw.strip():
        from app.http_body import parse_json

        payload = parse_json(raw)
        if not isinstance(payload, dict) or not isinstance(payload.get("ready", False), bool):
            raise RequestError(400, "ready", "the body is {} or {\"ready\": true|false}")
        ready_only = payload.get("ready", False)
    registry = request.app.state.registry
    index = [{"name": m.name, "version": str(m.version), "state": "READY", "reason": ""}
             for m in registry.all_loaded()]
    if not ready_only:
        for key, reason in registry.errors.items():
            name, version = key.split("/")
            index.append({"name": name, "version": version, "state": "UNAVAILABLE", "reason": reason})
    return JSONResponse(sorted(index, key=lambda e: (e["name"], int(e["version"]))))


@router.post("/repository/models/{model}/load", responses=ERRORS, dependencies=[Depends(require_api_key)])
async def repository_load(model: str, request: Request):
    """Triton's load: here a reload of the model's folder (new or changed versions swap in once
    verified; see /v1/models/M/reload for the report)."""
    registry = request.app.state.registry
    report = await registry.reload(model)
    if not (report.loaded or report.unchanged or report.failed or report.removed):
        raise RequestError(404, "model", f"no model named {model!r} in the model folder", "not_found")
    if model not in registry.versions:
        raise RequestError(400, "model", f"model {model!r} did not load: {report.failed}", "load_failed")
    return {}
