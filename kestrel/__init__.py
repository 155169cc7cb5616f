"""Kestrel's server side (ADR-0014): storage (``store``), process plumbing (``runtime``), development machinery
(``devtools``) and the operator's command (``cli``). The pure core and the device SDK are the ``kestrel-device``
distribution (``sdk/``).

``__version__`` is the one version number: the installed package's (pyproject.toml), shown by ``kestrel --version``,
``GET /api/v1/version`` and every service's first log line.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kestrel")
except PackageNotFoundError:  # running from a tree that was never installed
    __version__ = "0+unknown"
