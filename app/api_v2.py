"""The /v2 API: the Open Inference Protocol (KServe v2) as Triton serves it, so `tritonclient.http`
and other KServe clients work unchanged.

Inputs: `text` (and `text_pair` for pair models), BYTES, shape [N]. Outputs: `label` BYTES [N],
`label_id` INT64 [N], `probabilities` FP32 [N, classes], `exit_layer` INT32 [N], `uncertainty`
FP32 [N]. Request parameters: `threshold`, `min_layers`, `max_layers`, `policy`, `patience`,
`timeout_ms`, `task` (as in /v1),
plus Triton's `binary_data_output`, `timeout` (microseconds) and `priority` (accepted, ignored).
A multi-task model takes the inputs of the request's `task`, and its outputs add `score` FP32 [N]
(the label's probability, or a regression task's score: its rows' label is "", label_id -1 and
probabilities [N, 1] the score); its metadata's `parameters.tasks` lists the tasks.

Triton's binary tensor data extension is supported both ways: with the request header
`Inference-Header-Content-Length: N` the body is N bytes of JSON followed by the raw tensors of
the inputs that declare `"parameters": {"binary_data_size": K}`, in input order (BYTES elements
each a 4-byte little-endian length and the UTF-8 bytes); outputs asked for with
`"binary_data": true` (or every output, with the request parameter `binary_data_output`) come
back the same way. Request bodies may be gzip or deflate compressed (`Content-Encoding`).

Errors are JSON with an "error" message naming the field (Triton's shape, plus /v1's
"error_type" and "field"): 400 for a request that does not fit the model, 404 for an unknown
model or version, and the shared 401/413/429/503/504 of the classification service.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from app import http_body
from app.api_v2_types import (
    ERRORS,
    EXTENSIONS,
    HEADER_LENGTH,
    INFER_BODY,
    INFER_RESPONSES,
    ModelMetadata,
    ServerMetadata,
    TensorMetadata,
)
from app.auth import require_api_key
from app.api_v2_request import (
    InferRequest,
    as_v2_error,
    bad,
    input_names,
    parse_json,
    parse_request,
    split_body,
)
from app.registry import LoadedModel
from app.schemas import ErrorResponse
from app.service import (
    Classification,
    RequestError,
    admit,
    classify_for_http,
    count_refusal,
    find_model,
    timing_headers,
)

router = APIRouter(prefix="/v2", tags=["v2"])

# -- helpers ---------------------------------------------------------------------------------
def lookup(request: Request, name: str, version: int | None) -> LoadedModel:
    """The loaded model, or the 404 the classification service gives for it."""
    return find_model(request.app.state.registry, name, version)


def parse_version(version: str | None) -> int | None:
    return http_body.parse_version(version, status=400)


def model_metadata(request: Request, model: LoadedModel, version: int | None) -> ModelMetadata:
    versions = [version] if version is not None else sorted(request.app.state.registry.versions[model.name])
    if model.is_generation:  # infer refuses it (400 on model): no outputs to describe, where to go instead
        return ModelMetadata(name=model.name, versions=[str(v) for v in versions], platform="offramp",
                             inputs=[TensorMetadata(name="text", datatype="BYTES", shape=[-1])], outputs=[],
                             parameters={"task": "generation", "generate": f"/v1/models/{model.name}/generate"})
    classes = len(model.manifest.labels) if not model.is_multitask else -1  # per task
    extra = [TensorMetadata(name="score", datatype="FP32", shape=[-1])] if model.is_multitask else []
    return ModelMetadata(
        name=model.name, versions=[str(v) for v in versions], platform="offramp",
        inputs=[TensorMetadata(name=n, datatype="BYTES", shape=[-1]) for n in input_names(model)],
        outputs=[TensorMetadata(name="label", datatype="BYTES", shape=[-1]),
                 TensorMetadata(name="label_id", datatype="INT64", shape=[-1]),
                 TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, classes]),
                 TensorMetadata(name="exit_layer", datatype="INT32", shape=[-1]),
                 TensorMetadata(name="uncertainty", datatype="FP32", shape=[-1]), *extra],
        parameters={"tasks": task_list(model)} if model.is_multitask else None,
    )


def task_list(model: LoadedModel) -> str:
    """A multi-task model's tasks, NAME:KIND[:pair], comma-separated (kind: classification or
    regression; pair: it takes text and text_pair)."""
    return ",".join(f"{t.name}:{t.kind}{':pair' if t.text_pair else ''}" for t in model.manifest.tasks)


# -- response --------------------------------------------------------------------------------
def output_tensors(result: Classification) -> dict[str, tuple[str, list[int], np.ndarray | list[bytes]]]:
    rows = result.result
    head = result.task_head
    labels = head.labels if head is not None else result.model.manifest.labels
    # A multi-task row's columns are its task's (one, the score, for a regression task).
    width = head.width if head is not None else len(labels)
    probabilities = np.ascontiguousarray(rows.probabilities[:, :width], dtype=np.float32)
    n = len(rows.exit_layer)
    if head is not None and head.kind == "regression":
        label_id = np.full(n, -1, dtype=np.int64)
        names, score = [b""] * n, probabilities[:, 0]
    else:
        label_id = probabilities.argmax(axis=1).astype(np.int64)
        names, score = [labels[i].encode("utf-8") for i in label_id.tolist()], probabilities.max(axis=1)
    return {
        "label": ("BYTES", [n], names),
        "label_id": ("INT64", [n], label_id),
        "probabilities": ("FP32", list(probabilities.shape), probabilities),
        "exit_layer": ("INT32", [n], np.asarray(rows.exit_layer, dtype=np.int32)),
        "uncertainty": ("FP32", [n], np.asarray(rows.uncertainty, dtype=np.float32)),
        "score": ("FP32", [n], np.asarray(score, dtype=np.float32)),
    }


LITTLE_ENDIAN = {"INT64": "<i8", "INT32": "<i4", "FP32": "<f4"}


def infer_response(result: Classification, request: InferRequest) -> Response:
    tensors = output_tensors(result)
    outputs, chunks = [], []
    for wanted in request.outputs:
        datatype, shape, data = tensors[wanted.name]
        entry: dict[str, Any] = {"name": wanted.name, "datatype": datatype, "shape": shape}
        if wanted.binary:
            if datatype == "BYTES":
                raw = b"".join(struct.pack("<I", len(b)) + b for b in data)
            else:
                raw = np.ascontiguousarray(data, dtype=LITTLE_ENDIAN[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "BYTES":
            entry["data"] = [b.decode("utf-8") for b in data]
        else:
            entry["data"] = np.asarray(data).reshape(-1).tolist()  # row-major, flat
        outputs.append(entry)
    rows = result.result
    body: dict[str, Any] = {"model_name": result.model.name, "model_version": str(result.model.version)}
    if request.id is not None:
        body["id"] = request.id
    body["parameters"] = {"threshold": result.threshold, "policy": result.policy,
                          **({"task": result.task_head.name} if result.task is not None else {}),
                          **({"patience": result.patience} if result.patience else {}),
                          "layers_executed": rows.layers_executed,
                          "layers_full": len(rows.exit_layer) * result.model.manifest.num_layers,
                          "mean_exit_layer": result.mean_exit_layer}
    if request.ignored_parameters:
        body["parameters"]["ignored_parameters"] = ",".join(request.ignored_parameters)
    body["outputs"] = outputs
    header = json.dumps(body, separators=(",", ":")).encode()
    headers = timing_headers(result)
    if not any(o.binary for o in request.outputs):
        return Response(header, media_type="application/json", headers=headers)
    headers[HEADER_LENGTH] = str(len(header))
    return Response(header + b"".join(chunks), media_type="application/octet-stream", headers=headers)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    app = request.app
    try:
        number = parse_version(version)
        admit(request, name, number, "v2")  # before the body is read (counted there)
    except RequestError as exc:
        raise as_v2_error(exc) from exc
    try:
        model = lookup(request, name, number)
        body = await http_body.read_body(request, app.state.settings.max_body_bytes)
        header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
        parsed = await http_body.off_the_loop(len(body), lambda: parse_request(
            parse_json(header), binary, model, app.state.settings))
    except RequestError as exc:
        # Counted like the service counts its own refusals (the service never saw this one).
        count_refusal(request, name, number, "v2", exc.status)
        raise as_v2_error(exc) from exc
    try:
        result = await classify_for_http(request, name, number, parsed.texts, "v2", parsed.threshold,
                                         parsed.min_layers, parsed.max_layers, parsed.timeout_ms,
                                         parsed.policy, parsed.patience, parsed.max_accuracy_drop, parsed.task)
    except RequestError as exc:
        raise as_v2_error(exc, parsed) from exc
    return infer_response(result, parsed)


# -- routes ----------------------------------------------------------------------------------
@router.get("", response_model=ServerMetadata)
async def server_metadata(request: Request):
    return ServerMetadata(name="offramp", version=request.app.version, extensions=EXTENSIONS)


@router.get("/health/live")
async def live():
    return {"live": True}


@router.get("/health/ready", responses={503: {"model": ErrorResponse}})
async def ready(request: Request):
    """Ready when a model is loaded and the server is not shutting down (as /health/ready)."""
    if request.app.state.draining:
        return JSONResponse({"ready": False, "error": "shutting down"}, status_code=503)
    if request.app.state.registry.default_name is None:
        return JSONResponse({"ready": False, "error": "no model loaded"}, status_code=503)
    return {"ready": True}


def _model_ready(request: Request, name: str, version: str | None):
    lookup(request, name, parse_version(version))
    if request.app.state.draining:
        raise bad("model", "shutting down", 503, "unavailable")
    return {"name": name, "ready": True}


@router.get("/models/{model}/ready", responses=ERRORS)
async def model_ready(model: str, request: Request):
    return _model_ready(request, model, None)


@router.get("/models/{model}/versions/{version}/ready", responses=ERRORS)
async def model_version_ready(model: str, version: str, request: Request):
    return _model_ready(request, model, version)


@router.get("/models/{model}", response_model=ModelMetadata, responses=ERRORS)
async def get_model_metadata(model: str, request: Request):
    return model_metadata(request, lookup(request, model, None), None)


@router.get("/models/{model}/versions/{version}", response_model=ModelMetadata, responses=ERRORS)
async def get_model_version_metadata(model: str, version: str, request: Request):
    number = parse_version(version)
    return model_metadata(request, lookup(request, model, number), number)


@router.post("/models/{model}/infer", responses=INFER_RESPONSES, openapi_extra=INFER_BODY,
             dependencies=[Depends(require_api_key)])
async def infer(model: str, request: Request):
    return await _infer(request, model, None)


@router.post("/models/{model}/versions/{version}/infer", responses=INFER_RESPONSES, openapi_extra=INFER_BODY,
             dependencies=[Depends(require_api_key)])
async def infer_version(model: str, version: str, request: Request):
    return await _infer(request, model, version)
