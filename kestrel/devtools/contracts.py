"""The committed generated documents, current or not: ``api/openapi.json``, ``api/schema.graphql``,
``api/asyncapi.json``, the ``KESTREL_*`` tables of the service READMEs, the SLO rules, the Grafana dashboards and the
chart's copy of the EMQX configuration. ``--check`` (a pre-commit hook) exits 1
naming the stale ones; ``--write`` (``make openapi``) regenerates them."""

from __future__ import annotations

import sys
from pathlib import Path

from kestrel.devtools import asyncapi, dashboards, envdoc, slo

REPO = envdoc.REPO


def expected() -> dict[Path, str]:
    from api.__main__ import openapi_document  # noqa: PLC0415 - the API is built only when asked
    from api.graphql import build_schema  # noqa: PLC0415

    documents = {
        REPO / "api" / "openapi.json": openapi_document(),
        REPO / "api" / "schema.graphql": build_schema(introspection=True).as_str() + "\n",
        REPO / "api" / "asyncapi.json": asyncapi.render(),
        REPO / "helm" / "kestrel" / "files" / "prometheus" / "slo-rules.yaml": slo.render(),
        # The chart carries the broker's configuration as it is (Helm reads no file outside its chart).
        REPO / "helm" / "kestrel" / "files" / "emqx.conf": (REPO / "broker" / "emqx" / "emqx.conf").read_text(),
    }
    grafana = REPO / "helm" / "kestrel" / "files" / "grafana"
    documents |= {grafana / name: text for name, text in dashboards.render().items()}
    return documents | envdoc.expected()


def main(argv: list[str]) -> int:
    if argv not in (["--check"], ["--write"]):
        print("usage: python -m kestrel.devtools.contracts --check|--write", file=sys.stderr)
        return 2
    stale = [path for path, text in expected().items() if not path.exists() or path.read_text() != text]
    if argv == ["--write"]:
        for path, text in expected().items():
            path.write_text(text)
        return 0
    for path in stale:
        print(f"{path.relative_to(REPO)} is not what the code generates: run `make openapi`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
