"""PostgreSQL: a cluster of our own (initdb on first start), the application, API and platform roles."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.rows import dict_row

from kestrel.devtools.servers.base import (
    LOOPBACK,
    ManagedProcess,
    ServerFailed,
    _as_user,
    _chown,
    ensure_port_free,
    reachable_root,
)


def postgres_bindir() -> Path:
    """Directory of ``initdb``/``postgres``: ``KESTREL_PG_BIN`` or the newest Debian install."""
    if env := os.environ.get("KESTREL_PG_BIN"):
        return Path(env)
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if not candidates:
        raise ServerFailed("PostgreSQL binaries not found; install postgresql-15 (see README)")
    return candidates[-1].parent


@dataclass
class PostgresServer(ManagedProcess):
    """A PostgreSQL cluster of our own, run as the ``postgres`` user when we are root."""

    root: Path = Path()
    port: int = 5432
    shared_buffers: str = "256MB"
    database: str = "kestrel"
    role: str = "kestrel"
    #: The API's login: owns nothing and cannot bypass row-level security (migration 0008, ADR-0012).
    api_role: str = "kestrel_api"
    #: The API's login for platform (tenant) operations only: may call their functions, nothing else (0012).
    platform_role: str = "kestrel_platform"
    extra_conf: str = ""

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def _secret_file(self) -> Path:
        return self.root / "password"

    def _password(self) -> str:
        return self._secret_file.read_text().strip()

    @property
    def url(self) -> str:
        """Connection string for the application role."""
        return f"postgresql://{self.role}:{self._password()}@{LOOPBACK}:{self.port}/{self.database}"

    @property
    def api_url(self) -> str:
        """Connection string for the API's role (same secret file: one loopback cluster of our own)."""
        return f"postgresql://{self.api_role}:{self._password()}@{LOOPBACK}:{self.port}/{self.database}"

    @property
    def platform_url(self) -> str:
        """Connection string for the platform operations' role (same secret file)."""
        return f"postgresql://{self.platform_role}:{self._password()}@{LOOPBACK}:{self.port}/{self.database}"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres:{self._password()}@{LOOPBACK}:{self.port}/postgres"

    def _initdb(self) -> None:
        bindir = postgres_bindir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        password = secrets.token_urlsafe(24)
        self._secret_file.write_text(password + "\n")
        self._secret_file.chmod(0o600)
        pwfile = self.root / "initdb-pw"
        pwfile.write_text(password + "\n")
        _chown(self.root, "postgres")
        proc = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--pwfile",
                str(pwfile),
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ],
            capture_output=True,
            check=False,
            **_as_user("postgres"),  # type: ignore[call-overload]
        )
        pwfile.unlink()
        if proc.returncode != 0:
            raise ServerFailed(f"initdb failed: {proc.stderr.decode(errors='replace').strip()[-400:]}")
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# kestrel embedded defaults\n"
                f"listen_addresses = '{LOOPBACK}'\n"
                f"unix_socket_directories = '{self.root}'\n"
                f"shared_buffers = {self.shared_buffers}\n"
                "max_wal_size = 2GB\nsynchronous_commit = on\nfsync = on\n"
                "max_connections = 200\nlog_min_messages = warning\n"
                "timezone = 'UTC'\n" + self.extra_conf
            )

    def start(self, timeout: float = 60.0) -> None:
        self.root = reachable_root(self.root, "postgres")
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        ensure_port_free("postgres", self.port)
        self._spawn(
            [str(postgres_bindir() / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)],
            **_as_user("postgres"),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise self.fail("exited during start-up")
            try:
                with psycopg.connect(self.admin_url, connect_timeout=2, autocommit=True) as conn:
                    row = conn.cursor(row_factory=dict_row).execute("SHOW data_directory").fetchone()
                    if row is None or Path(row["data_directory"]).resolve() != self.data_dir.resolve():
                        raise self.fail(f"port {self.port} answered but is not our cluster")
                    self._bootstrap(conn)
                    return
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise self.fail(f"did not accept connections within {timeout:.0f}s")

    def _bootstrap(self, conn: psycopg.Connection) -> None:
        unprivileged = " NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE"
        for role, attributes in ((self.role, ""), (self.api_role, unprivileged), (self.platform_role, unprivileged)):
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None
            conn.execute(
                psycopg.sql.SQL("{} ROLE {} LOGIN PASSWORD {}" + attributes).format(
                    psycopg.sql.SQL("ALTER" if exists else "CREATE"),
                    psycopg.sql.Identifier(role),
                    psycopg.sql.Literal(self._password()),
                )
            )
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone() is None:
            conn.execute(
                psycopg.sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    psycopg.sql.Identifier(self.database), psycopg.sql.Identifier(self.role)
                )
            )

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> None:
        """SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, checkpoint, exit."""
        super().stop(sig, timeout)


# --------------------------------------------------------------------------------------------------- NATS
