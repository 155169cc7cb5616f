"""Kestrel's device SDK: connect with a certificate or a JWT, send telemetry, report state, converge to desired
state, answer commands, provision just in time (ADR-0013, ADR-0014). Imports only ``kestrel_core``."""

from kestrel_device.client import DeviceClient, ProvisioningRefused, new_device_key, provision

__all__ = ["DeviceClient", "ProvisioningRefused", "new_device_key", "provision"]
