"""What a request body may be (issue 10): its size (413), its media type (415), how deep it nests (400). Checked
before anything reads the body, and stated in the OpenAPI document."""

from __future__ import annotations

import inspect
from typing import Any, Final

from litestar import Request
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler

#: Every body the API takes, unless a route says otherwise: far above a command (32 KiB of params) or a shadow
#: update (16 KiB), far below what would cost the server anything. GraphQL documents and variables included.
BODY_LIMIT: Final = 64 * 1024
#: Bulk registration (10,000 devices, JSON or CSV).
BULK_BODY_LIMIT: Final = 8 * 1024 * 1024
JSON: Final = ("application/json",)


class UnsupportedMediaType(HTTPException):
    status_code = 415


def accepted_media_types(handler: HTTPRouteHandler) -> tuple[str, ...]:
    """The media types a handler's body may have: ``opt["accepts"]``, else JSON for a ``data`` body, else none."""
    declared = handler.opt.get("accepts")
    if declared is not None:
        return tuple(declared)
    # The function's own signature: Litestar's parsed one would be cached on the handler, which Litestar then
    # cannot deep-copy when it registers the handler's router.
    return JSON if "data" in inspect.signature(handler.fn).parameters else ()


def _matches(content_type: str, accepted: tuple[str, ...]) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    if media in accepted:
        return True
    # application/merge-patch+json and the like are JSON too
    return "application/json" in accepted and media.startswith("application/") and media.endswith("+json")


async def require_media_type(request: Request[Any, Any, Any]) -> None:
    """``before_request`` hook: a body of a type the route does not take is 415, before the body is read (JSON sent
    as text/plain or a form is not silently parsed: that would also let a browser post it cross-site)."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    accepted = accepted_media_types(request.route_handler)
    if not accepted:
        return
    content_type = request.headers.get("content-type", "")
    if not _matches(content_type, accepted):
        header = "Accept-Patch" if request.method == "PATCH" else "Accept-Post"
        raise UnsupportedMediaType(
            detail=f"send the body as {' or '.join(accepted)}" + (f", not {content_type}" if content_type else ""),
            headers={header: ", ".join(accepted)},
        )
