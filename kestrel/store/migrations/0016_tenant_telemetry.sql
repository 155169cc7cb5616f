-- The API reads telemetry through one view on both storage variants (issue 12): a security barrier that shows the
-- current tenant's rows only (kestrel_tenant(), set per transaction by the API). On TimescaleDB this is the
-- isolation itself, as the hypertable cannot carry row-level security (see 0008's TimescaleDB variant); on native
-- PostgreSQL the table's policy stays as a second line. Either way kestrel_api has no privilege on the telemetry
-- table itself (nor on TimescaleDB's chunks, which take the hypertable's grants), so an injected query cannot go
-- around the view.
CREATE VIEW tenant_telemetry WITH (security_barrier) AS
    SELECT tenant_id, device_id, stream, ts, seq, metrics, received_at
    FROM telemetry
    WHERE tenant_id = kestrel_tenant();

REVOKE ALL ON telemetry, telemetry_hourly FROM kestrel_api;
GRANT SELECT ON tenant_telemetry TO kestrel_api;
