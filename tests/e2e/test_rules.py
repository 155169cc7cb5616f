"""Rules, alarms and notifications end to end (issue 13): devices publish over mTLS through our Mosquitto plugin, the
bridge and writer store, the rule workers (``python -m rules``, real processes) evaluate from JetStream, notify a real
HTTP receiver (signed webhooks, verified here) and a real SMTP server (STARTTLS and login required), and act on the
twin. The API runs in process on the same database as its own role. Every "only once" has a later event that must
arrive (the positive control) before it is counted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import nats
import psycopg
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from api.app import create_app
from api.settings import ApiSettings
from kestrel.devtools.servers import PostgresServer
from kestrel.runtime.mqttclient import MqttPublisher
from kestrel_core import streams
from kestrel_core.rules.channels import SIGNATURE_HEADER, verify
from kestrel_core.settings import Secret
from tests.conftest import _nats, api_url_for, platform_url_for, tenant_token, wait_until
from tests.jetstream_helpers import deadletters
from tests.prodstack import ProdStack, prod_stack
from tests.receivers import HttpReceiver, Mailbox, http_receiver, smtp_server

pytestmark = pytest.mark.e2e
V1 = "/api/v1"
PLATFORM = "platform-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def receiver() -> Iterator[HttpReceiver]:
    with http_receiver(hang_s=6) as r:
        yield r


@pytest.fixture(scope="module")
def stack(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProdStack, Mailbox]]:
    root = tmp_path_factory.mktemp("rules")
    nats_server = _nats(root / "nats")
    nats_server.start()
    try:
        services = ("authsvc", "bridge", "writer", "devicesvc")
        with prod_stack(postgres, nats_server, root, services=services) as s, \
                smtp_server(root / "server.crt", root / "server.key") as mailbox:  # fmt: skip
            s.extra_env["rules"] = {
                "KESTREL_RULES_SMTP_HOST": "127.0.0.1",
                "KESTREL_RULES_SMTP_PORT": str(mailbox.port),
                "KESTREL_RULES_SMTP_CA_FILE": str(root / "ca.pem"),
                "KESTREL_RULES_SMTP_USERNAME": mailbox.user,
                "KESTREL_RULES_SMTP_PASSWORD": mailbox.password,
                "KESTREL_RULES_SMTP_FROM": "alarms@kestrel.test",
                "KESTREL_RULES_DELIVERY_ATTEMPTS": "3",
            }
            s.start("rules")
            yield s, mailbox
    finally:
        nats_server.stop()


@pytest.fixture(scope="module")
def api(stack: tuple[ProdStack, Mailbox]) -> Iterator[TestClient[Litestar]]:
    s, _ = stack
    settings = ApiSettings(
        admin_token=Secret(PLATFORM), platform_database_url=Secret(platform_url_for(s.postgres, s.url))
    )
    with TestClient(create_app(settings, api_url_for(s.postgres, s.url))) as client:
        yield client


def reading(ts_ms: int, seq: int, **metrics: Any) -> bytes:
    return json.dumps({"ts": ts_ms, "seq": seq, "metrics": metrics}).encode()


async def publish(s: ProdStack, tenant: str, device: str, payloads: list[bytes], pause_s: float = 0.0) -> None:
    client = MqttPublisher("127.0.0.1", s.auth.mtls_port, device, tls=s.enrol(device) if device not in s.serials
                           else s.tls(s.root / "devices" / f"{device}.crt", s.root / "devices" / f"{device}.key"))  # fmt: skip
    await client.connect()
    try:
        for payload in payloads:
            assert await client.publish(f"v1/{tenant}/d/{device}/telemetry", payload) < 0x80
            if pause_s:
                await asyncio.sleep(pause_s)
    finally:
        await client.close()


def rows(s: ProdStack, query: str, *args: Any) -> list[dict[str, Any]]:
    with psycopg.connect(s.url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(query, args).fetchall()


def hot(device: str, notify: list[str], **extra: Any) -> dict[str, Any]:
    temp = {"kind": "metric", "name": "temp"}
    return {
        "name": "boiler too hot", "metrics": ["temp"], "scope": {"devices": [device]}, "notify": notify,
        "alarm": {"severity": "critical", "for_s": 2,
                  "when": {"op": "compare", "cmp": "gt", "left": temp, "right": {"kind": "const", "value": 80}},
                  "clear_when": {"op": "compare", "cmp": "lt", "left": temp, "right": {"kind": "const", "value": 75}}},
        **extra,
    }  # fmt: skip


def test_a_hot_boiler_raises_one_alarm_one_signed_webhook_one_mail_and_clears(
    stack: tuple[ProdStack, Mailbox],
    api: TestClient[Litestar],
    receiver: HttpReceiver,
) -> None:
    s, mailbox = stack
    tenant, (device,) = s.tenant(1, prefix="hot")
    auth = tenant_token(s.url, tenant)
    hook = api.post(f"{V1}/channels", headers=auth, json={"channel_id": "hook", "config": {
        "kind": "webhook", "url": receiver.url(f"/ok/{tenant}")}}).json()  # fmt: skip
    mail = {"channel_id": "mail", "config": {"kind": "email", "to": ["ops@plant.test"]}}
    assert api.post(f"{V1}/channels", headers=auth, json=mail).status_code == 201
    rule = hot(device, ["hook", "mail"], on_raise=[{"do": "set_desired", "state": {"burner": "off"}},
                                                   {"do": "command", "name": "vent", "params": {"minutes": 5}}])  # fmt: skip
    created = api.post(f"{V1}/rules", json=rule, headers=auth)
    assert created.status_code == 201, created.text
    t0 = int(time.time() * 1000) - 60_000
    # 85 for 3 s (the duration is 2 s), hot still, then 74: raise at t0+1s+2s, clear at the 74.
    series = [(0, 70), (1, 85), (2, 86), (3, 88), (4, 84), (5, 78), (6, 74)]
    asyncio.run(publish(s, tenant, device, [reading(t0 + i * 1000, i, temp=v) for i, v in series]))

    def events() -> list[str]:
        return [r["event"] for r in rows(s, "SELECT event FROM alarm_events WHERE tenant_id = %s ORDER BY id", tenant)]

    assert wait_until(lambda: events() == ["raised", "cleared"], 30), events()
    (alarm,) = rows(s, "SELECT * FROM alarms WHERE tenant_id = %s", tenant)
    assert alarm["raised_at"] == datetime.fromtimestamp((t0 + 3000) / 1000, UTC)  # when the 2 s had passed
    assert alarm["raised_values"] == {"temp": 88} and alarm["cleared_values"] == {"temp": 74}
    assert alarm["status"] == "cleared" and alarm["cleared_by"] == "rule"
    # Notifications: the cleared one arriving is the control; by then exactly one of each was sent.
    path = f"/ok/{tenant}"
    assert wait_until(lambda: len(receiver.on(path)) >= 2, 30)
    hooks = receiver.on(path)
    documents = [json.loads(h.body) for h in hooks]
    assert [d["event"] for d in documents] == ["raised", "cleared"]
    for h in hooks:
        assert verify(hook["secret"], h.headers[SIGNATURE_HEADER], h.body, now=int(time.time()))
        assert not verify(hook["secret"], h.headers[SIGNATURE_HEADER], h.body + b" ", now=int(time.time()))
    assert len({h.headers["Idempotency-Key"] for h in hooks}) == 2
    assert wait_until(
        lambda: sum(tenant in str(m["Subject"]) or device in str(m["Subject"]) for m in mailbox.messages) >= 2, 30
    )
    mine = [m for m in mailbox.messages if device in str(m["Subject"])]
    assert [m["Subject"].split(": ")[-1] for m in mine] == ["raised", "cleared"] and all(
        m["To"] == "ops@plant.test" for m in mine
    )
    assert all(tls and logged_in for tls, logged_in in mailbox.sessions)
    # The actions ran once: desired state and a queued command.
    assert rows(s, "SELECT desired FROM device_shadows WHERE device_id = %s AND name = ''", device)[0]["desired"] == {
        "burner": "off"
    }
    assert [r["name"] for r in rows(s, "SELECT name FROM commands WHERE device_id = %s", device)] == ["vent"]
    # People: acknowledge through the API records who and when; the log shows both deliveries per channel.
    acked = api.post(f"{V1}/alarms/{alarm['alarm_id']}/acknowledge", headers=auth).json()
    assert acked["acknowledged"] and acked["acknowledged_by"].startswith("token:") and acked["acknowledged_at"]
    history = api.get(f"{V1}/alarms/{alarm['alarm_id']}/history", headers=auth).json()
    assert Counter((d["channel_id"], d["status"]) for d in history["deliveries"]) == {
        ("hook", "delivered"): 2,
        ("mail", "delivered"): 2,
    }
    # The dry run over the same stored readings gives the same transitions at the same times.
    start = datetime.fromtimestamp((t0 - 1000) / 1000, UTC).isoformat()
    dry = api.post(f"{V1}/rules/dry-run", headers=auth, json={"rule": rule, "start": start, "duration_s": 11}).json()
    (outcome,) = dry["devices"]
    live = [
        (e["event"], int(e["at"].timestamp() * 1000))
        for e in rows(
            s,
            "SELECT event, at FROM alarm_events WHERE tenant_id = %s AND event IN ('raised', 'cleared') ORDER BY id",
            tenant,
        )
    ]
    assert [(t["type"], t["at_ms"]) for t in outcome["transitions"]] == live
    assert [e["actions"] for e in dry["effects"]] == [["SetDesired", "SendCommand"], []]


def test_absence_raises_after_the_silence_and_clears_when_the_device_speaks(
    stack: tuple[ProdStack, Mailbox],
    api: TestClient[Litestar],
) -> None:
    s, _ = stack
    tenant, (device,) = s.tenant(1, prefix="quiet")
    auth = tenant_token(s.url, tenant)
    rule = {"name": "pump silent", "scope": {"devices": [device]},
            "alarm": {"severity": "major", "when": {"op": "absent", "seconds": 3}}}  # fmt: skip
    assert api.post(f"{V1}/rules", json=rule, headers=auth).status_code == 201
    now = int(time.time() * 1000)
    asyncio.run(publish(s, tenant, device, [reading(now, 1, flow=3.2)]))

    def alarm() -> dict[str, Any] | None:
        found = rows(s, "SELECT status, raised_at FROM alarms WHERE tenant_id = %s", tenant)
        return found[0] if found else None

    assert wait_until(lambda: alarm() is not None, 20), "the silence did not raise"
    raised = alarm()
    assert raised is not None and raised["raised_at"] == datetime.fromtimestamp((now + 3000) / 1000, UTC)
    asyncio.run(publish(s, tenant, device, [reading(int(time.time() * 1000), 2, flow=3.1)]))
    assert wait_until(lambda: (alarm() or {}).get("status") == "cleared", 20)


def test_failing_receivers_are_retried_then_dead_lettered_without_slowing_the_others(
    stack: tuple[ProdStack, Mailbox],
    api: TestClient[Litestar],
    receiver: HttpReceiver,
) -> None:
    s, _ = stack
    tenant, (device,) = s.tenant(1, prefix="flaky")
    auth = tenant_token(s.url, tenant)
    for name in ("fail", "hang", "ok"):
        config = {"kind": "webhook", "url": receiver.url(f"/{name}/{tenant}")}
        assert api.post(f"{V1}/channels", headers=auth, json={"channel_id": name, "config": config}).status_code == 201
    rule = hot(device, ["fail", "hang", "ok"])
    rule["alarm"]["for_s"] = 0
    assert api.post(f"{V1}/rules", json=rule, headers=auth).status_code == 201
    published = time.monotonic()
    asyncio.run(publish(s, tenant, device, [reading(int(time.time() * 1000), 1, temp=95)]))
    assert wait_until(lambda: len(receiver.on(f"/ok/{tenant}")) == 1, 20)
    # The healthy receiver is not held up by the hanging one (its timeout is 2 s, three attempts).
    assert receiver.on(f"/ok/{tenant}")[0].at - published < 5

    def statuses() -> dict[str, tuple[str, int, str | None]]:
        found = rows(s, "SELECT channel_id, status, attempts, last_error FROM deliveries WHERE tenant_id = %s", tenant)
        return {r["channel_id"]: (r["status"], r["attempts"], r["last_error"]) for r in found}

    assert wait_until(lambda: all(v[0] != "pending" for v in statuses().values()), 40), statuses()
    final = statuses()
    assert final["ok"][:2] == ("delivered", 1)
    assert final["fail"][:2] == ("dead", 3) and "http_500" in (final["fail"][2] or "")
    assert final["hang"][:2] == ("dead", 3) and "timeout" in (final["hang"][2] or "")
    assert len(receiver.on(f"/fail/{tenant}")) == 3  # every attempt reached it, with the same idempotency key
    assert len({r.headers["Idempotency-Key"] for r in receiver.on(f"/fail/{tenant}")}) == 1


def test_a_tenants_rule_sees_only_its_tenants_devices(
    stack: tuple[ProdStack, Mailbox], api: TestClient[Litestar], receiver: HttpReceiver
) -> None:
    s, _ = stack
    mine, (my_device,) = s.tenant(1, prefix="ta")
    theirs, (their_device,) = s.tenant(1, prefix="tb")
    auth = tenant_token(s.url, mine)
    config = {"kind": "webhook", "url": receiver.url(f"/ok/{mine}")}
    assert api.post(f"{V1}/channels", headers=auth, json={"channel_id": "hook", "config": config}).status_code == 201
    rule = hot(my_device, ["hook"])
    rule["scope"] = {}  # the whole tenant
    rule["alarm"]["for_s"] = 0
    assert api.post(f"{V1}/rules", json=rule, headers=auth).status_code == 201
    now = int(time.time() * 1000)
    asyncio.run(publish(s, theirs, their_device, [reading(now, 1, temp=99)]))  # the other tenant's boiler is hot
    asyncio.run(publish(s, mine, my_device, [reading(now, 1, temp=99)]))  # the control: mine too, after it
    assert wait_until(lambda: len(receiver.on(f"/ok/{mine}")) == 1, 20)
    assert [json.loads(r.body)["device"] for r in receiver.on(f"/ok/{mine}")] == [my_device]
    assert [r["device_id"] for r in rows(s, "SELECT device_id FROM alarms WHERE tenant_id = %s", mine)] == [my_device]
    assert rows(s, "SELECT alarm_id FROM alarms WHERE device_id = %s", their_device) == []


def test_a_rule_that_cannot_decide_is_counted_and_never_stops_the_others(
    stack: tuple[ProdStack, Mailbox], api: TestClient[Litestar]
) -> None:
    s, _ = stack
    tenant, (device,) = s.tenant(1, prefix="err")
    auth = tenant_token(s.url, tenant)
    broken = hot(device, [])
    broken["name"] = "reads a shadow value the device never reported"
    broken["alarm"]["for_s"] = 0
    broken["alarm"]["when"]["right"] = {"kind": "shadow", "path": "limits.max_temp"}
    working = hot(device, [])
    working["alarm"]["for_s"] = 0
    created = api.post(f"{V1}/rules", json=broken, headers=auth).json()
    assert api.post(f"{V1}/rules", json=working, headers=auth).status_code == 201
    before = s.metric("rules", "kestrel_rules_errors_total", reason="missing_value")
    asyncio.run(publish(s, tenant, device, [reading(int(time.time() * 1000), 1, temp=99)]))
    assert wait_until(lambda: len(rows(s, "SELECT 1 FROM alarms WHERE tenant_id = %s", tenant)) == 1, 20)
    assert s.metric("rules", "kestrel_rules_errors_total", reason="missing_value") > before
    assert wait_until(lambda: created["rule_id"] in s.log("rules"), 10)  # logged with the rule's id
    (alarm,) = rows(s, "SELECT rule_name FROM alarms WHERE tenant_id = %s", tenant)
    assert alarm["rule_name"] == "boiler too hot"


def test_a_malformed_message_is_dead_lettered_with_its_reason(stack: tuple[ProdStack, Mailbox]) -> None:
    s, _ = stack
    tenant, (device,) = s.tenant(1, prefix="bad")

    async def inject() -> None:
        nc = await nats.connect(s.nats.url)
        try:
            await nc.jetstream().publish(f"v1.{tenant}.d.{device}.telemetry", b"\x00not an envelope", timeout=5)
        finally:
            await nc.close()

    asyncio.run(inject())
    letters = asyncio.run(deadletters(s.nats.url, topic_contains="rules.", expect=1, timeout=20))
    mine = [d for d in letters if d["subject"].startswith("dlq.rules.") and device in d[streams.HDR_TOPIC]]
    assert mine and mine[0][streams.HDR_STAGE] == "rules", letters


DIGEST_WINDOW_S = 6  # the rule workers' KESTREL_RULES_DIGEST_WINDOW_S in tests/prodstack.py


def test_a_storm_past_the_channels_rate_becomes_one_digest(
    stack: tuple[ProdStack, Mailbox], api: TestClient[Litestar], receiver: HttpReceiver
) -> None:
    s, _ = stack
    tenant, devices = s.tenant(6, prefix="storm")
    auth = tenant_token(s.url, tenant)
    config = {"kind": "webhook", "url": receiver.url(f"/ok/{tenant}")}
    channel = {"channel_id": "hook", "per_minute": 2, "config": config}
    assert api.post(f"{V1}/channels", headers=auth, json=channel).status_code == 201
    rule = hot(devices[0], ["hook"])
    rule["scope"] = {}
    rule["alarm"]["for_s"] = 0
    assert api.post(f"{V1}/rules", json=rule, headers=auth).status_code == 201
    now = int(time.time() * 1000)
    digested = "SELECT 1 FROM deliveries WHERE tenant_id = %s AND status = 'digested'"
    # Six boilers overheat at once: six alarms, a channel allowing two a minute. The storm is made to cross a boundary
    # of the clock's windows of the digest's width (the first fold before it, the others after): it is still one
    # digest, as the window opens with the storm (a digest per clock window made it two).
    for device in devices:
        s.enrol(device)  # before the clock is watched: the publishes below then take a moment each
    time.sleep((DIGEST_WINDOW_S / 2 - time.time()) % DIGEST_WINDOW_S)
    boundary = (time.time() // DIGEST_WINDOW_S + 1) * DIGEST_WINDOW_S
    for device in devices[:3]:
        asyncio.run(publish(s, tenant, device, [reading(now, 1, temp=99)]))
    assert wait_until(lambda: len(rows(s, digested, tenant)) == 1, 20)
    time.sleep(max(0.0, boundary + 0.1 - time.time()))
    for device in devices[3:]:
        asyncio.run(publish(s, tenant, device, [reading(now, 1, temp=99)]))
    assert wait_until(lambda: len(rows(s, "SELECT 1 FROM alarms WHERE tenant_id = %s", tenant)) == 6, 20)
    # The digest is the control: it arrives after the window, by when every individual delivery was decided.
    assert wait_until(lambda: any(json.loads(r.body).get("kind") == "digest" for r in receiver.on(f"/ok/{tenant}")), 30)
    bodies = [json.loads(r.body) for r in receiver.on(f"/ok/{tenant}")]
    singles = [b for b in bodies if b.get("kind") != "digest"]
    (digest,) = [b for b in bodies if b.get("kind") == "digest"]
    assert len(singles) == 2 and digest["count"] == 4
    assert {e["device"] for e in digest["events"]} | {b["device"] for b in singles} == set(devices)
    statuses = Counter(r["status"] for r in rows(s, "SELECT status FROM deliveries WHERE tenant_id = %s", tenant))
    assert statuses == {"delivered": 3, "digested": 4}


def _event_rule(name: str, kinds: list[str], value: str, when: str, clear: str, **extra: Any) -> dict[str, Any]:
    def eq(expected: str) -> dict[str, Any]:
        return {"op": "compare", "cmp": "eq", "left": {"kind": "metric", "name": value},
                "right": {"kind": "const", "value": expected}}  # fmt: skip

    return {"name": name, "trigger": {"kind": "events", "events": kinds},
            "alarm": {"severity": "warning", "when": eq(when), "clear_when": eq(clear)}, **extra}  # fmt: skip


def test_presence_and_lifecycle_events_raise_and_clear_alarms_for_their_tenant_only(
    stack: tuple[ProdStack, Mailbox], api: TestClient[Litestar]
) -> None:
    """Presence comes from devicesvc's broker events (the device connects over mTLS through the plugin), lifecycle
    from its journal of the API's change: both reach the device's partition and raise, then clear."""
    s, _ = stack
    mine, (device,) = s.tenant(1, prefix="ev")
    theirs, (their_device,) = s.tenant(1, prefix="evb")
    auth = tenant_token(s.url, mine)
    gone = _event_rule("left", ["presence"], "presence.event", "disconnected", "connected")
    suspended = _event_rule("suspended", ["lifecycle"], "lifecycle.status", "suspended", "active")
    for rule in (gone, suspended):
        assert api.post(f"{V1}/rules", json=rule, headers=auth).status_code == 201

    def history(name: str) -> list[tuple[str, str]]:
        found = rows(s, "SELECT a.device_id, e.event FROM alarm_events e JOIN alarms a USING (alarm_id)"
                        " WHERE a.tenant_id = %s AND a.rule_name = %s ORDER BY e.id", mine, name)  # fmt: skip
        return [(r["device_id"], r["event"]) for r in found]

    asyncio.run(publish(s, theirs, their_device, [reading(int(time.time() * 1000), 1, flow=1.0)]))  # B's goes away
    asyncio.run(publish(s, mine, device, [reading(int(time.time() * 1000), 1, flow=1.0)]))  # connects and leaves
    assert wait_until(lambda: history("left") == [(device, "raised")], 30), history("left")
    # it comes back (clears) and leaves again (the cleared, unacknowledged alarm re-opens)
    asyncio.run(publish(s, mine, device, [reading(int(time.time() * 1000), 2, flow=1.0)]))
    expected = [(device, "raised"), (device, "cleared"), (device, "retriggered")]
    assert wait_until(lambda: history("left") == expected, 30), history("left")
    assert rows(s, "SELECT alarm_id FROM alarms WHERE device_id = %s", their_device) == []

    for status, event in (("suspended", "raised"), ("active", "cleared")):
        assert api.patch(f"{V1}/devices/{device}", json={"status": status}, headers=auth).status_code == 200
        assert wait_until(lambda e=event: history("suspended")[-1:] == [(device, e)], 30), history("suspended")  # type: ignore[misc]
    assert history("suspended") == [(device, "raised"), (device, "cleared")]


def test_a_schedule_ticks_every_device_in_scope_once_per_period(
    stack: tuple[ProdStack, Mailbox], api: TestClient[Litestar]
) -> None:
    """A rule on a schedule sees each device in its scope at the period's start, with its presence: a device that
    never connected is not online, so its alarm is raised at that instant; a device out of scope is never ticked."""
    s, _ = stack
    tenant, (watched, _unwatched) = s.tenant(2, prefix="sched")
    auth = tenant_token(s.url, tenant)
    offline = {"op": "compare", "cmp": "eq", "left": {"kind": "metric", "name": "tick.online"},
               "right": {"kind": "const", "value": False}}  # fmt: skip
    rule = {"name": "never online", "trigger": {"kind": "schedule", "every_s": 60}, "scope": {"devices": [watched]},
            "alarm": {"severity": "info", "when": offline}}  # fmt: skip
    created = api.post(f"{V1}/rules", json=rule, headers=auth)
    assert created.status_code == 201, created.text
    assert wait_until(lambda: len(rows(s, "SELECT 1 FROM alarms WHERE tenant_id = %s", tenant)) == 1, 30)
    (alarm,) = rows(s, "SELECT device_id, raised_at FROM alarms WHERE tenant_id = %s", tenant)
    assert alarm["device_id"] == watched
    assert alarm["raised_at"].timestamp() % 60 == 0  # the period's start, the same instant for every device

    async def ticks() -> list[tuple[str, str]]:
        nc = await nats.connect(s.nats.url)
        try:
            js = nc.jetstream()
            sub = await js.subscribe(f"rules.tick.{tenant}.*", ordered_consumer=True)
            found = []
            with contextlib.suppress(TimeoutError):
                while True:
                    msg = await sub.next_msg(timeout=1)
                    found.append((msg.subject, (msg.headers or {}).get(streams.HDR_MSG_ID, "")))
            return found
        finally:
            await nc.close()

    # Only the watched device is ticked, once per period (a minute boundary may pass while the test runs: then the
    # next period's tick is there too, with its own slot in its message id).
    found = asyncio.run(ticks())
    assert {subject for subject, _ in found} == {f"rules.tick.{tenant}.{watched}"}
    slots = [msg_id.rsplit("-", 1)[-1] for _, msg_id in found]
    assert len(slots) == len(set(slots)) <= 3, found
    (slot,) = rows(s, "SELECT slot FROM rule_schedules WHERE rule_id = %s", created.json()["rule_id"])
    assert slot["slot"] * 60 - int(alarm["raised_at"].timestamp()) in (0, 60, 120)  # the last period ticked
    dry = api.post(f"{V1}/rules/dry-run", headers=auth, json={"rule": rule, "start": "2026-01-01T00:00:00Z",
                                                              "duration_s": 3600})  # fmt: skip
    assert dry.status_code == 400 and "$.trigger" in dry.json()["detail"], dry.text


def test_a_derived_value_is_recorded_with_the_alarm_and_written_into_telemetry_once(
    stack: tuple[ProdStack, Mailbox], api: TestClient[Litestar]
) -> None:
    """The 10-minute average at the raise is in the alarm's values and stored as a reading of the device's ``rules``
    stream at the raise's instant, through the same TELEMETRY stream and writer as the device's own readings."""
    s, _ = stack
    tenant, (device,) = s.tenant(1, prefix="drv")
    auth = tenant_token(s.url, tenant)
    rule = hot(device, [], derive={"temp_avg": {"kind": "window", "agg": "avg", "metric": "temp", "seconds": 600}},
               on_raise=[{"do": "write_metric", "metrics": ["temp_avg"]}])  # fmt: skip
    rule["alarm"]["for_s"] = 0
    assert api.post(f"{V1}/rules", json=rule, headers=auth).status_code == 201
    now = int(time.time() * 1000)
    asyncio.run(publish(s, tenant, device, [reading(now - 2000, 1, temp=70), reading(now - 1000, 2, temp=80),
                                            reading(now, 3, temp=99)]))  # fmt: skip
    stored = "SELECT ts, metrics FROM telemetry WHERE device_id = %s AND stream = 'rules'"
    assert wait_until(lambda: len(rows(s, stored, device)) == 1, 30)
    (alarm,) = rows(s, "SELECT raised_at, raised_values FROM alarms WHERE tenant_id = %s", tenant)
    assert alarm["raised_values"] == {"temp": 99, "temp_avg": 83.0}
    (derived,) = rows(s, stored, device)
    assert derived == {"ts": alarm["raised_at"], "metrics": {"temp_avg": 83.0}}
    # the control: a later reading of the device is stored, and the derived one still once
    asyncio.run(publish(s, tenant, device, [reading(now + 1000, 4, temp=98)]))
    assert wait_until(lambda: len(rows(s, "SELECT 1 FROM telemetry WHERE device_id = %s", device)) == 5, 30)
    assert len(rows(s, stored, device)) == 1


def test_readings_that_overtook_older_ones_are_evaluated_in_time_order_and_late_ones_are_counted(
    stack: tuple[ProdStack, Mailbox], api: TestClient[Litestar]
) -> None:
    """A device's readings reach the workers out of order when two bridges forward them or one resends after a NATS
    restart: the worker evaluates them in time order (as the dry run reads them), so a spike that arrived after the
    reading that followed it still raises and clears its alarm; one that comes later than the reorder hold behind a
    newer reading is skipped and counted, never silently."""
    s, _ = stack
    tenant, (device,) = s.tenant(1, prefix="ooo")
    auth = tenant_token(s.url, tenant)
    rule = hot(device, [])
    rule["alarm"]["for_s"] = 0
    assert api.post(f"{V1}/rules", json=rule, headers=auth).status_code == 201
    t0 = int(time.time() * 1000) - 60_000
    # One message whose readings are out of order: the spike (t0+1s) comes after the calm reading that followed it.
    batch = json.dumps([{"ts": t0 + 2000, "seq": 2, "metrics": {"temp": 70}},
                        {"ts": t0 + 1000, "seq": 1, "metrics": {"temp": 90}}]).encode()  # fmt: skip

    def events() -> list[tuple[str, int]]:
        found = rows(s, "SELECT event, at FROM alarm_events WHERE tenant_id = %s ORDER BY id", tenant)
        return [(r["event"], int(r["at"].timestamp() * 1000)) for r in found]

    asyncio.run(publish(s, tenant, device, [batch]))
    assert wait_until(lambda: len(events()) >= 2, 20), events()
    assert events() == [("raised", t0 + 1000), ("cleared", t0 + 2000)]

    late_before = s.metric("rules", "kestrel_rules_late_total")
    asyncio.run(publish(s, tenant, device, [reading(t0 + 500, 0, temp=95)]))  # older than all: late
    assert wait_until(lambda: s.metric("rules", "kestrel_rules_late_total") > late_before, 20)
    asyncio.run(publish(s, tenant, device, [reading(t0 + 3000, 3, temp=95)]))  # the control: a newer spike raises
    assert wait_until(lambda: len(events()) >= 3, 20), events()
    assert events() == [("raised", t0 + 1000), ("cleared", t0 + 2000), ("retriggered", t0 + 3000)]


def test_rule_actions_are_limited_per_tenant_per_second_across_workers(
    stack: tuple[ProdStack, Mailbox], api: TestClient[Litestar]
) -> None:
    """The platform administrator sets a tenant's rule actions per second; one reading that fires four rules with an
    action each gets one action done and three refused as over the rate (counted), while every transition is
    recorded. The budget is the database's (migration 0020), so every worker spends the same one."""
    s, _ = stack
    tenant, (device,) = s.tenant(1, prefix="rate")
    auth = tenant_token(s.url, tenant)
    admin = {"Authorization": f"Bearer {PLATFORM}"}
    changed = api.patch(f"{V1}/tenants/{tenant}", headers=admin, json={"rule_actions_per_s": 1, "max_rules": 10})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["rule_actions_per_s"], changed.json()["max_rules"]) == (1, 10)
    assert api.patch(f"{V1}/tenants/{tenant}", headers=admin, json={"rule_actions_per_s": 0}).status_code == 400
    for n in range(4):
        rule = hot(device, [], on_raise=[{"do": "republish", "subject": f"hot.r{n}"}])
        rule["alarm"]["for_s"] = 0
        rule["name"] = f"hot {n}"
        assert api.post(f"{V1}/rules", json=rule, headers=auth).status_code == 201

    def effects(outcome: str) -> float:
        return s.metric("rules", "kestrel_rules_effects_total", kind="republish", outcome=outcome)

    done, limited = effects("done"), effects("rate_limited")
    asyncio.run(publish(s, tenant, device, [reading(int(time.time() * 1000), 1, temp=95)]))
    raised = "SELECT count(*) AS n FROM alarm_events WHERE tenant_id = %s AND event = 'raised'"
    assert wait_until(lambda: rows(s, raised, tenant)[0]["n"] == 4, 20)  # every transition, whatever the rate
    assert wait_until(lambda: effects("done") - done + effects("rate_limited") - limited == 4, 10)
    assert (effects("done") - done, effects("rate_limited") - limited) == (1, 3)


def test_a_republish_to_mqtt_reaches_the_tenants_devices_and_no_other_tenants(
    stack: tuple[ProdStack, Mailbox], api: TestClient[Litestar]
) -> None:
    """A rule republishes its transitions on the broker (``to: mqtt``) as the ``rules`` principal; a device of the
    tenant subscribed over mTLS to ``v1/{tenant}/out/#`` gets them; a device of another tenant is refused that filter
    and gets nothing, while its own tenant's transition (the control) reaches it."""
    s, _ = stack
    tenant, (device, panel) = s.tenant(2, prefix="rpm")
    other, (intruder, lurker) = s.tenant(2, prefix="rpx")
    for owner, target in ((tenant, device), (other, intruder)):
        rule = hot(target, [], on_raise=[{"do": "republish", "subject": "alarms.boiler", "to": "mqtt"}])
        rule["alarm"]["for_s"] = 0
        assert api.post(f"{V1}/rules", json=rule, headers=tenant_token(s.url, owner)).status_code == 201

    async def scenario() -> None:
        watcher = MqttPublisher("127.0.0.1", s.auth.mtls_port, panel, tls=s.enrol(panel))
        spy = MqttPublisher("127.0.0.1", s.auth.mtls_port, lurker, tls=s.enrol(lurker))
        await watcher.connect()
        await spy.connect()
        try:
            assert await watcher.subscribe(f"v1/{tenant}/out/#") == 1
            assert await spy.subscribe(f"v1/{tenant}/out/#") >= 0x80  # the other tenant's topics: refused
            assert await spy.subscribe("v1/+/out/#") >= 0x80
            assert await spy.subscribe(f"v1/{other}/out/#") == 1
            await publish(s, tenant, device, [reading(int(time.time() * 1000), 1, temp=95)])
            topic, body = await asyncio.wait_for(watcher.received.get(), 20)
            assert topic == f"v1/{tenant}/out/alarms/boiler"
            document = json.loads(body)
            assert (document["tenant"], document["device"], document["event"]) == (tenant, device, "raised")
            # The control: the intruder's own tenant's transition arrives, and nothing of the first tenant's before it.
            await publish(s, other, intruder, [reading(int(time.time() * 1000), 1, temp=95)])
            topic, body = await asyncio.wait_for(spy.received.get(), 20)
            assert topic == f"v1/{other}/out/alarms/boiler" and json.loads(body)["tenant"] == other
            assert spy.received.empty()
        finally:
            await watcher.close()
            await spy.close()

    asyncio.run(scenario())
