"""``kestrel pki ...``: the PKI administrator's commands (registered into ``kestrel`` by entry point)."""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kestrel.cli.env import database_url, state_dir
from kestrel.store.session import operator
from kestrel_core.errors import Conflict, InvalidInput, NotFound
from kestrel_core.settings import from_env
from pki import settings
from pki import x509 as px
from pki.authority import DatabaseCA
from pki.records import IssuedCertificate

app = typer.Typer(no_args_is_help=True, help="Certificate authorities and device certificates.")
REASON_HELP = f"One of: {', '.join(px.REASONS)}"


def _passphrase(generate: bool = False) -> str:
    """The embedded default's ``pki-passphrase`` file (0600), when ``KESTREL_PKI_PASSPHRASE`` is not set."""
    path = state_dir() / "pki-passphrase"
    if path.exists():
        return path.read_text().strip()
    if generate:
        path.parent.mkdir(parents=True, exist_ok=True)
        value = secrets.token_urlsafe(32)
        path.write_text(value + "\n")
        path.chmod(0o600)
        return value
    raise InvalidInput("no_passphrase", "set KESTREL_PKI_PASSPHRASE (or run `kestrel pki init --generate-passphrase`)")


def open_ca(generate: bool = False) -> DatabaseCA:
    """The backend ``KESTREL_PKI_*`` configures (``pki.settings``), on the CLI's database."""
    return settings.open_ca(
        database_url(), from_env(settings.PkiSettings, "KESTREL_PKI"), lambda: _passphrase(generate)
    )


def _actor() -> str:
    return operator().name


@app.command()
def init(
    generate_passphrase: Annotated[bool, typer.Option(help="Create .kestrel/pki-passphrase if none is set")] = False,
) -> None:
    """Create the root CA (once)."""
    serial = open_ca(generate_passphrase).init_root(_actor())
    typer.echo(f"root CA created (serial {serial})")


@app.command("tenant-ca")
def tenant_ca(tenant: Annotated[str, typer.Argument(help="Tenant id")]) -> None:
    """Create the tenant's intermediate CA."""
    serial = open_ca().create_tenant_ca(tenant, _actor())
    typer.echo(f"tenant CA for {tenant} created (serial {serial})")


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)


def _emit(issued: IssuedCertificate, out: Path | None, verb: str) -> None:
    """The certificate (with its tenant CA) to ``out`` (with a summary on stderr) or to stdout."""
    if out is None:
        typer.echo(issued.full_chain_pem, nl=False)
        return
    _write(out, issued.full_chain_pem)
    typer.echo(f"{verb} {issued.device}: serial {issued.serial}, valid until {issued.not_after:%Y-%m-%d}", err=True)


def _read_csr(path: Path) -> bytes:
    """A CSR file's bytes; '-' reads standard input."""
    if str(path) == "-":
        return sys.stdin.buffer.read()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInput("bad_file", f"cannot read {path}: {exc.strerror}") from exc


@app.command()
def sign(
    csr_file: Annotated[Path, typer.Argument(help="PEM or DER CSR; '-' reads standard input")],
    device: Annotated[str, typer.Option(help="Device id; must equal the CSR's common name")],
    days: Annotated[int, typer.Option(min=1, max=px.MAX_DEVICE_DAYS)] = px.DEVICE_DAYS,
    out: Annotated[Path | None, typer.Option(help="Write the certificate here (default: stdout)")] = None,
) -> None:
    """Sign a device's CSR (the normal enrolment path: the key never leaves the device)."""
    _emit(open_ca().sign_csr(_read_csr(csr_file), device, days, _actor()), out, "signed")


@app.command()
def issue(
    device: Annotated[str, typer.Argument(help="Device id")],
    out_dir: Annotated[Path, typer.Option(help="Where DEVICE.key, DEVICE.crt, ca.pem and ca-chain.pem go")] = Path(),
    days: Annotated[int, typer.Option(min=1, max=px.MAX_DEVICE_DAYS)] = px.DEVICE_DAYS,
) -> None:
    """Development only: generate a key here and issue its certificate (devices should send a CSR)."""
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
        .sign(key, hashes.SHA256())
    )
    issued = open_ca().sign_csr(csr.public_bytes(serialization.Encoding.PEM), device, days, _actor())
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(
        out_dir / f"{device}.key",
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
        0o600,
    )
    _write(out_dir / f"{device}.crt", issued.full_chain_pem)
    _write(out_dir / "ca-chain.pem", issued.chain_pem)
    _write(out_dir / "ca.pem", issued.root_pem)
    typer.echo(f"issued {device}: serial {issued.serial}, files in {out_dir}/")


@app.command("server-cert")
def server_cert(
    host: Annotated[list[str] | None, typer.Option(help="DNS name the broker is reached by (repeatable)")] = None,
    ip: Annotated[list[str] | None, typer.Option(help="IP address the broker is reached by (repeatable)")] = None,
    out_dir: Annotated[Path, typer.Option(help="Where server.crt, server.key and ca.pem go")] = Path(),
    days: Annotated[int, typer.Option(min=1, max=px.MAX_DEVICE_DAYS)] = px.DEVICE_DAYS,
) -> None:
    """A broker's TLS server certificate, signed by the root (devices verify it with ca.pem)."""
    ca = open_ca()
    cert_pem, key_pem = ca.issue_server(host or [], ip or [], days, _actor())
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(out_dir / "server.key", key_pem, 0o600)
    _write(out_dir / "server.crt", cert_pem)
    _write(out_dir / "ca.pem", ca.root_pem())
    typer.echo(f"server certificate for {', '.join([*(host or []), *(ip or [])])} in {out_dir}/")


@app.command()
def renew(
    serial: Annotated[str, typer.Argument(help="Serial (hex) of the certificate to renew")],
    days: Annotated[int, typer.Option(min=1, max=px.MAX_DEVICE_DAYS)] = px.DEVICE_DAYS,
    out: Annotated[Path | None, typer.Option(help="Write the certificate here (default: stdout)")] = None,
    csr: Annotated[Path | None, typer.Option(help="A new CSR from the device (required with OpenBao)")] = None,
) -> None:
    """Issue a new certificate for the device of an active one: for the same key, or for a new CSR's key. The
    old certificate stays valid until it expires or is revoked."""
    _emit(open_ca().renew(serial, days, _actor(), _read_csr(csr) if csr else None), out, "renewed")


@app.command()
def revoke(
    serial: Annotated[str | None, typer.Argument(help="Serial (hex)")] = None,
    device: Annotated[str | None, typer.Option(help="Revoke every active certificate of this device")] = None,
    tenant_ca: Annotated[str | None, typer.Option("--tenant-ca", help="Revoke this tenant's CA")] = None,
    reason: Annotated[str, typer.Option(help=REASON_HELP)] = "unspecified",
) -> None:
    """Revoke a certificate, a device's certificates, or a tenant CA."""
    if sum(x is not None for x in (serial, device, tenant_ca)) != 1:
        raise InvalidInput("bad_arguments", "give exactly one of SERIAL, --device or --tenant-ca")
    ca = open_ca()
    if serial:
        ca.revoke(serial, reason, _actor())
        typer.echo(f"revoked {serial.lower()} ({reason})")
    elif device:
        typer.echo(f"revoked {', '.join(ca.revoke_device(device, reason, _actor()))} ({reason})")
    else:
        assert tenant_ca is not None
        ca.revoke_tenant_ca(tenant_ca, reason, _actor())
        typer.echo(f"revoked the CA of tenant {tenant_ca} ({reason})")


@app.command()
def crl(
    tenant: Annotated[str, typer.Option(help="Tenant whose CA signs the CRL")],
    out: Annotated[Path | None, typer.Option(help="Write the CRL here (default: stdout)")] = None,
) -> None:
    """Print the tenant CA's current CRL (PEM)."""
    data = open_ca().crl(tenant)
    if out:
        out.write_bytes(data)
    else:
        sys.stdout.buffer.write(data)


@app.command("list")
def list_certificates(
    tenant: Annotated[str | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option()] = None,
    status: Annotated[str | None, typer.Option(help="active or revoked")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List issued device certificates."""
    rows = open_ca().list(tenant=tenant, device=device, status=status)
    if as_json:
        typer.echo(json.dumps(rows, default=str))
        return
    for r in rows:
        typer.echo(
            f"{r['serial']}  {r['tenant_id']:<20} {r['device_id']:<24} {r['status']:<8} until {r['not_after']:%Y-%m-%d}"
        )


@app.command("sign-batch")
def sign_batch(
    csr_dir: Annotated[Path, typer.Argument(help="Directory of DEVICE.csr files (PEM or DER), e.g. from the factory")],
    out_dir: Annotated[Path, typer.Option(help="Where DEVICE.crt (with its tenant CA) and ca.pem go")],
    days: Annotated[int, typer.Option(min=1, max=px.MAX_DEVICE_DAYS)] = px.DEVICE_DAYS,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON summary on stdout")] = False,
) -> None:
    """Sign many CSRs (bulk enrolment) with a progress bar. A bad CSR is reported and skipped; the exit
    code is 1 when any failed, and nothing already signed is lost."""
    files = sorted(csr_dir.glob("*.csr"))
    if not files:
        raise InvalidInput("no_csrs", f"no *.csr files in {csr_dir}")
    ca = open_ca()
    out_dir.mkdir(parents=True, exist_ok=True)
    signed: list[dict[str, str]] = []
    failed: list[dict[str, str]] = []
    columns = (TextColumn("signing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=as_json) as progress:
        task = progress.add_task("sign", total=len(files))
        for path in files:
            device = path.stem
            try:
                issued = ca.sign_csr(path.read_bytes(), device, days, _actor())
            except (InvalidInput, Conflict, NotFound) as exc:
                failed.append({"device": device, "error": exc.detail})
            else:
                _write(out_dir / f"{device}.crt", issued.full_chain_pem)
                signed.append({"device": device, "serial": issued.serial})
            progress.advance(task)
    _write(out_dir / "ca.pem", ca.root_pem())
    if as_json:
        typer.echo(json.dumps({"signed": signed, "failed": failed}))
    else:
        for failure in failed:
            typer.echo(f"failed {failure['device']}: {failure['error']}", err=True)
        typer.echo(f"signed {len(signed)}, failed {len(failed)}; certificates in {out_dir}/", err=True)
    if failed:
        raise typer.Exit(1)
