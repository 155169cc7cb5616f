"""Files the embedded default keeps in its state directory: the platform administrator's token, and whether a
certificate there is about to expire (and must be issued again)."""

from __future__ import annotations

import datetime as dt
import secrets
from pathlib import Path

from cryptography import x509


def read_or_create_token(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    token = "kpa_" + secrets.token_urlsafe(32)  # the platform administrator's; not an API token (kst_)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def expires_within(cert_file: Path, margin: dt.timedelta) -> bool:
    """True when ``cert_file`` is missing, unreadable or expires within ``margin``."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return True
    return cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < margin
