-- Revocations survive a broken notification connection (issue 12, ADR-0015): every identity change that withdraws
-- access (migration 0006 notifies it) is also journalled in the changing transaction. authsvc kicks from the
-- journal, behind a durable cursor, on every notification, whenever its listener (re)connects and every few seconds,
-- so a revocation committed while authsvc or its LISTEN connection was down is enforced when it returns. A
-- notification is only a prompt to read the journal, never the record.
CREATE TABLE identity_events (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    event   jsonb NOT NULL
);

-- One row per consumer of the journal ('kicks': the disconnects of authsvc, shared by its replicas). The cursor
-- starts at the journal's end: changes older than this migration were notified by 0006 already.
CREATE TABLE identity_cursors (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z_]{1,32}$'),
    last_id     bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO identity_cursors (name, last_id) VALUES ('kicks', 0);

-- SECURITY DEFINER: the API's role changes device statuses but may not read or write the journal. The advisory
-- lock serializes identity changes from here to commit, so journal ids become visible in order and a reader that
-- has seen id n can never later see a smaller one commit (identity changes are rare; the lock is per change).
CREATE OR REPLACE FUNCTION kestrel_identity_notify() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    r jsonb := to_jsonb(NEW);  -- by name, so one function serves tables with different columns
    old_r jsonb := to_jsonb(OLD);
    status text := NEW.status;
    payload jsonb;
    journal_id bigint;
BEGIN
    IF r->>'secret_sha256' IS DISTINCT FROM old_r->>'secret_sha256' THEN
        status := 'rotated';  -- a new secret: sessions opened with the old one are cut off too
    ELSIF NEW.status IS NOT DISTINCT FROM OLD.status THEN
        RETURN NEW;
    END IF;
    payload := CASE
        WHEN TG_TABLE_NAME = 'service_principals' THEN
            jsonb_build_object('scope', 'service', 'service', r->>'name')
        WHEN r->>'tenant_id' IS NULL THEN               -- the root CA
            jsonb_build_object('scope', 'all')
        WHEN TG_TABLE_NAME IN ('tenants', 'pki_authorities') OR r->>'device_id' IS NULL THEN
            jsonb_build_object('scope', 'tenant', 'tenant', r->>'tenant_id')
        ELSE
            jsonb_build_object('scope', 'device', 'tenant', r->>'tenant_id', 'device', r->>'device_id')
    END || jsonb_build_object('status', status, 'table', TG_TABLE_NAME);
    -- Only what withdraws access is journalled (a device activated on its first connection is not: at fleet scale
    -- that would serialize every activation on the lock); every change is notified, as caches must drop it.
    IF status NOT IN ('active', 'registered', 'provisioned') THEN
        PERFORM pg_advisory_xact_lock(hashtext('kestrel_identity_events'));
        INSERT INTO identity_events (event) VALUES (payload) RETURNING id INTO journal_id;
    END IF;
    PERFORM pg_notify('kestrel_identity', (payload || jsonb_build_object('id', journal_id))::text);
    RETURN NEW;
END $$;
