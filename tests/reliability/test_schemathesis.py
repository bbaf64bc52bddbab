"""Schemathesis over the server's own OpenAPI document: every operation, positive and negative
data, a fixed seed and example budget, the built-in checks and the server's error contract.

What must hold for every request:
- no 500 (nor any other 5xx the request did not ask for: 504 only for a request that set a
  deadline; the server is never shutting down or overloaded here);
- every status is documented for its operation, with the documented content type and a body
  that conforms to the documented schema (`/metrics` is Prometheus text);
- every 4xx/5xx is JSON in the one error shape {"error": str, "error_type": str,
  "field": str | null} (/v2: Triton's "error", and this server's error_type and field too);
- schema-valid requests are accepted, schema-invalid ones refused (schemathesis' positive and
  negative data checks);
- without the API key, every protected operation answers 401 in that shape.

Three passes over every operation: with the served model's name fixed in the path (so that the
coverage phase's boundary bodies reach the model), with mostly-served, sometimes random names
(the 404s), and without the key (401s). Then a few requests the generator cannot build
(binary tensors, compressed and oversized bodies), through the same checks.

Run alone: `pytest tests/reliability/test_schemathesis.py` (its own server; 20-45 s on 2
cores, the tiny bundle's training included).
"""

from __future__ import annotations

import gzip
import os
import json
import re
import struct
from collections import Counter, defaultdict

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck
from schemathesis.core import NOT_SET
from schemathesis.openapi.checks import RejectedPositiveData

SEED = 20260101
# per operation and pass, in the fuzzing phase (the examples and coverage phases add theirs);
# OFFRAMP_FUZZ_EXAMPLES=600 for a long run outside CI
MAX_EXAMPLES = int(os.environ.get("OFFRAMP_FUZZ_EXAMPLES", "60"))
UNAUTHENTICATED_EXAMPLES = 10
MODEL, VERSION = "tiny", "1"  # what the reliability server serves
# Operations behind the API key (docs/serving.md: predict, infer, reload and load).
PROTECTED = {
    ("POST", "/v1/predict"),
    ("POST", "/v1/models/{model}/predict"),
    ("POST", "/v1/models/{model}/versions/{version}/predict"),
    ("POST", "/v1/models/{model}/reload"),
    ("POST", "/v2/models/{model}/infer"),
    ("POST", "/v2/models/{model}/versions/{version}/infer"),
    ("POST", "/v2/repository/models/{model}/load"),
    ("POST", "/v1/models/{model}/generate"),
    ("POST", "/v1/models/{model}/versions/{version}/generate"),
}
# Body keys that may make a request answer 504: its own deadline (/v1 timeout_ms; /v2
# parameters.timeout_ms, or Triton's parameters.timeout in microseconds).
DEADLINE_KEYS = ("timeout_ms", "timeout")
HYPOTHESIS = dict(deadline=None, derandomize=True, database=None, print_blob=False,
                  # Every example is an HTTP request to one server: slow ones and filtered
                  # ones are expected, not a generator's fault.
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                         HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])


def config(*, max_examples: int, model_in_path: str, coverage: bool = True) -> schemathesis.Config:
    """model_in_path: "fixed" (always the served model), or "mostly" (the served model in 3 of
    4 generated paths, random names otherwise)."""
    parameters = ({"path.model": MODEL} if model_in_path == "fixed"
                  else {"path.model": {"dictionary": "models", "probability": 0.75}})
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "dictionaries": {"models": {"values": [MODEL]}, "versions": {"values": [VERSION]}},
        "parameters": {**parameters, "path.version": {"dictionary": "versions", "probability": 0.5}},
        "generation": {
            "mode": "all",  # positive and negative data
            "max-examples": max_examples,
            "deterministic": True,  # derandomised, and no example database between runs
        },
        "phases": {
            "examples": {"enabled": True},
            "coverage": {"enabled": coverage},
            "fuzzing": {"enabled": True},
            "stateful": {"enabled": False},
        },
        "checks": {
            # Every built-in check runs (the default); these are what this suite is about.
            "status_code_conformance": {"enabled": True},
            "content_type_conformance": {"enabled": True},
            "response_schema_conformance": {"enabled": True},
            # A 504 is the documented answer to a request's own deadline (timeout_ms: "504
            # instead of a late answer"): allowed here, and checked more strictly by
            # `no_unasked_server_error` below (504 only where the request set a deadline;
            # never 500, 502 or 503).
            "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "504"]},
            # Schema-valid data may cross the server's limits (OFFRAMP_MAX_INPUTS,
            # _MAX_TEXT_CHARS, _MAX_BODY_BYTES: settings, so not in the schema), answered with
            # the 413 documented on every operation that reads a body. Otherwise schemathesis'
            # default list.
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "3xx", "401", "403", "404", "409", "413", "429", "5xx"]},
        },
    })


# -- the server's error contract, as checks ------------------------------------------------
def _body_json(response):
    try:
        return json.loads(response.content)
    except ValueError:
        return None


def one_error_shape(ctx, response, case):
    """Every 4xx/5xx is a JSON object with an "error" string, and "error_type" (string) and
    "field" (string or null): /v1, health, routing, limits and /v2 alike."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0].split(";")[0].strip()
    assert content_type == "application/json", (
        f"{response.status_code} with content type {content_type!r}, not application/json: {response.text[:300]!r}")
    body = _body_json(response)
    assert isinstance(body, dict), f"{response.status_code} body is not a JSON object: {response.text[:300]!r}"
    assert isinstance(body.get("error"), str) and body["error"], f"no 'error' string in {body!r}"
    if case.path == "/v2/health/ready":  # Triton's readiness answer: {"ready": false, "error": ...}
        return None
    assert isinstance(body.get("error_type"), str), f"no 'error_type' string in {body!r}"
    assert "field" in body and (body["field"] is None or isinstance(body["field"], str)), (
        f"no 'field' (string or null) in {body!r}")
    return None


def _sets_deadline(case) -> bool:
    body = case.body if isinstance(case.body, dict) else {}
    places = [body, body.get("parameters") if isinstance(body.get("parameters"), dict) else {}]
    return any(key in place for place in places for key in DEADLINE_KEYS)


def no_unasked_server_error(ctx, response, case):
    """No 5xx but a 504 for a request that set its own deadline."""
    if response.status_code < 500:
        return None
    assert response.status_code == 504 and _sets_deadline(case), (
        f"server error {response.status_code} for a request that did not ask for it: {response.text[:300]!r}")
    return None


def unauthorized(ctx, response, case):
    """Without the key, a protected operation answers 401 with WWW-Authenticate: Bearer."""
    assert response.status_code == 401, f"{response.status_code} without the API key: {response.text[:300]!r}"
    assert response.headers.get("www-authenticate", [""])[0].lower().startswith("bearer"), response.headers
    body = _body_json(response)
    assert body.get("error_type") == "unauthorized" and body.get("field") == "authorization", body
    return None


OWN_CHECKS = [one_error_shape, no_unasked_server_error]

# /v1's PredictRequest is one schema for every model, so schema-valid inputs can still not fit
# the model served: pairs sent to a single-text model, layer bounds beyond its depth, a text
# its tokenizer makes no token of, or exit settings that do not go together (a patience without
# the patience policy, a policy the model does not run, max_prob with no threshold on a model
# that has no calibrated one, a task for a model of none). The server refuses those with a 422
# naming the field, as documented (app/service.py check_inputs): no failure of the schema. Nothing else is excused:
# a 422 from parsing (a schema-valid value the parser refuses) still fails.
MODEL_DEPENDENT_REFUSALS = (
    (re.compile(r"inputs\[\d+\]"), ("takes single texts", "takes [text, text_pair] pairs", "text is blank")),
    (re.compile(r"(min|max)_layers"), ("is outside the model's layers", "exceeds max_layers")),
    (re.compile(r"patience"), ("only with policy patience", "needs a patience", "more than the model's")),
    (re.compile(r"policy"), ("is not one of model",)),
    (re.compile(r"threshold"), ("no calibrated max_prob threshold",)),
    (re.compile(r"max_accuracy_drop"), ("not both", "no calibration table", "is within")),
    (re.compile(r"task"), ("takes no task", "serves several tasks", "has no task")),  # multi-task models'
    # generate on a classifier (the one served here), and a generation model's own bounds
    (re.compile(r"model"), ("is a classification model", "is a generation model")),
    (re.compile(r"max_new_tokens"), ("its decoder's positions",)),
    (re.compile(r"num_beams"), ("the server's max_beams",)),
    (re.compile(r"no_repeat_ngram_size"), ("the model's target length",)),
)
# /v2's infer schema cannot say either that a tensor's shape counts its data, that the inputs are
# the model's (text_pair only for pair models, each once; outputs too), or the model's depth: the same kind
# of refusal, as 400 naming the tensor's field (app/api_v2_request.py parse_input, parse_request).
V2_MODEL_DEPENDENT_REFUSALS = (
    (re.compile(r"inputs\[\d+\]\.shape"), ("elements but", "differs from the shape of 'text'")),
    (re.compile(r"inputs\[\d+\]\.name"), ("unexpected inference input", "is given twice")),
    (re.compile(r"outputs\[\d+\]\.name"), ("is requested twice", "is a multi-task model's")),
    (re.compile(r"inputs"), ("needs the input",)),
    (re.compile(r"inputs\[\d+\](\.data\[\d+\])?"), ("text is blank",)),
    (re.compile(r"parameters\.(min|max)_layers"), ("in the model's layers", "exceeds max_layers")),
    (re.compile(r"parameters\.patience"), ("only with policy patience", "needs a patience", "more than the model's")),
    (re.compile(r"parameters\.policy"), ("is not one of model",)),
    (re.compile(r"parameters\.threshold"), ("no calibrated max_prob threshold",)),
    (re.compile(r"parameters\.max_accuracy_drop"), ("not both", "no calibration table", "is within")),
    (re.compile(r"parameters\.task"), ("takes no task", "serves several tasks", "has no task")),
)


def _is_model_dependent_refusal(failure, case, response) -> bool:
    if not isinstance(failure, RejectedPositiveData):
        return False
    if case.path.startswith("/v1/") and response.status_code == 422:
        refusals = MODEL_DEPENDENT_REFUSALS
    elif case.path.startswith("/v2/") and case.path.endswith("/infer") and response.status_code == 400:
        refusals = V2_MODEL_DEPENDENT_REFUSALS
    else:
        return False
    body = _body_json(response)
    if not isinstance(body, dict) or not isinstance(body.get("field"), str):
        return False
    return any(field.fullmatch(body["field"]) and any(reason in body.get("error", "") for reason in reasons)
               for field, reasons in refusals)


# -- the schemas under test ----------------------------------------------------------------
def served_document() -> dict:
    """The OpenAPI document the server serves, built by the app itself (no model is loaded
    for it). schemathesis' fixture-loaded (lazy) schemas break on pytest 9.2 (they set
    `Function._nodeid`, which pytest 9.2 no longer has), so the schema is built at collection;
    `test_live_document_is_the_one_fuzzed` checks that the live server's /openapi.json is this
    very document."""
    from app.server import create_app
    from app.settings import Settings

    return create_app(Settings(model_dir="/nonexistent", api_key="x")).openapi()


DOCUMENT = served_document()
SEEN: dict[str, Counter] = defaultdict(Counter)  # operation -> statuses answered, with the key
SESSION = requests.Session()


def load(**kwargs):
    schema = schemathesis.openapi.from_dict(DOCUMENT, config=config(**kwargs))

    @schema.hook
    def filter_failure(context, failure, case, response):
        return not _is_model_dependent_refusal(failure, case, response)

    return schema


served = load(max_examples=MAX_EXAMPLES, model_in_path="fixed")
mixed = load(max_examples=MAX_EXAMPLES, model_in_path="mostly")
# Without the key: the examples and fuzzing phases (the coverage phase's other-method probes
# belong to the runs with the key).
anonymous = load(max_examples=UNAUTHENTICATED_EXAMPLES, model_in_path="mostly", coverage=False).include(
    method="POST").exclude(path="/v2/repository/index")


def call(case, server):
    response = case.call(base_url=server.url, session=SESSION, headers=server.auth_headers, timeout=30)
    SEEN[case.operation.label][response.status_code] += 1
    case.validate_response(response, headers=server.auth_headers, additional_checks=OWN_CHECKS,
                           transport_kwargs={"base_url": server.url, "session": SESSION,
                                             "headers": server.auth_headers})
    return response


@served.parametrize()
@hypothesis.settings(max_examples=MAX_EXAMPLES, **HYPOTHESIS)
def test_operation_on_the_served_model(case, reliability_server):
    call(case, reliability_server)


@mixed.parametrize()
@hypothesis.settings(max_examples=MAX_EXAMPLES, **HYPOTHESIS)
def test_operation(case, reliability_server):
    call(case, reliability_server)


@anonymous.parametrize()
@hypothesis.settings(max_examples=UNAUTHENTICATED_EXAMPLES, **HYPOTHESIS)
def test_protected_operation_without_key(case, reliability_server):
    assert (case.method.upper(), case.path) in PROTECTED, case.operation.label
    case.call_and_validate(base_url=reliability_server.url, session=SESSION,
                           additional_checks=[*OWN_CHECKS, unauthorized], timeout=30)


# -- what the generator cannot build, through the same checks --------------------------------
def _bytes_tensor(texts: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)


def _infer(**body):
    return {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a fine film", "dull"]}], **body}


BINARY_HEADER = json.dumps({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                                        "parameters": {"binary_data_size": len(_bytes_tensor(["good", "bad"]))}}]})
HUGE = 10**400  # valid JSON, an integer no float can hold
KNOWN_REQUESTS = {
    # name: (path, path parameters, body, media type, extra headers, expected statuses)
    "v2 JSON infer": ("/v2/models/{model}/infer", {"model": MODEL}, _infer(), "application/json", {}, {200}),
    "v2 infer, binary outputs": ("/v2/models/{model}/infer", {"model": MODEL},
                                 _infer(parameters={"binary_data_output": True}), "application/json", {}, {200}),
    "v2 infer, binary inputs": ("/v2/models/{model}/versions/{version}/infer", {"model": MODEL, "version": VERSION},
                                BINARY_HEADER.encode() + _bytes_tensor(["good", "bad"]), "application/octet-stream",
                                {"Inference-Header-Content-Length": str(len(BINARY_HEADER))}, {200}),
    "v2 infer, header length not ASCII digits": ("/v2/models/{model}/infer", {"model": MODEL},
                                                 json.dumps(_infer()).encode(), "application/octet-stream",
                                                 {"Inference-Header-Content-Length": "\u00b2"}, {400}),
    "v2 infer, gzip body": ("/v2/models/{model}/infer", {"model": MODEL}, gzip.compress(json.dumps(_infer()).encode()),
                            "application/json", {"Content-Encoding": "gzip"}, {200}),
    "v2 infer, too many inputs": ("/v2/models/{model}/infer", {"model": MODEL},
                                  {"inputs": [{"name": "text", "shape": [9], "datatype": "BYTES", "data": ["x"] * 9}]},
                                  "application/json", {}, {413}),
    "v2 infer, huge integer threshold": ("/v2/models/{model}/infer", {"model": MODEL},
                                         _infer(parameters={"threshold": HUGE}), "application/json", {}, {400}),
    "v2 infer, huge integer timeout_ms": ("/v2/models/{model}/infer", {"model": MODEL},
                                          _infer(parameters={"timeout_ms": HUGE}), "application/json", {}, {200, 400}),
    "v2 infer, huge Triton timeout": ("/v2/models/{model}/infer", {"model": MODEL},
                                      _infer(parameters={"timeout": HUGE}), "application/json", {}, {200, 400}),
    "v1 predict, huge integer timeout_ms": ("/v1/predict", {}, {"inputs": ["good"], "timeout_ms": HUGE},
                                            "application/json", {}, {200, 422}),
    "v1 predict, unsupported encoding": ("/v1/models/{model}/predict", {"model": MODEL}, {"inputs": ["good"]},
                                         "application/json", {"Content-Encoding": "br"}, {415}),
    "v1 predict, broken gzip": ("/v1/predict", {}, b"\x1f\x8b not gzip", "application/json",
                                {"Content-Encoding": "gzip"}, {400}),
    "v1 predict, too many inputs": ("/v1/predict", {}, {"inputs": ["good"] * 9}, "application/json", {}, {413}),
    "v1 predict, text too long": ("/v1/predict", {}, {"inputs": ["a" * 2001]}, "application/json", {}, {413}),
    "v1 predict, body too large": ("/v1/predict", {}, {"inputs": ["a" * 70_000]}, "application/json", {}, {413}),
    "v1 predict, deadline": ("/v1/predict", {}, {"inputs": ["good"] * 8, "timeout_ms": 1e-6}, "application/json",
                             {}, {504}),
}


@pytest.mark.parametrize("name", list(KNOWN_REQUESTS))
def test_known_request(name, reliability_server):
    """Sent as the exact bytes (compressed, binary), then validated as schemathesis' own."""
    path, path_parameters, body, media_type, headers, expected = KNOWN_REQUESTS[name]
    case = mixed[path]["POST"].Case(path_parameters=path_parameters, media_type=media_type,
                                    body=body if isinstance(body, dict) else NOT_SET)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = SESSION.post(reliability_server.url + case.formatted_path, data=raw, timeout=30,
                            headers={**reliability_server.auth_headers, "Content-Type": media_type, **headers})
    assert response.status_code in expected, response.text[:500]
    case.validate_response(response, additional_checks=OWN_CHECKS)


def test_server_logged_no_unexpected_error(reliability_server):
    """Last of the requests: the server logged no error (an unexpected exception is logged
    with its traceback even when the client got a 4xx)."""
    import time

    time.sleep(0.5)  # the log is read by a thread
    errors = []
    for line in reliability_server.log_lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("error", "critical"):
            errors.append(f"{entry.get('logger')}: {entry.get('message', '').strip()}: "
                          f"{(entry.get('exception') or '').splitlines()[-3:]}")
    assert not errors, "\n".join(errors)


# -- the document itself ---------------------------------------------------------------------
def test_live_document_is_the_one_fuzzed(reliability_server):
    response = requests.get(reliability_server.url + "/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.json() == json.loads(json.dumps(DOCUMENT))


def test_every_operation_was_exercised():
    """Every operation of the document was fuzzed above (none skipped by a filter or a schema
    error); the statuses each answered (with the key) are shown with -s."""
    operations = {f"{method.upper()} {path}" for path, item in DOCUMENT["paths"].items() for method in item}
    assert set(SEEN) >= operations, f"not exercised: {sorted(operations - set(SEEN))}"
    for label in sorted(SEEN):
        print(f"{label}: {dict(sorted(SEEN[label].items()))}")


def test_documented_error_responses_are_the_error_shape():
    """Every 4xx/5xx the document declares is the one error shape (not, say, FastAPI's
    default {"detail": [...]} for a 422 the route never gives)."""
    wrong = []
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if not status.startswith(("4", "5")):
                    continue
                schema_ref = response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
                if schema_ref != "#/components/schemas/ErrorResponse":
                    wrong.append(f"{method.upper()} {path} {status}: {schema_ref or response}")
    assert not wrong, "\n".join(wrong)
