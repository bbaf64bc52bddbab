"""The /v1 API: per-request thresholds, the exit layer of every row, model admin."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from app.auth import require_api_key
from app.registry import LoadedModel
from app.schemas import (
    CalibrationInfo,
    ErrorResponse,
    GenerationInfo,
    ModelInfo,
    ModelList,
    PolicyTable,
    Prediction,
    PredictRequest,
    PredictResponse,
    ReloadResponse,
    StageInfo,
    TaskInfo,
    Timing,
)
from app.http_body import off_the_loop, parse_model, parse_version, read_body
from app.service import (
    Classification,
    RequestError,
    admit,
    classify_for_http,
    count_refusal,
    resolve_task,
    timing_headers,
)

router = APIRouter(prefix="/v1", tags=["v1"])
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 415, 422, 429, 503, 504)}


def model_info(request: Request, model: LoadedModel) -> ModelInfo:
    registry = request.app.state.registry
    m = model.manifest
    return ModelInfo(name=model.name, task=m.task, generation=generation_info(request, model),
                     version=model.version, versions=sorted(registry.versions[model.name]),
                     labels=m.labels, layers=m.num_layers, text_pair=m.text_pair,
                     max_seq_length=m.max_seq_length, recommended_threshold=m.recommended_threshold,
                     exit_head=m.exit_head, default=model.name == registry.default_name,
                     stages=None if not m.stages else [
                         StageInfo(name=s.name, layers=s.num_layers, first_layer=s.first_layer,
                                   exit_head=s.exit_head, max_seq_length=s.max_seq_length) for s in m.stages],
                     tasks=None if m.tasks is None else [
                         TaskInfo(name=t.name, kind=t.kind, labels=t.labels, text_pair=t.text_pair, metric=t.metric,
                                  score_range=None if t.score_range is None else list(t.score_range),
                                  recommended_threshold=t.recommended_threshold,
                                  recommended_patience=t.recommended_patience) for t in m.tasks])


def generation_info(request: Request, model: LoadedModel) -> GenerationInfo | None:
    g = model.manifest.generation
    if g is None:
        return None
    from app.generation_service import default_beams, default_new_tokens

    settings = request.app.state.settings
    return GenerationInfo(decoder_layers=model.manifest.num_layers, encoder_layers=g.num_encoder_layers,
                          max_target_length=g.max_target_length, max_new_tokens=default_new_tokens(g),
                          num_beams=default_beams(g, settings), max_beams=settings.max_beams,
                          no_repeat_ngram_size=g.no_repeat_ngram_size, vocab_size=g.vocab_size)


def to_response(result: Classification, return_probabilities: bool) -> PredictResponse:
    manifest, head = result.model.manifest, result.task_head
    labels = head.labels if head is not None else manifest.labels
    regression = head is not None and head.kind == "regression"
    rows = result.result
    predictions = []
    for row in range(len(rows.exit_layer)):
        layer = int(rows.exit_layer[row])
        common = dict(exit_layer=layer, uncertainty=float(rows.uncertainty[row]),
                      truncated=bool(result.batch.truncated[row]))
        if regression:  # the score alone: no label, no probabilities
            predictions.append(Prediction(score=float(rows.probabilities[row, 0]), **common))
            continue
        probs = rows.probabilities[row, :len(labels)]  # a multi-task row: its own task's columns
        best = int(probs.argmax())
        stage = manifest.stage_of(layer)
        predictions.append(Prediction(
            label=labels[best], label_id=best, score=float(probs[best]),
            probabilities={l: float(p) for l, p in zip(labels, probs)} if return_probabilities else None,
            stage=stage[0].name if stage else None, stage_layer=stage[1] if stage else None, **common,
        ))
    truncated = [i for i, t in enumerate(result.batch.truncated) if t]
    warnings = ([f"inputs{truncated} longer than {manifest.max_seq_length} tokens were truncated"]
                if truncated else [])
    return PredictResponse(
        model=result.model.name, task=head.name if head is not None else None, threshold=result.threshold, policy=result.policy, patience=result.patience,
        predictions=predictions,
        layers_executed=rows.layers_executed, layers_full=len(predictions) * manifest.num_layers,
        warnings=warnings,
        timing_ms=Timing(tokenize=result.tokenize_s * 1e3, queue=result.queue_s * 1e3,
                         inference=result.inference_s * 1e3, total=result.total_s * 1e3),
    )


PREDICT_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/PredictRequest"}}}}}
PREDICT = dict(response_model=PredictResponse, response_model_exclude_none=True, responses=ERRORS,
               openapi_extra=PREDICT_BODY, dependencies=[Depends(require_api_key)])


async def _predict(request: Request, response: Response, model: str, version: str | None) -> PredictResponse:
    # The key was checked (a dependency); then the cheapest refusals (admit), and only then is
    # the body read and parsed: a refused request costs next to nothing.
    number = parse_version(version)
    admit(request, model, number, "v1")
    try:
        raw = await read_body(request, request.app.state.settings.max_body_bytes)
        body = await off_the_loop(len(raw), parse_model, raw, PredictRequest)
    except RequestError as exc:
        count_refusal(request, model, number, "v1", exc.status)
        raise
    result = await classify_for_http(request, model, number, body.inputs, "v1", body.threshold,
                                     body.min_layers, body.max_layers, body.timeout_ms, body.policy, body.patience,
                                     body.max_accuracy_drop, body.task)
    response.headers.update(timing_headers(result))
    return to_response(result, body.return_probabilities)


@router.post("/models/{model}/predict", **PREDICT)
async def predict(model: str, request: Request, response: Response):
    return await _predict(request, response, model, None)


@router.post("/models/{model}/versions/{version}/predict", **PREDICT)
async def predict_version(model: str, version: str, request: Request, response: Response):
    return await _predict(request, response, model, version)


@router.post("/predict", **PREDICT)
async def predict_default(request: Request, response: Response):
    name = request.app.state.registry.default_name
    if name is None:
        raise RequestError(503, "model", "no model loaded", "unavailable")
    return await _predict(request, response, name, None)


@router.get("/models", response_model=ModelList)
async def list_models(request: Request):
    registry = request.app.state.registry
    return ModelList(models=[model_info(request, m) for m in registry.models.values()], failed=registry.errors)


@router.get("/models/{model}", response_model=ModelInfo, responses=ERRORS)
async def get_model(model: str, request: Request):
    loaded = request.app.state.registry.get(model)
    if loaded is None:
        raise RequestError(404, "model", f"no model named {model!r}", "not_found")
    return model_info(request, loaded)


@router.get("/models/{model}/calibration", response_model=CalibrationInfo, responses=ERRORS)
async def get_calibration(model: str, request: Request, task: str | None = None):
    """Every exit policy's calibration table and recommended setting (what the playground plots);
    of a multi-task model, those of the task `task` (needed when it serves several). A regression
    task has one table, its one rule's, under `patience` (a threshold and a patience per point).
    A generation model has one, its per-token exit's, under `token_exit` (dev ROUGE per threshold)."""
    loaded = request.app.state.registry.get(model)
    if loaded is None:
        raise RequestError(404, "model", f"no model named {model!r}", "not_found")
    m = loaded.manifest
    if m.generation is not None:
        from app.generation_service import generation_calibration

        return generation_calibration(loaded, task)
    index = resolve_task(loaded, task)
    source = m if index is None else m.tasks[index]
    own = "patience" if index is not None and source.kind == "regression" else "entropy"
    tables = {own: PolicyTable(points=[p.model_dump() for p in source.calibration],
                               recommended_threshold=source.recommended_threshold,
                               recommended_patience=getattr(source, "recommended_patience", None))}
    for name, table in source.policies.items():
        tables.setdefault(name, PolicyTable(points=[p.model_dump() for p in table.points],
                                            recommended_threshold=table.recommended_threshold,
                                            recommended_patience=table.recommended_patience))
    return CalibrationInfo(model=loaded.name, layers=m.num_layers, policies=tables,
                           task=None if index is None else source.name,
                           metric=None if index is None else source.metric,
                           calibration_data=source.calibration_data.model_dump() if source.calibration_data else None)


@router.post("/models/{model}/reload", response_model=ReloadResponse, responses=ERRORS,
             dependencies=[Depends(require_api_key)])
async def reload_model(model: str, request: Request):
    """Load new or changed versions of the model from disk. A version that fails to load or
    verify is reported and the one already serving keeps serving."""
    registry = request.app.state.registry
    report = await registry.reload(model)
    if not (report.loaded or report.unchanged or report.failed or report.removed):
        raise RequestError(404, "model", f"no model named {model!r} in the model folder", "not_found")
    return ReloadResponse(model=model, loaded=report.loaded, unchanged=report.unchanged, failed=report.failed,
                          removed=report.removed, serving=sorted(registry.versions.get(model, {})))
