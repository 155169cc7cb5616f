"""The ``kestrel`` command: operator and developer entry point.

Errors end with one clear line on stderr and a non-zero exit: 2 for bad input, 1 otherwise.
Connection settings come from the environment (``KESTREL_DATABASE_URL``), falling back to the
``kestrel.env`` that ``kestrel run`` writes, so commands work right after ``make run``. Every change goes through
the same storage functions as the API (``kestrel.store``), audited as ``cli:<user>``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from kestrel import __version__
from kestrel.cli import backups, commands, devices, rules, stack, tenants
from kestrel_core.errors import InvalidInput, KestrelError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Kestrel IoT platform.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
db_app.command("migrate")(stack.db_migrate)
for sub, name in (
    (db_app, "db"),
    (tenants.tenant_app, "tenant"),
    (devices.device_app, "device"),
    (tenants.user_app, "user"),
    (tenants.token_app, "token"),
    (commands.command_app, "command"),
    (commands.claim_app, "claim"),
    (tenants.service_app, "service"),
    (rules.rule_app, "rule"),
    (rules.alarm_app, "alarm"),
    (rules.channel_app, "channel"),
):
    app.add_typer(sub, name=name)
for command in (stack.agent, stack.simulate, stack.run, backups.backup, backups.restore):
    app.command()(command)
app.command("webhook-sink")(stack.webhook_sink)


def _version(shown: bool) -> None:
    if shown:
        typer.echo(f"kestrel {__version__}")
        raise typer.Exit


@app.callback()
def options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit")
    ] = False,
    state: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            envvar="KESTREL_STATE_DIR",
            help="The embedded default's state directory: where commands find its database and ports [.kestrel]",
        ),
    ] = None,
) -> None:
    """Kestrel IoT platform."""
    if state is not None:
        os.environ["KESTREL_STATE_DIR"] = str(state)  # read by every command below, and by `kestrel run`


def _add_plugins() -> None:
    """Sub-commands that other Kestrel packages register (entry point group ``kestrel.cli``), e.g. ``pki``.

    The shared package never imports a service; installed packages plug their commands in.
    """
    from importlib.metadata import entry_points  # noqa: PLC0415

    for entry in entry_points(group="kestrel.cli"):
        app.add_typer(entry.load(), name=entry.name)


def main() -> None:
    try:
        _add_plugins()
        code = app(standalone_mode=False)  # click returns a command's typer.Exit code here
        if isinstance(code, int) and code:
            sys.exit(code)
    except KestrelError as exc:
        typer.echo(f"kestrel: {exc.detail}", err=True)
        sys.exit(2 if isinstance(exc, InvalidInput) else 1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("kestrel: aborted", err=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one line, no traceback
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # click/typer usage errors
            typer.echo(f"kestrel: {exc.format_message()}", err=True)
            sys.exit(int(exc.exit_code))
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        typer.echo(f"kestrel: {type(exc).__name__}: {first_line}", err=True)
        sys.exit(1)
