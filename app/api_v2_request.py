"""The /v2 request, parsed and checked: the JSON header and Triton's binary tensors, the inputs
the model takes, the outputs asked for and the request parameters, each refusal a 400 naming the
field (app/api_v2.py routes it and writes the response)."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

from app import http_body
from app.api_v2_types import (
    HEADER_LENGTH,
    MAX_INTEGER,
    MODEL_PARAMETERS,
    MULTITASK_OUTPUT_NAMES,
    OUTPUT_NAMES,
    REQUEST_KEYS,
    UNSUPPORTED_TENSOR_PARAMETERS,
    USED_PARAMETERS,
)
from app.encoding import TextInput
from app.policies import POLICIES
from app.registry import LoadedModel
from app.service import RequestError, check_inputs, exit_policy, resolve_task


def bad(field_name: str, message: str, status: int = 400, error_type: str = "validation") -> RequestError:
    return RequestError(status, field_name, message, error_type)


def input_names(model: LoadedModel, task: int | None = None) -> list[str]:
    """The inputs of the model, or of its task; a multi-task model's, asked with no task: those
    of any of its tasks."""
    tasks = model.manifest.tasks
    if tasks is not None:
        pair = tasks[task].text_pair if task is not None else any(t.text_pair for t in tasks)
    else:
        pair = model.manifest.text_pair
    return ["text", "text_pair"] if pair else ["text"]


def output_names(model: LoadedModel) -> tuple[str, ...]:
    return MULTITASK_OUTPUT_NAMES if model.is_multitask else OUTPUT_NAMES


def is_int(value: Any) -> bool:
    """An integer in JSON's sense: 3 or 3.0 (JSON Schema's integers), never a boolean."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float):
        return math.isfinite(value) and value.is_integer() and abs(value) <= MAX_INTEGER
    return abs(value) <= MAX_INTEGER


def is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) <= MAX_INTEGER if isinstance(value, int) else math.isfinite(value)


# -- request parsing -------------------------------------------------------------------------
def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) of a request."""
    if header_length is None:
        return body, b""
    if not (header_length.strip().isascii() and header_length.strip().isdigit()):
        raise bad(HEADER_LENGTH, f"{header_length!r} is not a byte count")
    size = int(header_length)
    if size > len(body):
        raise bad(HEADER_LENGTH, f"{size} exceeds the {len(body)} bytes of the body")
    return body[:size], body[size:]


def parse_json(header: bytes) -> dict:
    payload = http_body.parse_json(header)
    if not isinstance(payload, dict):
        raise bad("body", "must be a JSON object with 'inputs'")
    return payload


def flatten(data: Any) -> list:
    """JSON tensor data, flat or nested row-major, as a flat list."""
    if not isinstance(data, list):
        return [data]
    out = []
    for item in data:
        out.extend(flatten(item))
    return out


def tensor_parameters(item: dict, where: str, why: str) -> dict:
    """A tensor's `parameters` object; shared memory and classification are refused (this
    server has neither), any other name is ignored."""
    parameters = {} if item.get("parameters") is None else item["parameters"]
    if not isinstance(parameters, dict):
        raise bad(f"{where}.parameters", "must be an object")
    for key in parameters:
        if key in UNSUPPORTED_TENSOR_PARAMETERS:
            raise bad(f"{where}.parameters.{key}", f"not supported; {why}")
    return parameters


def decode_bytes_tensor(raw: bytes, where: str) -> list[bytes]:
    """Triton's BYTES serialisation: each element a uint32 little-endian length, then its bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise bad(where, f"truncated BYTES element {len(items)}: {len(raw) - offset} bytes left, "
                      "a 4-byte length was expected")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise bad(where, f"BYTES element {len(items)} declares {size} bytes, {len(raw) - offset} remain")
        items.append(raw[offset:offset + size])
        offset += size
    return items


@dataclass
class Tensor:
    name: str
    field: str  # where it is in the request: "inputs[0]"
    shape: list[int]
    texts: list[str]


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    id: str | None
    texts: list[TextInput]
    text_field: str
    threshold: float | None = None
    min_layers: int | None = None
    max_layers: int | None = None
    timeout_ms: float | None = None
    outputs: list[RequestedOutput] = field(default_factory=list)
    policy: str | None = None  # None: the model's (or its task's) default
    patience: int | None = None
    max_accuracy_drop: float | None = None
    task: str | None = None
    ignored_parameters: list[str] = field(default_factory=list)  # echoed, so a typo is visible


def parse_input(item: Any, index: int, binary: bytes, offset: int, names: list[str],
                model: LoadedModel) -> tuple[Tensor, int]:
    """One input tensor, and the offset in the binary data after it."""
    where = f"inputs[{index}]"
    if not isinstance(item, dict):
        raise bad(where, "must be an object with name, shape, datatype and data")
    name = item.get("name")
    if not isinstance(name, str):
        raise bad(f"{where}.name", "a string is required")
    if name not in names:
        raise bad(f"{where}.name", f"unexpected inference input {name!r} for model {model.name!r}; "
                  f"its inputs are {names}")
    unknown = sorted(set(item) - {"name", "shape", "datatype", "data", "parameters"})
    if unknown:
        raise bad(f"{where}.{unknown[0]}", "unknown field; an input has name, shape, datatype, data, parameters")
    datatype = item.get("datatype")
    if datatype != "BYTES":
        raise bad(f"{where}.datatype", f"input {name!r} has datatype BYTES, not {datatype!r}")
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise bad(f"{where}.shape", f"a list of non-negative integers is required, not {shape!r}")
    shape = [int(d) for d in shape]
    if len(shape) != 1:
        raise bad(f"{where}.shape", f"input {name!r} has shape [-1] (one dimension, one row per text), "
                  f"not {shape}")
    count = shape[0]
    parameters = tensor_parameters(item, where, "inputs come in the body (JSON or binary_data_size), "
                                   "not in shared memory")
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not is_int(size) or size < 0:
            raise bad(f"{where}.parameters.binary_data_size", f"a non-negative integer is required, not {size!r}")
        size = int(size)
        if "data" in item:
            raise bad(f"{where}.data", "give either data or parameters.binary_data_size, not both")
        if offset + size > len(binary):
            raise bad(f"{where}.parameters.binary_data_size",
                      f"{size} bytes, but only {len(binary) - offset} bytes of binary data are left "
                      f"(is the {HEADER_LENGTH} header right?)")
        elements = decode_bytes_tensor(binary[offset:offset + size], f"{where}.parameters.binary_data_size")
        offset += size
        texts = []
        for i, element in enumerate(elements):
            try:
                texts.append(element.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise bad(f"{where}.data[{i}]", f"not UTF-8 text: {exc}") from exc
    else:
        if "data" not in item:
            raise bad(f"{where}.data", f"input {name!r} has no data (and no parameters.binary_data_size)")
        if not isinstance(item["data"], list):
            raise bad(f"{where}.data", f"a list of strings (flat or nested row-major) is required, not "
                      f"{type(item['data']).__name__}")
        texts = flatten(item["data"])
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise bad(f"{where}.data[{i}]", f"BYTES data in JSON are strings, not {type(text).__name__}")
    if len(texts) != count:
        raise bad(f"{where}.shape", f"shape {shape} holds {count} elements but {len(texts)} were given")
    return Tensor(name, where, shape, texts), offset


def parse_outputs(value: Any, default_binary: bool, names: tuple[str, ...] = OUTPUT_NAMES) -> list[RequestedOutput]:
    if value is None or value == []:
        return [RequestedOutput(name, default_binary) for name in names]
    if not isinstance(value, list):
        raise bad("outputs", "a list of {name, parameters} objects is required")
    outputs, seen = [], set()
    for index, item in enumerate(value):
        where = f"outputs[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad(f"{where}.name", "an object with a string name is required")
        name = item["name"]
        if name in MULTITASK_OUTPUT_NAMES and name not in names:
            raise bad(f"{where}.name", f"output {name!r} is a multi-task model's; the outputs are {list(names)}")
        if name not in names:
            raise bad(f"{where}.name", f"unexpected inference output {name!r}; the outputs are {list(OUTPUT_NAMES)}")
        if name in seen:
            raise bad(f"{where}.name", f"output {name!r} is requested twice")
        seen.add(name)
        parameters = tensor_parameters(item, where, "outputs come in the body (JSON or binary_data); "
                                       "use the label and probabilities outputs rather than classification")
        binary = default_binary if parameters.get("binary_data") is None else parameters["binary_data"]
        if not isinstance(binary, bool):
            raise bad(f"{where}.parameters.binary_data", f"true or false, not {binary!r}")
        outputs.append(RequestedOutput(name, binary))
    return outputs


def parse_request(payload: dict, binary: bytes, model: LoadedModel, settings) -> InferRequest:
    unknown = sorted(set(payload) - set(REQUEST_KEYS))
    if unknown:
        raise bad(unknown[0], f"unknown field; a request has {', '.join(REQUEST_KEYS)}")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad("id", f"a string is required, not {request_id!r}")

    parameters = {} if payload.get("parameters") is None else payload["parameters"]
    if not isinstance(parameters, dict):
        raise bad("parameters", "must be an object")
    layers = model.manifest.num_layers
    threshold = parameters.get("threshold")
    if threshold is not None and not (is_number(threshold) and 0.0 <= threshold <= 1.0):
        raise bad("parameters.threshold", f"a number in [0, 1] is required, not {threshold!r}")
    for key in ("min_layers", "max_layers"):
        value = parameters.get(key)
        if value is not None and not (is_int(value) and 1 <= value <= layers):
            raise bad(f"parameters.{key}", f"an integer in the model's layers 1..{layers} is required, "
                      f"not {value!r}")
    min_layers, max_layers = (None if parameters.get(k) is None else int(parameters[k])
                              for k in ("min_layers", "max_layers"))
    if min_layers is not None and max_layers is not None and min_layers > max_layers:
        raise bad("parameters.min_layers", f"{min_layers} exceeds max_layers {max_layers}")
    policy = parameters.get("policy")
    if policy is not None and policy not in POLICIES:
        raise bad("parameters.policy", f"one of {list(POLICIES)} is required, not {policy!r}")
    patience = parameters.get("patience")
    if patience is not None and not (is_int(patience) and patience >= 1):
        raise bad("parameters.patience", f"an integer >= 1 is required, not {patience!r}")
    budget = parameters.get("max_accuracy_drop")
    if budget is not None and not (is_number(budget) and 0 <= budget <= 100):
        raise bad("parameters.max_accuracy_drop", f"a number of points in [0, 100] is required, not {budget!r}")
    timeout_ms = parameters.get("timeout_ms")
    if timeout_ms is not None and not (is_number(timeout_ms) and timeout_ms > 0):
        raise bad("parameters.timeout_ms", f"a positive number of milliseconds is required, not {timeout_ms!r}")
    timeout_us = parameters.get("timeout")  # Triton's, in microseconds
    if timeout_us is not None and not (is_int(timeout_us) and timeout_us >= 0):
        raise bad("parameters.timeout", f"a non-negative integer of microseconds is required, not {timeout_us!r}")
    if timeout_ms is None and timeout_us:
        timeout_ms = timeout_us / 1000
    priority = parameters.get("priority")
    if priority is not None and not (is_int(priority) and priority >= 0):
        raise bad("parameters.priority", f"a non-negative integer is required, not {priority!r}")
    default_binary = False if parameters.get("binary_data_output") is None else parameters["binary_data_output"]
    if not isinstance(default_binary, bool):
        raise bad("parameters.binary_data_output", f"true or false, not {default_binary!r}")
    task = parameters.get("task")
    if task is not None and not (isinstance(task, str) and task):
        raise bad("parameters.task", f"a task name (a string) is required, not {task!r}")
    try:
        task_id = resolve_task(model, task)  # before the inputs: a task says which it takes
    except RequestError as exc:
        raise as_v2_error(exc) from exc

    names = input_names(model, task_id)
    inputs = payload.get("inputs")
    if not isinstance(inputs, list):
        raise bad("inputs", f"a list of input tensors is required; model {model.name!r} takes {names}")
    tensors: dict[str, Tensor] = {}
    offset = 0
    for index, item in enumerate(inputs):
        tensor, offset = parse_input(item, index, binary, offset, names, model)
        if tensor.name in tensors:
            raise bad(f"{tensor.field}.name", f"input {tensor.name!r} is given twice")
        tensors[tensor.name] = tensor
    if offset != len(binary):
        raise bad(HEADER_LENGTH, f"{len(binary) - offset} bytes of binary data after the JSON header "
                  "belong to no input's binary_data_size")
    missing = [n for n in names if n not in tensors]
    if missing:
        raise bad("inputs", f"model {model.name!r} needs the input{'s' if len(missing) > 1 else ''} "
                  f"{missing} (BYTES, shape [-1])")
    text = tensors["text"]
    if "text_pair" in names:
        pair = tensors["text_pair"]
        if pair.shape != text.shape:
            raise bad(f"{pair.field}.shape", f"{pair.shape} differs from the shape of 'text' {text.shape}")
        texts: list[TextInput] = [list(p) for p in zip(text.texts, pair.texts)]
    else:
        texts = list(text.texts)
    outputs = parse_outputs(payload.get("outputs"), default_binary, output_names(model))
    ignored = sorted(str(key) for key in parameters if key not in USED_PARAMETERS)
    request = InferRequest(request_id, texts, text.field, threshold, min_layers, max_layers, timeout_ms, outputs,
                           policy, None if patience is None else int(patience),
                           None if budget is None else float(budget), task, ignored)
    try:
        check_inputs(model, texts, settings, min_layers, max_layers, task_id)
        exit_policy(model, policy, threshold, request.patience, request.max_accuracy_drop, task_id)
    except RequestError as exc:
        raise as_v2_error(exc, request) from exc
    return request


def as_v2_error(exc: RequestError, request: InferRequest | None = None) -> RequestError:
    """A classification-service error with /v2's field names (and 400 for its 422s)."""
    message = str(exc).removeprefix(f"{exc.field}: ")
    name = exc.field
    if request is not None and name == "inputs":
        name = request.text_field
    elif request is not None and name.startswith("inputs["):  # a row: inputs[3] -> inputs[0].data[3]
        name = f"{request.text_field}.data{name[len('inputs'):]}"
    elif name in MODEL_PARAMETERS:
        name = f"parameters.{name}"
    return RequestError(400 if exc.status == 422 else exc.status, name, message, exc.error_type)
