"""Errors over HTTP: OpenAI's error object, pydantic's validation errors said as a user reads them
(the field by its dotted path, ``messages.0.role``), the request-body size limit, and bearer keys
compared in constant time."""

from __future__ import annotations

import hmac
import json
import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .schemas import MAX_STOPS


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, **headers: str):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "adapter_load_error",
    503: "server_busy",
}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = KINDS.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.param), exc.status, exc.headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}

#: what a field that takes several shapes expects, said once instead of once per shape
UNION_HINTS = {
    "prompt": "expected a string, a list of strings or a list of token ids (integers >= 0)",
    "stop": f"expected a string or a list of up to {MAX_STOPS} strings",
    "content": "expected a string or a list of text parts ({'type': 'text', 'text': ...})",
}


def _field(loc: tuple) -> str:
    """``messages.0.role`` from pydantic's location, without the union members it tried."""
    parts = []
    for p in loc:
        if p == "body":
            continue
        if isinstance(p, int) or (re.fullmatch(r"[A-Za-z_]\w*", str(p)) and p not in _TYPE_TAGS):
            parts.append(str(p))
    return ".".join(parts) or "body"


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    if first["type"] == "json_invalid":
        return (
            f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
            None,
        )
    if first["type"] == "missing" and tuple(first["loc"]) == ("body",):
        return "the request has no JSON body", None
    name = _field(tuple(first["loc"]))
    if first["type"] == "extra_forbidden":
        return f"unknown parameter '{name}'", name
    if name == "body" and first["type"] in ("model_attributes_type", "dict_type"):
        return "the body must be a JSON object", None
    msg = first["msg"].removeprefix("Value error, ")
    if name == "body":
        return msg, None
    hint = UNION_HINTS.get(name.rsplit(".", 1)[-1])
    if hint and len(errors) > 1 and all(_field(tuple(e["loc"])).startswith(name) for e in errors):
        msg = hint  # every shape the field may take was refused
    got = json.dumps(first.get("input"), default=str)[:100]
    return f"'{name}': {msg} (got {got})", name


class BodyLimit:
    """ASGI middleware: a body longer than ``limit`` bytes is a 413, read no further."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_long = f"the request body is over the server's limit of {self.limit} bytes"
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await JSONResponse(error_body(413, too_long), 413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, too_long)
            return message

        return await self.app(scope, limited, send)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def check_key(request: Request, key: str | None, what: str) -> None:
    if key is None:
        return
    given = _bearer(request)
    if given is None or not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, f"a valid {what} is required (Authorization: Bearer KEY)")
