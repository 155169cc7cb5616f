"""Every MQTT and NATS message of the platform, declared once (msgspec structs), decoded once at the edge."""
