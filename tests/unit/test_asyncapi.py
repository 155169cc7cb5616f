"""The message contract (``api/asyncapi.json``): committed equal to what the declarations generate, valid AsyncAPI
3.0 (the official JSON Schema, from npm's @asyncapi/specs), and describing the bytes the code actually sends."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import msgspec
import pytest
import referencing.jsonschema
from referencing import Registry, Resource

from kestrel.devtools import asyncapi
from kestrel_core.messages.twin import (
    ClientEvent,
    CommandRequest,
    CommandResponse,
    DesiredDocument,
    ProvisionDenied,
    ReportedState,
    StatusReport,
)
from tests.conftest import REPO

DOCUMENT = REPO / "api" / "asyncapi.json"
SPEC = REPO / "node_modules" / "@asyncapi" / "specs" / "schemas" / "3.0.0.json"


def _spec_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SPEC.read_text())
    draft7 = referencing.jsonschema.DRAFT7
    resources = [(schema["$id"], Resource.from_contents(schema, default_specification=draft7))]
    resources += [
        (sub["$id"], Resource.from_contents(sub, default_specification=draft7))
        for sub in schema.get("definitions", {}).values()
        if isinstance(sub, dict) and "$id" in sub
    ]
    return jsonschema.Draft7Validator(schema, registry=Registry().with_resources(resources))


def test_the_committed_document_is_the_generated_one() -> None:
    assert DOCUMENT.read_text() == asyncapi.render(), "run `make openapi` and commit api/asyncapi.json"


def test_the_document_is_valid_asyncapi_3() -> None:
    validator = _spec_validator()
    document = json.loads(DOCUMENT.read_text())
    assert [e.message for e in validator.iter_errors(document)] == []
    # Positive control: the same validator refuses a document that breaks the specification.
    broken = copy.deepcopy(document)
    broken["operations"]["sendCommand"]["action"] = "publish"  # AsyncAPI 2's word; 3.0 says send/receive
    assert list(validator.iter_errors(broken))


def _message_validator(message: str) -> jsonschema.Draft7Validator:
    document = json.loads(DOCUMENT.read_text())
    schema: dict[str, Any] = {**document["components"]["messages"][message]["payload"]}
    schema["components"] = document["components"]  # so "#/components/schemas/..." resolves
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize(
    ("message", "value"),
    [
        ("reportedState", ReportedState(state={"fw": "1.2"}, ts=1764250000123)),
        ("commandResponse", CommandResponse("succeeded", result={"ok": True})),
        ("commandResponse", CommandResponse("delivered")),
        ("status", StatusReport("offline")),
        ("status", "online"),
        ("desiredDocument", DesiredDocument(version=3, desired={"a": 1}, delta={"a": 1}, ts=1764250000123)),
        (
            "commandRequest",
            CommandRequest(request_id="c" + "0" * 24, name="reboot", params={}, expires_at=1, attempt=1),
        ),
        ("provisionResponse", ProvisionDenied(error="claim_used_up", detail="the claim has no uses left")),
        ("clientEvent", ClientEvent(connected_at=1764250000123, ts=1764250000999, clientid="d1", reason="normal")),
    ],
)
def test_what_the_code_sends_fits_the_document(message: str, value: object) -> None:
    encoded = json.loads(msgspec.json.encode(value))
    assert list(_message_validator(message).iter_errors(encoded)) == []


def test_the_document_refuses_what_the_platform_refuses() -> None:
    assert list(_message_validator("commandResponse").iter_errors({"status": "done"}))
    assert list(_message_validator("reportedState").iter_errors({"state": [1]}))
    assert list(_message_validator("status").iter_errors({"status": "away"}))
