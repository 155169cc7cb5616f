"""The OpenAPI document as integrators get it: Litestar's, with the rules the API enforces stated exactly.

Litestar documents a request struct's top-level fields but drops constraints on nested items (a tag's pattern
inside ``tags: list[Tag]``), on a body that is a list, and ``forbid_unknown_fields``. Request bodies are validated by
msgspec alone, so their schemas are taken from msgspec itself, which validates with the same declarations.
Header and query parameters are never ``null`` on the wire (absent is how they are omitted), so their ``null``
branch is dropped.
The served document (``/schema/openapi.json``) and the committed one (``api/openapi.json``) are this one.
"""

from __future__ import annotations

import copy
import typing
from typing import Any

import msgspec
from litestar import Litestar, Request
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.plugins import JsonRenderPlugin

_REF = "#/components/schemas/{name}"


def _body_type(raw: Any) -> Any:
    """A handler's ``data`` annotation with only msgspec's own metadata (Litestar adds its ``Body`` marker)."""
    if typing.get_origin(raw) is typing.Annotated:
        base, *extras = typing.get_args(raw)
        metas = [m for m in extras if isinstance(m, msgspec.Meta)]
        return typing.Annotated[(_body_type(base), *metas)] if metas else _body_type(base)
    return raw


def request_bodies(app: Litestar) -> dict[tuple[str, str], Any]:
    """``(path, method)`` -> the type the handler decodes its JSON body into."""
    found: dict[tuple[str, str], Any] = {}
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            data = handler.parsed_fn_signature.parameters.get("data") if isinstance(handler, HTTPRouteHandler) else None
            if data is not None:
                for method in handler.http_methods:
                    found[(route.path_format, method.lower())] = _body_type(data.raw)
    return found


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    for key in ("oneOf", "anyOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and any(b == {"type": "null"} for b in branches):
            rest = [b for b in branches if b != {"type": "null"}]
            merged = {k: v for k, v in schema.items() if k != key}
            return {**rest[0], **merged} if len(rest) == 1 else {**merged, key: rest}
    return schema


def refine(app: Litestar, document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with msgspec's exact request body schemas and null-free header/query parameters."""
    refined = copy.deepcopy(document)
    bodies = request_bodies(app)
    keys = sorted(bodies)
    body_schemas, exact = msgspec.json.schema_components([bodies[k] for k in keys], ref_template=_REF)
    schemas = refined.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in exact.items():
        if name not in schemas:
            raise ValueError(f"the OpenAPI document names request schema {name} differently; give it a unique name")
        schemas[name] = schema
    for (path, method), schema in zip(keys, body_schemas, strict=True):
        content = refined["paths"][path][method]["requestBody"]["content"]
        content["application/json"]["schema"] = schema
    for path_item in refined.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            for parameter in operation.get("parameters", []):
                if parameter.get("in") in ("header", "query") and isinstance(parameter.get("schema"), dict):
                    parameter["schema"] = _without_null(parameter["schema"])
    return refined


class RefinedJson(JsonRenderPlugin):
    """Serves the refined document at ``/schema/openapi.json`` (computed once)."""

    def __init__(self) -> None:
        super().__init__()
        self._rendered: bytes | None = None

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        if self._rendered is None:
            self._rendered = msgspec.json.encode(refine(request.app, openapi_schema))
        return self._rendered


def document(app: Litestar) -> dict[str, Any]:
    """The refined document of ``app`` (what ``python -m api openapi`` commits)."""
    return refine(app, app.openapi_schema.to_schema())
