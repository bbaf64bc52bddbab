"""The Open Inference Protocol's wire vocabulary as this server speaks it: tensor and parameter
names, the metadata types and the infer body's JSON schema (its OpenAPI document). The routes
that read and write it are app/api_v2.py."""

from __future__ import annotations

from pydantic import BaseModel

from app.schemas import ErrorResponse

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 415, 429, 503, 504)}

EXTENSIONS = ["binary_tensor_data", "parameters"]
HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUT_NAMES = ("label", "label_id", "probabilities", "exit_layer", "uncertainty")
# A multi-task model's outputs add `score` (FP32 [N]): the predicted label's probability, or a
# regression task's score (whose rows have label "" and label_id -1).
MULTITASK_OUTPUT_NAMES = OUTPUT_NAMES + ("score",)
# Request parameters read: ours, then Triton's own (tritonclient sends binary_data_output, timeout,
# priority). Any other (sequence_id, headers, a client's own) is accepted and ignored, as Triton does.
MODEL_PARAMETERS = ("threshold", "min_layers", "max_layers", "timeout_ms", "policy", "patience",
                    "max_accuracy_drop", "task")
USED_PARAMETERS = MODEL_PARAMETERS + ("binary_data_output", "timeout", "priority")
# Tensor parameters this server cannot honour: refused, since ignoring them would answer wrongly.
UNSUPPORTED_TENSOR_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset",
                                 "classification")
REQUEST_KEYS = ("id", "inputs", "outputs", "parameters")


# -- metadata types (the OpenAPI document of the GET routes) ---------------------------------
class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    # A multi-task model's `tasks`: NAME:KIND[:pair], comma-separated (app/api_v2_repository.py)
    parameters: dict[str, str] | None = None


# Integers past this are no count, size or time this server could mean (and past 2**1023 no
# float either): refused as out of range rather than overflowing.
MAX_INTEGER = 2**53
_TEXTS = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}


def _optional(schema: dict) -> dict:
    """null is taken as absent, as everywhere in this server."""
    return {**schema, "type": [schema["type"], "null"]}


INFER_REQUEST_SCHEMA = {
    "type": "object", "required": ["inputs"], "additionalProperties": False,
    "properties": {
        "id": _optional({"type": "string"}),
        "inputs": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "required": ["name", "shape", "datatype", "data"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "enum": ["text", "text_pair"],
                                    "description": "text_pair only for pair models (or pair tasks)"},
                           "shape": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": MAX_INTEGER},
                                     "minItems": 1, "maxItems": 1, "description": "[number of texts]"},
                           "datatype": {"type": "string", "enum": ["BYTES"]},
                           "data": _TEXTS,
                           "parameters": _optional({"type": "object"})}}},
        "outputs": _optional({"type": "array", "items": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "enum": list(MULTITASK_OUTPUT_NAMES),
                                    "description": "score: multi-task models only"},
                           "parameters": _optional({"type": "object",
                                                    "properties": {"binary_data": _optional({"type": "boolean"})}})}}}),
        "parameters": _optional({
            "type": "object", "description": "others (sequence_id, ...) are accepted and ignored",
            "properties": {
                "threshold": _optional({"type": "number", "minimum": 0, "maximum": 1}),
                "min_layers": _optional({"type": "integer", "minimum": 1, "maximum": MAX_INTEGER}),
                "max_layers": _optional({"type": "integer", "minimum": 1, "maximum": MAX_INTEGER}),
                "policy": _optional({"type": "string", "enum": ["entropy", "max_prob", "patience"]}),
                "patience": _optional({"type": "integer", "minimum": 1, "maximum": MAX_INTEGER}),
                "max_accuracy_drop": _optional({"type": "number", "minimum": 0, "maximum": 100}),
                "task": _optional({"type": "string", "minLength": 1,
                                   "description": "multi-task models: the task (required when several)"}),
                "timeout_ms": _optional({"type": "number", "exclusiveMinimum": 0}),
                "timeout": _optional({"type": "integer", "minimum": 0, "maximum": MAX_INTEGER,
                                     "description": "microseconds (Triton's)"}),
                "priority": _optional({"type": "integer", "minimum": 0, "maximum": MAX_INTEGER}),
                "binary_data_output": _optional({"type": "boolean"})}}),
    },
}
INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": f"JSON; or, with the binary tensor data extension, {HEADER_LENGTH} bytes of this "
                       "JSON followed by the raw input tensors (tritonclient does this)",
        "content": {
            "application/json": {
                "schema": INFER_REQUEST_SCHEMA,
                "example": {
                    "id": "42",
                    "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                                "data": ["a gripping, beautifully acted film", "dull"]}],
                    "parameters": {"threshold": 0.3},
                    "outputs": [{"name": "label"}, {"name": "exit_layer"}],
                },
            },
        },
    }
}
INFER_RESPONSES = {**ERRORS, 200: {"description": "the outputs: JSON, or JSON then raw tensors for "
                                                  "outputs asked as binary_data",
                                   "content": {"application/json": {"schema": {"type": "object"}},
                                               "application/octet-stream": {
                                                   "schema": {"type": "string", "format": "binary"}}}}}
