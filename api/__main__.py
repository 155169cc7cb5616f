"""``python -m api`` serves the API; ``python -m api openapi`` prints the OpenAPI document."""

from __future__ import annotations

import asyncio
import sys

import msgspec
import psycopg
import uvicorn

from api import openapi
from api.app import PRIVILEGED_DETAIL, create_app
from api.graphql import build_schema
from api.settings import ApiSettings
from kestrel.runtime.logs import announce, configure_logging
from kestrel.store.migrate import privileged
from kestrel_core.errors import InvalidInput
from kestrel_core.settings import from_env


def openapi_document() -> str:
    app = create_app(ApiSettings(), "", open_pool=False)
    encoded = msgspec.json.encode(openapi.document(app), order="sorted")
    return msgspec.json.format(encoded, indent=2).decode() + "\n"


def _privileged(url: str) -> bool:
    """True when the role owns tables or bypasses RLS. Unreachable: False (the app starts, /readyz tells, and
    the lifespan repeats the check)."""

    async def check() -> bool:
        async with await psycopg.AsyncConnection.connect(url, connect_timeout=5) as conn:
            return await privileged(conn)

    try:
        return asyncio.run(check())
    except psycopg.Error:
        return False


def _settings() -> ApiSettings:
    """Settings the API may start with; ``InvalidInput`` (one line) otherwise. Fails closed."""
    settings = from_env(ApiSettings, "KESTREL_API")
    if not settings.admin_token:
        raise InvalidInput(
            "no_admin_token", "KESTREL_API_ADMIN_TOKEN is not set; refusing to start without a credential"
        )
    if not settings.database_url:
        raise InvalidInput("no_database", "KESTREL_API_DATABASE_URL is not set (the kestrel_api role's connection)")
    for url in (settings.database_url, settings.platform_database_url):
        if url and _privileged(url.reveal()):
            raise InvalidInput("privileged_role", PRIVILEGED_DETAIL)
    return settings


def main(argv: list[str]) -> int:
    if argv == ["openapi"]:
        sys.stdout.write(openapi_document())
        return 0
    if argv == ["graphql-schema"]:
        sys.stdout.write(build_schema(introspection=True).as_str() + "\n")
        return 0
    if argv:
        print("usage: python -m api [openapi|graphql-schema]", file=sys.stderr)
        return 2
    configure_logging("api")
    try:
        settings = _settings()
    except InvalidInput as exc:
        print(f"kestrel api: {exc.detail}", file=sys.stderr)
        return 2
    announce("api")
    app = create_app(settings, settings.database_url.reveal())
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level="warning", access_log=False, loop="uvloop", lifespan="on"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
