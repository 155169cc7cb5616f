"""Kestrel's pure core (ADR-0014): the topic grammar, every message of the device contract, the error vocabulary and
the platform's pure domain logic. No I/O; imports nothing of Kestrel's; depends on msgspec alone. It ships with the
device SDK (``kestrel-device``) because devices and the platform share its declarations; the platform installs it
from there.
"""
