"""devicesvc: device presence, shadows and commands (ADR-0013)."""
