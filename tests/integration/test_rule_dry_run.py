"""The dry run over stored telemetry (issue 13, ADR-0018), on the real PostgreSQL as the API's role: the tenant's
readings through the one evaluator, equal to replaying the same readings directly, and blind to other tenants."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from kestrel.store.dryrun import dry_run
from kestrel.store.session import tenant_scope
from kestrel_core.errors import InvalidInput
from kestrel_core.rules.evaluate import Cleared, Raised, Reading, replay
from kestrel_core.rules.model import parse_rule
from tests.conftest import new_tenant

pytestmark = pytest.mark.integration
HOT = parse_rule({
    "name": "boiler too hot",
    "metrics": ["temp"],
    "alarm": {
        "severity": "critical",
        "when": {"op": "compare", "cmp": "gt", "left": {"kind": "metric", "name": "temp"},
                 "right": {"kind": "const", "value": 80}},
        "clear_when": {"op": "compare", "cmp": "lt", "left": {"kind": "metric", "name": "temp"},
                       "right": {"kind": "const", "value": 75}},
        "for_s": 60,
    },
})  # fmt: skip


def test_the_dry_run_replays_the_tenants_readings_and_sees_no_other_tenant(
    database_url: str, api_database_url: str
) -> None:
    mine, theirs = new_tenant(database_url, 2, prefix="dr"), new_tenant(database_url, 1, prefix="dr")
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    series = [70, 85, 85, 85, 85, 78, 74, 90]  # a reading a minute
    with psycopg.connect(database_url) as conn:
        for tenant, device, values in ((mine.id, mine.devices[0], series), (mine.id, mine.devices[1], [60] * 8),
                                       (theirs.id, theirs.devices[0], [99] * 8)):  # fmt: skip
            for i, value in enumerate(values):
                conn.execute(
                    "INSERT INTO telemetry (tenant_id, device_id, stream, ts, seq, metrics, received_at)"
                    " VALUES (%s, %s, '', %s, %s, %s, now())",
                    (tenant, device, start + timedelta(minutes=i), i, json.dumps({"temp": value})),
                )
    end = start + timedelta(minutes=20)

    async def run(devices: list[str] | None) -> object:
        async with await psycopg.AsyncConnection.connect(api_database_url) as conn, tenant_scope(conn, mine.id):
            return await dry_run(conn, mine.id, HOT, start=start, end=end, devices=devices)

    result = asyncio.run(run(None))
    outcomes = {o.device_id: o for o in result.devices}  # type: ignore[attr-defined]
    assert set(outcomes) == set(mine.devices) and result.readings == 16  # type: ignore[attr-defined]
    at = [int((start + timedelta(minutes=m)).timestamp() * 1000) for m in range(9)]
    hot = outcomes[mine.devices[0]].transitions
    # Hot from minute 1, raised at 2; 78 at minute 5 is inside the band; cleared at 6; hot again at 7, and the minute
    # completes on the clock at 8 although the device said nothing more.
    assert hot == [Raised(at[2], {"temp": 85}), Cleared(at[6], {"temp": 74}), Raised(at[8], {"temp": 90})]
    assert outcomes[mine.devices[1]].transitions == []
    direct = replay(HOT, [Reading(at[i], i, {"temp": v}) for i, v in enumerate(series)],
                    until_ms=int(end.timestamp() * 1000))[1]  # fmt: skip
    assert hot == direct  # the stored data through the same evaluator, with no side effect
    stolen = asyncio.run(run([theirs.devices[0]]))  # another tenant's device, named outright
    assert stolen.devices == [] and stolen.readings == 0  # type: ignore[attr-defined]
    with pytest.raises(InvalidInput):
        asyncio.run(_backwards(api_database_url, mine.id, start))


async def _backwards(url: str, tenant: str, start: datetime) -> None:
    async with await psycopg.AsyncConnection.connect(url) as conn, tenant_scope(conn, tenant):
        await dry_run(conn, tenant, HOT, start=start, end=start - timedelta(seconds=1))


def test_the_dry_run_replays_lifecycle_events_from_their_journal(database_url: str, api_database_url: str) -> None:
    """A rule on lifecycle events replays the journal the database trigger keeps, for its tenant only: the device
    suspended twice raises, clears and re-raises; another tenant's suspended device is not seen."""
    mine, theirs = new_tenant(database_url, 1, prefix="drl"), new_tenant(database_url, 1, prefix="drl")
    start = datetime.now(UTC) - timedelta(minutes=5)
    with psycopg.connect(database_url, autocommit=True) as conn:
        for device, moves in ((mine.devices[0], ("suspended", "active", "suspended")),
                              (theirs.devices[0], ("suspended",))):  # fmt: skip
            for status in moves:
                conn.execute("UPDATE devices SET status = %s WHERE device_id = %s", (status, device))
    eq = {"op": "compare", "cmp": "eq", "left": {"kind": "metric", "name": "lifecycle.status"}}
    rule = parse_rule({"name": "suspended", "trigger": {"kind": "events", "events": ["lifecycle"]}, "alarm": {
        "when": {**eq, "right": {"kind": "const", "value": "suspended"}},
        "clear_when": {**eq, "right": {"kind": "const", "value": "active"}}}})  # fmt: skip

    async def run() -> object:
        async with await psycopg.AsyncConnection.connect(api_database_url) as conn, tenant_scope(conn, mine.id):
            return await dry_run(conn, mine.id, rule, start=start, end=datetime.now(UTC) + timedelta(seconds=1))

    result = asyncio.run(run())
    (outcome,) = result.devices  # type: ignore[attr-defined]
    assert outcome.device_id == mine.devices[0]
    assert [type(t) for t in outcome.transitions] == [Raised, Cleared, Raised]
    presence = parse_rule({"name": "p", "trigger": {"kind": "events", "events": ["presence", "lifecycle"]},
                           "alarm": {"when": {**eq, "right": {"kind": "const", "value": "x"}}}})  # fmt: skip

    async def refused() -> None:
        async with await psycopg.AsyncConnection.connect(api_database_url) as conn, tenant_scope(conn, mine.id):
            await dry_run(conn, mine.id, presence, start=start, end=datetime.now(UTC))

    with pytest.raises(InvalidInput, match=r"\$\.trigger"):
        asyncio.run(refused())
