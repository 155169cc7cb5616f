-- Hourly message counts per device. Without TimescaleDB this is a plain view computed on demand;
-- with it (the .timescale variant) it is a continuous aggregate. Same name and columns.
CREATE VIEW telemetry_hourly WITH (security_invoker = true) AS
SELECT tenant_id, device_id, date_bin(INTERVAL '1 hour', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
       count(*) AS messages, max(ts) AS last_ts
FROM telemetry
GROUP BY tenant_id, device_id, bucket;
