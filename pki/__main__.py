"""``python -m pki provisioner``: the just-in-time provisioning service (ADR-0013)."""

from __future__ import annotations

import sys

import uvloop

from kestrel.backend import stop_event
from kestrel.errors import InvalidInput
from kestrel.logs import configure_logging
from kestrel.settings import from_env
from pki.cli import open_ca
from pki.provisioner import ProvisionerSettings, run_provisioner


async def amain() -> None:
    settings = from_env(ProvisionerSettings, "KESTREL_PROVISIONER")
    await run_provisioner(settings, open_ca(), stop_event())


def main(argv: list[str]) -> int:
    if argv != ["provisioner"]:
        print("usage: python -m pki provisioner", file=sys.stderr)
        return 2
    configure_logging("pki-provisioner")
    try:
        uvloop.run(amain())
    except InvalidInput as exc:
        print(f"kestrel pki provisioner: {exc.detail}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
