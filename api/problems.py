"""Every error leaves the API as RFC 9457 problem details; this is the one place kinds map to HTTP."""

from __future__ import annotations

import logging
import math
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import ResponseSpec

from kestrel.store.pool import TRANSIENT
from kestrel_core.errors import (
    Conflict,
    ContentTooLarge,
    Forbidden,
    InvalidInput,
    KestrelError,
    NotFound,
    PreconditionFailed,
    RateLimited,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger("kestrel.api")
PROBLEM_JSON = "application/problem+json"

_STATUS: dict[type[KestrelError], int] = {
    ContentTooLarge: 413,
    InvalidInput: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    PreconditionFailed: 412,
    RateLimited: 429,
    Unavailable: 503,
}
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    412: "Precondition Failed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_KINDS = {
    400: "invalid_input",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "content_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    500: "internal",
    503: "unavailable",
}


class InvalidParam(msgspec.Struct, frozen=True):
    name: str
    reason: str


class Problem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str = ""
    instance: str = ""
    invalid_params: list[InvalidParam] = msgspec.field(default_factory=list, name="invalid-params")


def problem_type(kind: str) -> str:
    return f"urn:kestrel:problem:{kind}"


def problem_response(
    request: Request[Any, Any, Any],
    status: int,
    detail: str,
    kind: str | None = None,
    invalid: list[InvalidParam] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[Problem]:
    body = Problem(
        type=problem_type(kind or _KINDS.get(status, "error")),
        title=_TITLES.get(status, "Error"),
        status=status,
        detail=detail,
        instance=request.url.path,
        invalid_params=invalid or [],
    )
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _wire_name(request: Request[Any, Any, Any], key: str) -> str:
    """The name a client used for a parameter: a header's own name, not the handler's argument name."""
    parameter = request.route_handler.parsed_fn_signature.parameters.get(key)
    definition = getattr(parameter, "kwarg_definition", None)
    name = getattr(definition, "header", None) or getattr(definition, "name", None)
    return name if isinstance(name, str) and name else key


def _invalid_params(request: Request[Any, Any, Any], exc: ValidationException) -> list[InvalidParam]:
    out = []
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if isinstance(item, dict):
            name = _wire_name(request, str(item["key"])) if item.get("key") else str(item.get("source") or "body")
            out.append(InvalidParam(name, str(item.get("message", ""))))
    return out


def status_and_kind(exc: KestrelError) -> tuple[int, str]:
    """The HTTP status and problem kind of one of our errors (also what the WebSocket stream reports)."""
    status = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 500)
    return status, f"invalid_input.{exc.reason}" if isinstance(exc, InvalidInput) else exc.kind


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    """Map any exception to problem details; unexpected ones become an opaque 500."""
    if isinstance(exc, KestrelError):
        status, kind = status_and_kind(exc)
        headers = {"WWW-Authenticate": 'Bearer realm="kestrel"'} if status == 401 else None
        if isinstance(exc, RateLimited):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        return problem_response(request, status, exc.detail, kind, headers=headers)
    if isinstance(exc, ValidationException):
        return problem_response(
            request, 400, "the request has invalid parameters", "invalid_input", _invalid_params(request, exc)
        )
    if isinstance(exc, RecursionError):  # a body nested beyond what a decoder may recurse into
        return problem_response(request, 400, "the request nests too deeply", "invalid_input.too_deep")
    if isinstance(exc, TRANSIENT):  # the database is restarting: worth retrying, not a bug
        log.warning("database unavailable", extra={"path": request.url.path, "error": str(exc)[:200]})
        return problem_response(
            request, 503, "the database is unavailable; retry shortly", headers={"Retry-After": "1"}
        )
    if isinstance(exc, HTTPException):
        headers = dict(exc.headers or {})
        if exc.status_code == 401:
            headers.setdefault("WWW-Authenticate", 'Bearer realm="kestrel"')
        return problem_response(request, exc.status_code, exc.detail, headers=headers or None)
    log.exception("unhandled error", extra={"path": request.url.path})
    return problem_response(request, 500, "an internal error occurred; it has been logged")


_DESCRIBED = {
    400: "Invalid request",
    401: "Missing, invalid, expired or revoked token",
    403: "The token lacks the scope",
    404: "Not found (or another tenant's)",
    409: "Conflict",
    412: "If-Match does not match the current version",
    413: "The body is larger than this route takes",
    415: "The body's media type is not one this route takes",
    429: "The tenant is over its request quota (see Retry-After)",
    503: "Not ready",
}


def problem_specs(*codes: int) -> dict[int, ResponseSpec]:
    """How the OpenAPI document states that a route may answer these problems."""
    return {
        code: ResponseSpec(
            data_container=Problem, media_type=PROBLEM_JSON, description=_DESCRIBED[code], generate_examples=False
        )
        for code in codes
    }
