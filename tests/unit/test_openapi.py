"""The committed OpenAPI document must match what the app serves; regenerate with `make openapi`."""

from __future__ import annotations

import json

from api.__main__ import openapi_document
from tests.conftest import REPO


def test_committed_openapi_matches_the_app() -> None:
    committed = (REPO / "api" / "openapi.json").read_text()
    assert json.loads(committed) == json.loads(openapi_document()), "api/openapi.json is stale: run `make openapi`"


def test_document_is_openapi_31_with_every_route_error_and_bearer_auth() -> None:
    doc = json.loads(openapi_document())
    assert doc["openapi"].startswith("3.1")
    assert {
        "/api/v1/tenants",
        "/api/v1/tenants/{tenant_id}",
        "/api/v1/devices",
        "/api/v1/devices/bulk",
        "/api/v1/devices/import",
        "/api/v1/devices/{device_id}",
        "/api/v1/devices/{device_id}/telemetry",
        "/api/v1/groups",
        "/api/v1/groups/{group_id}",
        "/api/v1/groups/{group_id}/devices/{device_id}",
        "/api/v1/groups/{group_id}/telemetry",
        "/api/v1/telemetry/latest",
        "/api/v1/users",
        "/api/v1/users/{user_id}",
        "/api/v1/tokens",
        "/api/v1/tokens/{token_id}",
        "/api/v1/audit",
        "/api/v1/oauth/token",
        "/api/v1/oauth-clients",
        "/api/v1/oauth-clients/{client_id}",
        "/api/v1/presence",
        "/api/v1/devices/{device_id}/presence",
        "/api/v1/devices/{device_id}/connections",
        "/api/v1/devices/{device_id}/shadow",
        "/api/v1/devices/{device_id}/shadows/{name}",
        "/api/v1/devices/{device_id}/shadow/history",
        "/api/v1/devices/{device_id}/commands",
        "/api/v1/commands/{command_id}",
        "/api/v1/commands/{command_id}/cancel",
        "/api/v1/devices/{device_id}/decommission",
        "/api/v1/provisioning-claims",
        "/api/v1/provisioning-claims/{claim_id}",
        "/api/v1/rules",
        "/api/v1/rules/dry-run",
        "/api/v1/rules/{rule_id}",
        "/api/v1/rules/{rule_id}/enable",
        "/api/v1/rules/{rule_id}/disable",
        "/api/v1/rules/{rule_id}/versions",
        "/api/v1/alarms",
        "/api/v1/alarms/{alarm_id}",
        "/api/v1/alarms/{alarm_id}/history",
        "/api/v1/alarms/{alarm_id}/acknowledge",
        "/api/v1/alarms/{alarm_id}/clear",
        "/api/v1/alarms/{alarm_id}/comments",
        "/api/v1/channels",
        "/api/v1/channels/{channel_id}",
        "/api/v1/stream",
        "/api/v1/stream/tickets",
        "/api/v1/version",
        "/healthz",
        "/readyz",
    } == set(doc["paths"])
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, item in doc["paths"].items():
        if not path.startswith("/api/v1"):
            continue
        for method, operation in item.items():
            responses = operation["responses"]
            if path == "/api/v1/version":  # public: what runs, no credential
                assert {} in operation["security"] and set(responses) == {"200"}
                continue
            if path == "/api/v1/oauth/token":  # RFC 6749 errors, client authentication by Basic
                assert {"200", "400", "401"} <= set(responses)
                assert {"basicAuth": []} in operation["security"]
                continue
            assert {"400", "401", "403", "404"} <= set(responses), (method, path)
            assert "application/problem+json" in responses["401"]["content"]
            if path == "/api/v1/stream":  # a bearer token, or a browser's single-use ticket in the query
                assert operation["security"] == [{"bearerAuth": []}, {}] and "503" in responses
                continue
            assert operation["security"] == [{"bearerAuth": []}], (method, path)


def test_committed_graphql_schema_matches_the_app() -> None:
    from api.graphql import build_schema  # noqa: PLC0415

    committed = (REPO / "api" / "schema.graphql").read_text()
    assert committed == build_schema(introspection=True).as_str() + "\n", "api/schema.graphql is stale: `make openapi`"
