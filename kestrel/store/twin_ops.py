"""The operator CLI's device twin operations (``kestrel device shadow|presence``, ``kestrel command``,
``kestrel claim``), on the system role, through the same row logic as the API (``kestrel.store.twin``)."""

from __future__ import annotations

import asyncio
import getpass
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import psycopg
from psycopg.rows import dict_row

from kestrel.store import twin
from kestrel_core.errors import Conflict, InvalidInput, NotFound
from kestrel_core.tokens import new_claim_token
from kestrel_core.topics import require_id


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidInput("bad_json", f"{what} is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidInput("too_deep", f"{what} nests too deeply") from exc
    if not isinstance(value, dict):
        raise InvalidInput("bad_json", f"{what} must be a JSON object")
    return value


async def _device_tenant(conn: psycopg.AsyncConnection[Any], device: str) -> tuple[str, str]:
    row = await (await conn.execute("SELECT tenant_id, status FROM devices WHERE device_id = %s", (device,))).fetchone()
    if row is None:
        raise NotFound(f"device {device} does not exist")
    return str(row[0]), str(row[1])


def presence(conninfo: str, tenant: str, online: bool | None) -> list[dict[str, Any]]:
    with psycopg.connect(conninfo) as conn:
        cur = conn.cursor(row_factory=dict_row)
        return cur.execute(
            "SELECT d.device_id, coalesce(p.online, false) AS online, p.last_seen, p.connected_at, p.disconnected_at,"
            " p.reported_status FROM devices d LEFT JOIN device_presence p USING (device_id)"
            " WHERE d.tenant_id = %s AND d.status <> 'decommissioned'"
            " AND (%s::boolean IS NULL OR coalesce(p.online, false) = %s) ORDER BY d.device_id",
            (tenant, online, online),
        ).fetchall()


def shadow(conninfo: str, device: str, name: str, desired_patch: str | None) -> dict[str, Any]:
    if name:
        require_id("shadow", name)
    patch = _json_object(desired_patch, "--set") if desired_patch is not None else None

    async def run() -> twin.Shadow:
        async with await psycopg.AsyncConnection.connect(conninfo) as conn, conn.transaction():
            tenant, status = await _device_tenant(conn, device)
            if patch is None:
                return await twin.read_shadow(conn, device, name) or twin.empty_shadow(device, name)
            if status == "decommissioned":
                raise Conflict(f"device {device} is decommissioned")
            updated, _ = await twin.update_shadow(
                conn, tenant, device, name, "desired", patch, ts_ms=twin.now_ms(), actor=_actor()
            )
            return updated

    return msgspec.to_builtins(asyncio.run(run()))  # type: ignore[no-any-return]


def send_command(conninfo: str, device: str, name: str, params: str, timeout_s: int, expires_in_s: int) -> str:
    require_id("command", name)
    arguments = _json_object(params, "--params")
    if not 1 <= timeout_s <= 86400 or not 1 <= expires_in_s <= 7 * 86400:
        raise InvalidInput("bad_command", "--timeout is 1 to 86400 s and --expires-in 1 s to 7 days")

    async def run() -> str:
        async with await psycopg.AsyncConnection.connect(conninfo) as conn, conn.transaction():
            tenant, status = await _device_tenant(conn, device)
            if status in ("suspended", "decommissioned"):
                raise Conflict(f"device {device} is {status}")
            command = await twin.insert_command(
                conn, tenant, device, name, arguments, timeout_s=timeout_s,
                expires_at=datetime.now(UTC) + timedelta(seconds=expires_in_s), max_attempts=5, actor=_actor(),
            )  # fmt: skip
            return command.command_id

    return asyncio.run(run())


def command(conninfo: str, command_id: str) -> dict[str, Any]:
    with psycopg.connect(conninfo) as conn:
        cur = conn.cursor(row_factory=dict_row)
        query = f"SELECT {twin.COMMAND_COLUMNS} FROM commands WHERE command_id = %s"  # noqa: S608 - fixed columns
        row = cur.execute(query, (command_id,)).fetchone()
        if row is None:
            raise NotFound(f"command {command_id} does not exist")
        row["events"] = cur.execute(
            "SELECT event, detail, at FROM command_events WHERE command_id = %s ORDER BY id", (command_id,)
        ).fetchall()
    return row


def wait_command(conninfo: str, command_id: str, limit_s: int) -> dict[str, Any]:
    deadline = time.monotonic() + limit_s + 5
    while True:
        detail = command(conninfo, command_id)
        if detail["status"] in twin.TERMINAL or time.monotonic() > deadline:
            return detail
        time.sleep(0.2)


def create_claim(
    conninfo: str, tenant: str, max_uses: int, expires_in_s: int, group: str | None, tags: list[str]
) -> str:
    if not 1 <= max_uses <= 1_000_000 or not 60 <= expires_in_s <= 365 * 86400:
        raise InvalidInput("bad_claim", "--max-uses is 1 to 1,000,000 and --expires-in 60 s to 365 days")
    claim_id, token, digest = new_claim_token()
    with psycopg.connect(conninfo) as conn:
        if conn.execute("SELECT 1 FROM tenants WHERE tenant_id = %s", (tenant,)).fetchone() is None:
            raise NotFound(f"tenant {tenant} does not exist")
        conn.execute(
            "INSERT INTO provisioning_claims (claim_id, tenant_id, secret_sha256, max_uses, expires_at, group_id, tags)"
            " VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s), %s, %s)",
            (claim_id, tenant, digest, max_uses, expires_in_s, group, tags),
        )
    return token
