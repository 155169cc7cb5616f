"""Bearer-token authentication. For now one bootstrap admin token; tenancy and scoped tokens are the
control-plane issue. Fails closed: with no token configured, every request is refused."""

from __future__ import annotations

import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from kestrel.errors import Unauthenticated


def require_admin(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    expected: str = connection.app.state.admin_token
    header = connection.headers.get("authorization", "")
    scheme, _sep, token = header.partition(" ")
    if not expected or scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Unauthenticated("a valid bearer token is required")
