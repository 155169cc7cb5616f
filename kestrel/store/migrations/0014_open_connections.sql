-- A broker node's restart closes the connections it held (issue 12, devicesvc's presence.broker_started): find them
-- without scanning the connection history.
CREATE INDEX device_connections_open ON device_connections (node, connected_ms) WHERE disconnected_at IS NULL;
