-- Telemetry without TimescaleDB: native range partitioning by UTC day (ADR-0006).
-- One row per reading; metrics as jsonb. The key is the device's own message identity, so a
-- redelivered message is a no-op (INSERT ... ON CONFLICT DO NOTHING).
CREATE TABLE telemetry (
    tenant_id    text        NOT NULL,
    device_id    text        NOT NULL,
    stream       text        NOT NULL DEFAULT '',
    ts           timestamptz NOT NULL,
    seq          bigint      NOT NULL,
    metrics      jsonb       NOT NULL,
    received_at  timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, device_id, ts, seq, stream)
) PARTITION BY RANGE (ts);

-- Create the daily partitions covering [p_from, p_to]; safe to call concurrently.
CREATE FUNCTION telemetry_ensure_partitions(p_from timestamptz, p_to timestamptz)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    day      date := (p_from AT TIME ZONE 'UTC')::date;
    last_day date := (p_to AT TIME ZONE 'UTC')::date;
    created  integer := 0;
    part     text;
BEGIN
    WHILE day <= last_day LOOP
        part := format('telemetry_p%s', to_char(day, 'YYYYMMDD'));
        IF to_regclass(part) IS NULL THEN
            BEGIN
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF telemetry FOR VALUES FROM (%L) TO (%L)',
                    part, (day::timestamp AT TIME ZONE 'UTC'), ((day + 1)::timestamp AT TIME ZONE 'UTC'));
                created := created + 1;
            EXCEPTION WHEN duplicate_table THEN
                NULL;  -- another writer created it first
            END;
        END IF;
        day := day + 1;
    END LOOP;
    RETURN created;
END $$;

-- Drop daily partitions that end at or before p_before. Returns how many were dropped.
CREATE FUNCTION telemetry_drop_partitions_before(p_before timestamptz)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    cutoff  date := (p_before AT TIME ZONE 'UTC')::date;
    dropped integer := 0;
    child   record;
BEGIN
    FOR child IN
        SELECT c.relname
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'telemetry'::regclass AND c.relname ~ '^telemetry_p[0-9]{8}$'
    LOOP
        IF to_date(substr(child.relname, 12), 'YYYYMMDD') + 1 <= cutoff THEN
            EXECUTE format('DROP TABLE %I', child.relname);
            dropped := dropped + 1;
        END IF;
    END LOOP;
    RETURN dropped;
END $$;

-- Periodic maintenance: partitions ahead, retention behind. Called by the writer and `kestrel db migrate`.
CREATE FUNCTION telemetry_maintain() RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    policy storage_policy%ROWTYPE;
BEGIN
    SELECT * INTO policy FROM storage_policy;
    PERFORM telemetry_ensure_partitions(now() - interval '1 day', now() + make_interval(days => policy.ahead_days));
    PERFORM telemetry_drop_partitions_before(now() - make_interval(days => policy.retention_days));
END $$;

SELECT telemetry_maintain();
