"""The web console (issue 14, ADR-0021): static HTML, CSS and JavaScript served at ``/console``, built on the public
API and the SSE stream only; uPlot (charts) comes from ``node_modules`` at the version ``package-lock.json`` pins,
installed by the set-up, never from a CDN. Every answer carries a strict Content-Security-Policy: scripts and styles of
this origin only, connections to this origin only."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Final

from litestar import Response, Router
from litestar.datastructures import CacheControlHeader
from litestar.static_files import create_static_files_router

log = logging.getLogger("kestrel.api")
HERE: Final = Path(__file__).resolve().parent
VENDOR: Final = HERE.parents[1] / "node_modules" / "uplot" / "dist"
#: The page and its script are checked again on every load (a deploy shows at once); uPlot is versioned by npm.
REVALIDATE: Final = CacheControlHeader(no_cache=True)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _secure(response: Response[Any]) -> Response[Any]:
    response.headers.update(SECURITY_HEADERS)
    return response


def console_routers(vendor: Path = VENDOR) -> list[Router]:
    """``/console`` (the page) and ``/console/vendor`` (uPlot); without uPlot installed the console still works,
    without charts, and says so in the log."""
    routers = [create_static_files_router(path="/console", directories=[HERE], html_mode=True, name="console",
                                          after_request=_secure, cache_control=REVALIDATE)]  # fmt: skip
    if (vendor / "uPlot.iife.min.js").is_file():
        routers.append(create_static_files_router(path="/console/vendor", directories=[vendor], name="console-vendor",
                                                  after_request=_secure))  # fmt: skip
    else:
        log.warning("uPlot is not installed (npm ci): the console shows no charts", extra={"looked_in": str(vendor)})
    return routers
