"""/v1 generate: a generation model's texts, with the decoder layer every token left at.

The same order of refusals as predict (app/api_v1.py): the key (a dependency), then admission
before the body is read (unknown model, a classifier, overload, drain), then the body, parsed
strictly into GenerateRequest, then the service (app/generation_service.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from app.api_v1 import ERRORS
from app.auth import require_api_key
from app.generation_service import Generation, generate_for_http
from app.http_body import off_the_loop, parse_model, parse_version, read_body
from app.schemas import GeneratedText, GenerateRequest, GenerateResponse, Timing
from app.service import RequestError, admit, count_refusal, timing_headers

router = APIRouter(prefix="/v1", tags=["v1"])

GENERATE_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/GenerateRequest"}}}}}
GENERATE = dict(response_model=GenerateResponse, response_model_exclude_none=True, responses=ERRORS,
                openapi_extra=GENERATE_BODY, dependencies=[Depends(require_api_key)])


def to_response(result: Generation) -> GenerateResponse:
    manifest = result.model.manifest
    outputs = [GeneratedText(text=o.text, tokens=list(o.tokens), exit_layers=[int(x) for x in o.exit_layers],
                             mean_exit_layer=float(o.mean_exit_layer), truncated=bool(result.batch.truncated[i]))
               for i, o in enumerate(result.outputs)]
    truncated = [i for i, o in enumerate(outputs) if o.truncated]
    warnings = ([f"inputs{truncated} longer than {manifest.max_seq_length} tokens were truncated"]
                if truncated else [])
    return GenerateResponse(
        model=result.model.name, threshold=result.threshold, max_new_tokens=result.max_new_tokens,
        num_beams=result.num_beams, no_repeat_ngram_size=result.no_repeat_ngram_size, outputs=outputs,
        layers_executed=sum(result.exit_layers), layers_full=manifest.num_layers, warnings=warnings,
        timing_ms=Timing(tokenize=result.tokenize_s * 1e3, queue=result.queue_s * 1e3,
                         inference=result.inference_s * 1e3, total=result.total_s * 1e3))


async def _generate(request: Request, response: Response, model: str, version: str | None) -> GenerateResponse:
    number = parse_version(version)
    admit(request, model, number, "v1", generation=True)
    try:
        raw = await read_body(request, request.app.state.settings.max_body_bytes)
        body = await off_the_loop(len(raw), parse_model, raw, GenerateRequest)
    except RequestError as exc:
        count_refusal(request, model, number, "v1", exc.status)
        raise
    result = await generate_for_http(request, model, number, body.inputs, body.max_new_tokens, body.num_beams,
                                     body.threshold, body.no_repeat_ngram_size, body.timeout_ms)
    response.headers.update(timing_headers(result))
    return to_response(result)


@router.post("/models/{model}/generate", **GENERATE)
async def generate(model: str, request: Request, response: Response):
    return await _generate(request, response, model, None)


@router.post("/models/{model}/versions/{version}/generate", **GENERATE)
async def generate_version(model: str, version: str, request: Request, response: Response):
    return await _generate(request, response, model, version)
