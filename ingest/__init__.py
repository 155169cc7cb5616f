"""Ingest service: the MQTT -> JetStream bridge and the JetStream -> PostgreSQL writer."""
