"""The committed OpenAPI document must match what the app serves; regenerate with `make openapi`."""

from __future__ import annotations

import json

from api.__main__ import openapi_document
from tests.conftest import REPO


def test_committed_openapi_matches_the_app() -> None:
    committed = (REPO / "api" / "openapi.json").read_text()
    assert json.loads(committed) == json.loads(openapi_document()), "api/openapi.json is stale: run `make openapi`"


def test_document_is_openapi_31_with_every_route_and_bearer_auth() -> None:
    doc = json.loads(openapi_document())
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {
        "/api/v1/devices",
        "/api/v1/devices/{device_id}",
        "/api/v1/devices/{device_id}/telemetry",
        "/healthz",
        "/readyz",
    }
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, item in doc["paths"].items():
        if path.startswith("/api/v1"):
            responses = item["get"]["responses"]
            assert {"400", "401", "404"} <= set(responses), path
            assert "application/problem+json" in responses["401"]["content"]
