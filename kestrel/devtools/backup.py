"""``kestrel backup`` / ``kestrel restore`` for the embedded default (issue 15, ADR-0027).

A backup is one encrypted file: a tar of the database (``pg_dump`` custom format, taken online from the running
stack: one consistent snapshot, the PKI's keys included, themselves encrypted by the PKI's passphrase) and the state
directory's own files (tokens, signing keys, the PKI passphrase, TLS files, the simulated devices' keys). It leaves
out what is rebuilt: the PostgreSQL cluster's files, NATS's streams (telemetry not yet stored is the devices' to
resend), Mosquitto's sessions, logs, ``kestrel.env``.

Encryption: AES-256-GCM over 1 MiB chunks, the key from the passphrase by scrypt (N=2^15, r=8, p=1) and a random
salt; each chunk's nonce is a random prefix and its counter, and the last chunk is authenticated as the last, so a
truncated, reordered or altered file fails to decrypt instead of restoring part of a backup.
"""

from __future__ import annotations

import os
import secrets
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Final
from urllib.parse import quote, urlsplit, urlunsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from kestrel.devtools.servers.postgres import PostgresServer, postgres_bindir
from kestrel_core.errors import InvalidInput

MAGIC: Final = b"KESTREL-BACKUP-1\n"
CHUNK: Final = 1 << 20
#: What the state directory's backup leaves out (rebuilt, transient or regenerated at start).
EXCLUDED: Final = frozenset({"postgres", "nats", "mosquitto", "logs", "kestrel.env"})
DUMP: Final = "database.dump"


def _key(passphrase: bytes, salt: bytes) -> bytes:
    if len(passphrase) < 12:
        raise InvalidInput("weak_passphrase", "the backup passphrase must have at least 12 characters")
    return Scrypt(salt=salt, length=32, n=2**15, r=8, p=1).derive(passphrase)


def encrypt(source: BinaryIO, target: BinaryIO, passphrase: bytes) -> None:
    salt, prefix = secrets.token_bytes(16), secrets.token_bytes(8)
    aead = AESGCM(_key(passphrase, salt))
    target.write(MAGIC + salt + prefix)
    counter, chunk = 0, source.read(CHUNK)
    while True:
        following = source.read(CHUNK)
        last = not following
        sealed = aead.encrypt(prefix + struct.pack(">I", counter), chunk, b"last" if last else b"more")
        target.write(struct.pack(">I", len(sealed)) + sealed)
        if last:
            return
        counter, chunk = counter + 1, following


def decrypt(source: BinaryIO, target: BinaryIO, passphrase: bytes) -> None:
    if source.read(len(MAGIC)) != MAGIC:
        raise InvalidInput("not_a_backup", "not a Kestrel backup file")
    salt, prefix = source.read(16), source.read(8)
    aead = AESGCM(_key(passphrase, salt))
    counter = 0
    while header := source.read(4):
        (size,) = struct.unpack(">I", header)
        sealed = source.read(size)
        nonce = prefix + struct.pack(">I", counter)
        try:
            last = _at_end(source)
            target.write(aead.decrypt(nonce, sealed, b"last" if last else b"more"))
        except InvalidTag as exc:
            raise InvalidInput("bad_backup", "wrong passphrase, or the backup file was altered or truncated") from exc
        if last:
            return
        counter += 1
    raise InvalidInput("bad_backup", "the backup file was truncated")


def _at_end(source: BinaryIO) -> bool:
    here = source.tell()
    more = source.read(1)
    source.seek(here)
    return not more


def _state_files(state: Path) -> Iterator[Path]:
    for path in sorted(state.iterdir()):
        if path.name not in EXCLUDED:
            yield path


def _superuser_url(state: Path, database_url: str) -> str:
    """The embedded cluster's superuser on the same database: the dump reads every row whatever the tables' row-level
    security (a policy that hid rows from the owner would otherwise shorten the backup without a word)."""
    secret = state / "postgres" / "password"
    if not secret.is_file():
        raise InvalidInput("not_embedded", f"{state} holds no embedded PostgreSQL (postgres/password is missing)")
    parts = urlsplit(database_url)
    netloc = f"postgres:{quote(secret.read_text().strip(), safe='')}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=netloc))


def backup(state: Path, database_url: str, out: Path, passphrase: bytes) -> list[str]:
    """Write the encrypted backup of the running stack at ``state``; what it holds, by name."""
    superuser = _superuser_url(state, database_url)
    with tempfile.TemporaryDirectory(prefix="kestrel-backup-") as scratch:
        dump = Path(scratch) / DUMP
        run = subprocess.run(
            [str(postgres_bindir() / "pg_dump"), "--format=custom", "--no-owner", "--file", str(dump), superuser],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if run.returncode != 0:
            raise InvalidInput("backup_failed", f"pg_dump failed: {run.stderr.strip()[-300:]}")
        archive = Path(scratch) / "backup.tar"
        names = [DUMP]
        with tarfile.open(archive, "w") as tar:
            tar.add(dump, arcname=DUMP)
            for path in _state_files(state):
                tar.add(path, arcname=f"state/{path.name}")
                names.append(f"state/{path.name}")
        partial = out.with_name(out.name + ".partial")
        with archive.open("rb") as source, partial.open("wb") as target:
            os.fchmod(target.fileno(), 0o600)
            encrypt(source, target, passphrase)
        partial.replace(out)
    return names


def restore(backup_file: Path, state: Path, passphrase: bytes, postgres_port: int) -> list[str]:
    """Restore into a new state directory: its files, and a new PostgreSQL cluster holding the database."""
    if state.exists() and any(state.iterdir()):
        raise InvalidInput("state_not_empty", f"{state} is not empty: restore into a new state directory")
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o755)
    with tempfile.TemporaryDirectory(prefix="kestrel-restore-") as scratch:
        archive = Path(scratch) / "backup.tar"
        with backup_file.open("rb") as source, archive.open("wb") as target:
            decrypt(source, target, passphrase)
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            tar.extractall(scratch, filter="data")
        for member in members:
            if member.name.startswith("state/") and member.name.count("/") == 1:
                os.replace(Path(scratch) / member.name, state / member.name.removeprefix("state/"))
        postgres = PostgresServer(
            name="postgres", log_path=state / "logs" / "postgres.log", root=state / "postgres", port=postgres_port
        )
        postgres.start()
        try:
            dump = Path(scratch) / DUMP
            dump.chmod(0o644)  # pg_restore reads it; the scratch directory stays private to us
            # As the owner (its row-level security policies admit every row; a missing one fails loudly).
            run = subprocess.run(
                [str(postgres_bindir() / "pg_restore"), "--exit-on-error", "--no-owner", "--enable-row-security",
                 "--dbname", postgres.url, str(dump)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if run.returncode != 0:
                raise InvalidInput("restore_failed", f"pg_restore failed: {run.stderr.strip()[-300:]}")
        finally:
            postgres.stop()
    return [m.name for m in members]
