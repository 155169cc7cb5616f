"""``python -m pki provisioner``: the just-in-time provisioning service (ADR-0013)."""

from __future__ import annotations

import sys

from kestrel.runtime.service import run_service, stop_event
from kestrel_core.settings import from_env
from pki.cli import open_ca
from pki.provisioner import ProvisionerSettings, run_provisioner


async def amain() -> None:
    settings = from_env(ProvisionerSettings, "KESTREL_PROVISIONER")
    await run_provisioner(settings, open_ca(), stop_event())


def main(argv: list[str]) -> int:
    if argv != ["provisioner"]:
        print("usage: python -m pki provisioner", file=sys.stderr)
        return 2
    return run_service("pki-provisioner", amain)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
