"""``python -m pki provisioner``: the just-in-time provisioning service (ADR-0013)."""

from __future__ import annotations

import sys

from prometheus_client import CollectorRegistry, start_http_server

from kestrel.runtime.logs import announce
from kestrel.runtime.service import run_service, stop_event
from kestrel.store import DatabaseSettings
from kestrel_core.settings import from_env
from pki.provisioner import ProvisionerSettings, run_provisioner
from pki.settings import PkiSettings, open_ca


async def amain() -> None:
    settings = from_env(ProvisionerSettings, "KESTREL_PROVISIONER")
    database = from_env(DatabaseSettings, "KESTREL_DATABASE").url.reveal()
    announce("pki-provisioner")
    registry = CollectorRegistry()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, settings.metrics_host, registry=registry)
    ca = open_ca(database, from_env(PkiSettings, "KESTREL_PKI"))
    await run_provisioner(settings, ca, stop_event(), registry=registry)


def main(argv: list[str]) -> int:
    if argv != ["provisioner"]:
        print("usage: python -m pki provisioner", file=sys.stderr)
        return 2
    return run_service("pki-provisioner", amain)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
