"""The OpenAPI document as the server really behaves: what FastAPI cannot see from the routes
(bodies the routes read themselves, path parameters' real form, the statuses of the one error
shape) is written in here, once."""

from __future__ import annotations

from app.schemas import GenerateRequest, PredictRequest

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
VERSION_PATTERN = "^[0-9]+$"


def complete(schema: dict) -> dict:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    # /v1 reads its bodies itself (after the API key and admission): its schema is added here.
    for body in (PredictRequest, GenerateRequest):
        request_schema = body.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(request_schema.pop("$defs", {}))
        components[body.__name__] = request_schema
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter.get("name") == "version":
                    parameter["schema"] = {"type": "string", "pattern": VERSION_PATTERN, "title": "Version"}
            responses = operation.get("responses", {})
            validation = responses.get("422", {}).get("content", {}).get("application/json", {})
            if validation.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                # FastAPI's own 422 shape is never sent: /v2 answers 400, /v1 the one error shape.
                if path.startswith("/v2"):
                    del responses["422"]
                else:
                    responses["422"] = {"description": "Validation Error",
                                        "content": {"application/json": {"schema": ERROR_REF}}}
    for name in ("HTTPValidationError", "ValidationError"):
        if not any(name in str(ops) for ops in schema.get("paths", {}).values()):
            components.pop(name, None)
    return schema
