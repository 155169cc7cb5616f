-- Telemetry with TimescaleDB: a hypertable with daily chunks, compression and retention (ADR-0006).
-- Same columns and key as the native variant, so the same query code serves both.
CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE telemetry (
    tenant_id    text        NOT NULL,
    device_id    text        NOT NULL,
    stream       text        NOT NULL DEFAULT '',
    ts           timestamptz NOT NULL,
    seq          bigint      NOT NULL,
    metrics      jsonb       NOT NULL,
    received_at  timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, device_id, ts, seq, stream)
);

SELECT create_hypertable('telemetry', 'ts', chunk_time_interval => INTERVAL '1 day');

ALTER TABLE telemetry SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'tenant_id, device_id',
    timescaledb.compress_orderby = 'ts DESC, seq DESC, stream'
);
SELECT add_compression_policy('telemetry', INTERVAL '7 days');
SELECT add_retention_policy('telemetry', make_interval(days => (SELECT retention_days FROM storage_policy)));

-- TimescaleDB creates chunks on demand and runs retention as a background job, so these are no-ops
-- kept for a uniform interface with the native variant.
CREATE FUNCTION telemetry_ensure_partitions(p_from timestamptz, p_to timestamptz)
RETURNS integer LANGUAGE sql AS $$ SELECT 0 $$;
CREATE FUNCTION telemetry_maintain() RETURNS void LANGUAGE sql AS $$ SELECT $$;
