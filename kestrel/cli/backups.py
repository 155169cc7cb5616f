"""``kestrel backup|restore``: the embedded default's state, encrypted (kestrel.devtools.backup, ADR-0027)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from kestrel.cli.env import database_url, state_dir
from kestrel_core.errors import InvalidInput

PassphraseFile = Annotated[
    Path | None,
    typer.Option(help="A file holding the passphrase (else KESTREL_BACKUP_PASSPHRASE); at least 12 characters"),
]


def _passphrase(path: Path | None) -> bytes:
    if path is not None:
        try:
            return path.read_bytes().strip()
        except OSError as exc:
            raise InvalidInput("no_passphrase", f"cannot read the passphrase file {path}: {exc.strerror}") from exc
    if value := os.environ.get("KESTREL_BACKUP_PASSPHRASE"):
        return value.encode()
    raise InvalidInput("no_passphrase", "give --passphrase-file or set KESTREL_BACKUP_PASSPHRASE")


def backup(
    out: Annotated[Path, typer.Argument(help="The backup file to write (mode 0600)")],
    passphrase_file: PassphraseFile = None,
) -> None:
    """Back up the running embedded default: its database (a consistent snapshot) and its state, encrypted."""
    from kestrel.devtools.backup import backup as write  # noqa: PLC0415 - keep CLI start-up light

    passphrase = _passphrase(passphrase_file)
    names = write(state_dir(), database_url(), out, passphrase)
    typer.echo(f"backed up {len(names)} items to {out}")


def restore(
    backup_file: Annotated[Path, typer.Argument(help="A file `kestrel backup` wrote", exists=True, dir_okay=False)],
    passphrase_file: PassphraseFile = None,
    postgres_port: Annotated[int, typer.Option(help="The restored PostgreSQL's port while it loads")] = 15432,
) -> None:
    """Restore a backup into a new state directory (--state-dir); then `kestrel run --state-dir DIR` runs it."""
    from kestrel.devtools.backup import restore as load  # noqa: PLC0415

    names = load(backup_file, state_dir(), _passphrase(passphrase_file), postgres_port)
    typer.echo(f"restored {len(names)} items into {state_dir()}")
