"""The OpenAPI document as integrators get it: Litestar's, with the rules the API enforces stated exactly.

Litestar documents a request struct's top-level fields but drops constraints on nested items (a tag's pattern
inside ``tags: list[Tag]``), on a body that is a list, and ``forbid_unknown_fields``. Request bodies are validated by
msgspec alone, so their schemas are taken from msgspec itself, which validates with the same declarations.
Header and query parameters are never ``null`` on the wire (absent is how they are omitted), so their ``null``
branch is dropped, and every enum of strings says it is a string (client generators need the type).
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
    """A parameter's schema without its ``null`` branch, ``null`` type or ``null`` enum member."""
    for key in ("oneOf", "anyOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and any(b == {"type": "null"} for b in branches):
            rest = [b for b in branches if b != {"type": "null"}]
            merged = {k: v for k, v in schema.items() if k != key}
            return {**rest[0], **merged} if len(rest) == 1 else {**merged, key: rest}
    if isinstance(schema.get("type"), list) and "null" in schema["type"]:
        kinds = [t for t in schema["type"] if t != "null"]
        schema = {**schema, "type": kinds[0] if len(kinds) == 1 else kinds}
    if isinstance(schema.get("enum"), list) and None in schema["enum"]:
        schema = {**schema, "enum": [v for v in schema["enum"] if v is not None]}
    return schema


def _typed_enums(node: Any) -> Any:
    """``{"enum": [strings]}`` as ``{"type": "string", "enum": [...]}`` (msgspec leaves a Literal's type implicit),
    and a nullable enum as ``oneOf`` the enum and ``null``: client generators otherwise invent a type per use."""
    if isinstance(node, dict):
        out = {k: _typed_enums(v) for k, v in node.items()}
        values = out.get("enum")
        if isinstance(values, list) and None in values and isinstance(out.get("type"), list):
            kinds = [t for t in out["type"] if t != "null"]
            rest = {k: v for k, v in out.items() if k not in ("enum", "type")}
            enum = {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": [v for v in values if v is not None]}
            return {**rest, "oneOf": [enum, {"type": "null"}]}
        if isinstance(values, list) and values and "type" not in out and all(isinstance(v, str) for v in values):
            out["type"] = "string"
        return out
    if isinstance(node, list):
        return [_typed_enums(v) for v in node]
    return node


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
    typed: dict[str, Any] = _typed_enums(refined)
    return typed


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
