"""Request bodies and path parts as both protocols read them: decompressed, size- and
depth-bounded, parsed strictly, every failure a RequestError naming the field."""

from __future__ import annotations

import zlib
from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError

from app.service import RequestError

Schema = TypeVar("Schema", bound=BaseModel)
MAX_VERSION_DIGITS = 9
# Bodies larger than this are parsed in a worker thread: the parse holds the GIL, but the event
# loop gets it back every few milliseconds, so health probes are not queued behind 2 MB parses.
THREAD_PARSE_BYTES = 64 * 1024  # versions are folder names 1, 2, ...; longer digit strings name none


def field_name(loc: tuple) -> str:
    """('body', 'inputs', 2, 'constrained-str') -> 'inputs[2]'."""
    name = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif str(part).isidentifier():  # skips pydantic's union tags ('constrained-str', ...)
            name += ("." if name else "") + str(part)
    return name or "body"


def parse_version(version: str | None, status: int = 422) -> int | None:
    """A version from a URL: digits only; one too long to be any folder's is a version that
    does not exist (-1), never an integer conversion error."""
    if version is None:
        return None
    if not (version.isascii() and version.isdigit()):
        raise RequestError(status, "version", f"{version[:40]!r} is not a model version (a non-negative integer)")
    return int(version) if len(version) <= MAX_VERSION_DIGITS else -1


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise RequestError(415, "content-encoding", f"{encoding[:40]!r} is not supported; use gzip, deflate "
                           "or none", "unsupported")
    # gzip: a gzip wrapper; deflate: as HTTP means it (and tritonclient sends it), a zlib stream.
    inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestError(400, "body", f"not valid {encoding} data: {exc}") from exc
    if len(data) > limit or inflater.unconsumed_tail:
        raise RequestError(413, "body", f"larger than {limit} bytes once decompressed", "too_large")
    return data


async def read_body(request, limit: int) -> bytes:
    """The whole body, decompressed (Content-Encoding gzip or deflate) within `limit` bytes."""
    return decompress(await request.body(), request.headers.get("content-encoding", ""), limit)


def parse_json(raw: bytes) -> Any:
    """JSON with the parser's bounds: UTF-8, nesting at most 200 deep, finite numbers of sane
    length, so no input reaches Python's recursion or integer-size limits."""
    try:
        return pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise RequestError(400, "body", f"invalid JSON: {exc}") from exc


def parse_model(raw: bytes, schema: type[Schema]) -> Schema:
    """A strict pydantic schema from a JSON body: 400 for what is not JSON, 422 naming the
    first field that does not fit."""
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            raise RequestError(400, "body", f"invalid JSON: {first.get('msg', '')}".replace(
                "Invalid JSON: ", "")) from None
        field = field_name(tuple(first.get("loc", ())))
        raise RequestError(422, field, first.get("msg", "invalid value")) from None


async def off_the_loop(size: int, function, *args):
    """function(*args), in a worker thread when the body it works on is large."""
    if size <= THREAD_PARSE_BYTES:
        return function(*args)
    from app.threads import in_worker

    return await in_worker(function, *args)
