"""Fixtures shared by the integration modules that drive the API in process."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from litestar.testing import TestClient

from api.app import create_app
from api.settings import ApiSettings
from kestrel_core.settings import Secret


@pytest.fixture
def client(api_database_url: str) -> Iterator[TestClient]:  # type: ignore[type-arg]
    """The API in process, as the API's database role, with a platform token nobody else knows (modules that need
    other settings define a ``client`` of their own)."""
    platform = Secret("p-" + uuid.uuid4().hex)
    with TestClient(create_app(ApiSettings(admin_token=platform), api_database_url)) as c:
        yield c
