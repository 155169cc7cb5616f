"""Kestrel's shared package: the only import services share (ADR-0001).

Pure domain modules (no I/O): ``topics``, ``wire``, ``errors``, ``settings``, ``streams``.
Shared adapters used by more than one service or by the operator CLI: ``kestrel.store``
(migrations, registry), ``kestrel.devtools.servers`` (launching PostgreSQL, NATS and Mosquitto for the
embedded default and the tests), ``kestrel.devtools.simulate`` and ``kestrel.cli``.
"""

__version__ = "0.1.0"
