"""``python -m api`` serves the API; ``python -m api openapi`` prints the OpenAPI document."""

from __future__ import annotations

import sys

import msgspec
import uvicorn

from api.app import ApiSettings, create_app
from kestrel.errors import InvalidInput
from kestrel.logs import configure_logging
from kestrel.settings import from_env


def openapi_document() -> str:
    app = create_app(ApiSettings(), "", open_pool=False)
    encoded = msgspec.json.encode(app.openapi_schema.to_schema(), order="sorted")
    return msgspec.json.format(encoded, indent=2).decode() + "\n"


def main(argv: list[str]) -> int:
    if argv == ["openapi"]:
        sys.stdout.write(openapi_document())
        return 0
    if argv:
        print("usage: python -m api [openapi]", file=sys.stderr)
        return 2
    configure_logging("api")
    try:
        settings = from_env(ApiSettings, "KESTREL_API")
    except InvalidInput as exc:
        print(f"kestrel api: {exc.detail}", file=sys.stderr)
        return 2
    if not settings.admin_token:
        print(
            "kestrel api: KESTREL_API_ADMIN_TOKEN is not set; refusing to start without a credential", file=sys.stderr
        )
        return 2
    if not settings.database_url:
        print("kestrel api: KESTREL_API_DATABASE_URL is not set (the kestrel_api role's connection)", file=sys.stderr)
        return 2
    app = create_app(settings, settings.database_url.reveal())
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level="warning", access_log=False, loop="uvloop", lifespan="on"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
