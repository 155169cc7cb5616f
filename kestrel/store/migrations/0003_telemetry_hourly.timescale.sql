-- kestrel: no-transaction
-- Continuous aggregates cannot be created inside a transaction block.
CREATE MATERIALIZED VIEW telemetry_hourly WITH (timescaledb.continuous) AS
SELECT tenant_id, device_id, time_bucket(INTERVAL '1 hour', ts) AS bucket,
       count(*) AS messages, max(ts) AS last_ts
FROM telemetry
GROUP BY tenant_id, device_id, bucket
WITH NO DATA;
SELECT add_continuous_aggregate_policy('telemetry_hourly',
    start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour', schedule_interval => INTERVAL '30 minutes');
