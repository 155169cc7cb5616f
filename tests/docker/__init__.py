"""Suites that need a Docker engine (testcontainers); each skips with the reason where there is none."""

from __future__ import annotations


def docker_unavailable(what: str) -> str | None:
    """Why ``what`` cannot run here, or None when a Docker engine answers."""
    try:
        import docker  # noqa: PLC0415

        docker.from_env().ping()
    except Exception as exc:  # noqa: BLE001 - any failure means no usable engine
        return f"no Docker engine reachable ({type(exc).__name__}); testcontainers cannot start {what} here"
    return None
