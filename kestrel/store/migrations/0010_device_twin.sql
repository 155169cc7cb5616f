-- Device lifecycle, presence, shadows, commands and just-in-time provisioning claims (ADR-0013).

-- Lifecycle: registered -> provisioned -> active -> suspended -> decommissioned, for every writer.
ALTER TABLE devices ALTER COLUMN status SET DEFAULT 'registered';
ALTER TABLE devices ADD COLUMN decommissioned_at timestamptz;

CREATE FUNCTION kestrel_device_lifecycle() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IS NOT DISTINCT FROM OLD.status THEN
        RETURN NEW;
    END IF;
    IF NOT (OLD.status, NEW.status) IN (
        ('registered', 'provisioned'), ('registered', 'active'), ('registered', 'suspended'),
        ('registered', 'decommissioned'),
        ('provisioned', 'active'), ('provisioned', 'suspended'), ('provisioned', 'decommissioned'),
        ('active', 'suspended'), ('active', 'decommissioned'),
        ('suspended', 'active'), ('suspended', 'decommissioned'))
    THEN
        RAISE EXCEPTION 'device % cannot go from % to %', OLD.device_id, OLD.status, NEW.status
            USING ERRCODE = 'check_violation', HINT = 'kestrel_lifecycle';
    END IF;
    IF NEW.status = 'decommissioned' THEN
        NEW.decommissioned_at := now();
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER devices_lifecycle BEFORE UPDATE OF status ON devices
    FOR EACH ROW EXECUTE FUNCTION kestrel_device_lifecycle();

-- Issuing a credential to a registered device provisions it.
CREATE FUNCTION kestrel_device_provisioned() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.device_id IS NOT NULL THEN
        UPDATE devices SET status = 'provisioned', version = version + 1, updated_at = now()
         WHERE device_id = NEW.device_id AND status = 'registered';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER pki_certificates_provision AFTER INSERT ON pki_certificates
    FOR EACH ROW EXECUTE FUNCTION kestrel_device_provisioned();
CREATE TRIGGER jwt_keys_provision AFTER INSERT ON jwt_keys
    FOR EACH ROW EXECUTE FUNCTION kestrel_device_provisioned();

-- Presence: one row per device (current state), one row per broker connection (history).
CREATE TABLE device_presence (
    tenant_id           text NOT NULL REFERENCES tenants (tenant_id),
    device_id           text PRIMARY KEY REFERENCES devices (device_id),
    online              boolean NOT NULL DEFAULT false,
    connections         integer NOT NULL DEFAULT 0 CHECK (connections >= 0),
    last_seen           timestamptz,
    connected_at        timestamptz,
    disconnected_at     timestamptz,
    disconnect_reason   text,
    reported_status     text,          -- the device's own retained status topic ('online'/'offline')
    reported_status_at  timestamptz,
    protocol            integer,       -- MQTT protocol level of the last connection (4 = 3.1.1, 5)
    changed_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX device_presence_tenant ON device_presence (tenant_id, online, device_id);

CREATE TABLE device_connections (
    tenant_id           text NOT NULL REFERENCES tenants (tenant_id),
    device_id           text NOT NULL REFERENCES devices (device_id),
    node                text NOT NULL,
    connected_ms        bigint NOT NULL,   -- the broker's connected_at: identifies the connection
    connected_at        timestamptz NOT NULL,
    disconnected_at     timestamptz,
    reason              text,
    peer                text,
    protocol            integer,
    PRIMARY KEY (device_id, node, connected_ms)
);
CREATE INDEX device_connections_recent ON device_connections (tenant_id, device_id, connected_at DESC);
CREATE INDEX device_connections_ended ON device_connections (disconnected_at) WHERE disconnected_at IS NOT NULL;

-- Shadows: classic (name '') and named. Documents are JSON objects changed by merge patches.
CREATE TABLE device_shadows (
    tenant_id           text NOT NULL REFERENCES tenants (tenant_id),
    device_id           text NOT NULL REFERENCES devices (device_id),
    name                text NOT NULL DEFAULT '' CHECK (name = '' OR name ~ '^[A-Za-z0-9_-]{1,64}$'),
    desired             jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(desired) = 'object'),
    reported            jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(reported) = 'object'),
    metadata            jsonb NOT NULL DEFAULT '{"desired": {}, "reported": {}}'::jsonb,
    version             bigint NOT NULL DEFAULT 0,
    published_version   bigint NOT NULL DEFAULT 0,   -- the last version devicesvc has handled (outbox marker)
    published           jsonb,                        -- what was last published retained: {desired, delta}
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, name)
);
CREATE INDEX device_shadows_unpublished ON device_shadows (updated_at) WHERE version > published_version;

CREATE TABLE shadow_history (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants (tenant_id),
    device_id   text NOT NULL REFERENCES devices (device_id),
    name        text NOT NULL,
    version     bigint NOT NULL,
    side        text NOT NULL CHECK (side IN ('desired', 'reported')),
    patch       jsonb NOT NULL,
    actor       text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX shadow_history_device ON shadow_history (tenant_id, device_id, name, id DESC);
CREATE INDEX shadow_history_at ON shadow_history (at);  -- retention

-- Commands and their transitions.
CREATE TABLE commands (
    command_id      text PRIMARY KEY CHECK (command_id ~ '^c[0-9a-f]{24}$'),
    tenant_id       text NOT NULL REFERENCES tenants (tenant_id),
    device_id       text NOT NULL REFERENCES devices (device_id),
    name            text NOT NULL CHECK (name ~ '^[A-Za-z0-9_-]{1,64}$'),
    params          jsonb NOT NULL DEFAULT '{}'::jsonb,
    status          text NOT NULL DEFAULT 'queued' CHECK (status IN
                    ('queued', 'sent', 'delivered', 'succeeded', 'failed', 'timed_out', 'expired', 'cancelled')),
    timeout_s       integer NOT NULL CHECK (timeout_s BETWEEN 1 AND 86400),
    expires_at      timestamptz NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    max_attempts    integer NOT NULL DEFAULT 5 CHECK (max_attempts BETWEEN 1 AND 20),
    next_attempt_at timestamptz,
    result          jsonb,
    error           text,
    created_by      text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    delivered_at    timestamptz,
    completed_at    timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX commands_device ON commands (tenant_id, device_id, created_at DESC);
CREATE INDEX commands_completed ON commands (completed_at) WHERE completed_at IS NOT NULL;  -- retention
CREATE INDEX commands_open ON commands (device_id, created_at) WHERE status IN ('queued', 'sent', 'delivered');

CREATE TABLE command_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants (tenant_id),
    command_id  text NOT NULL REFERENCES commands (command_id),
    event       text NOT NULL,   -- a status, or 'retry', 'duplicate_response', 'late_response'
    detail      jsonb,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX command_events_command ON command_events (command_id, id);

-- How far devicesvc has published command_events to NATS (one row per stream of events).
CREATE TABLE twin_cursors (
    name        text PRIMARY KEY,
    last_id     bigint NOT NULL DEFAULT 0
);

-- Just-in-time provisioning claims: kpc_<claim_id>_<secret>, secret stored as SHA-256.
CREATE TABLE provisioning_claims (
    claim_id        text PRIMARY KEY CHECK (claim_id ~ '^[0-9a-f]{16}$'),
    tenant_id       text NOT NULL REFERENCES tenants (tenant_id),
    name            text NOT NULL DEFAULT '',
    secret_sha256   text NOT NULL CHECK (secret_sha256 ~ '^[0-9a-f]{64}$'),
    max_uses        integer NOT NULL CHECK (max_uses BETWEEN 1 AND 1000000),
    used            integer NOT NULL DEFAULT 0 CHECK (used >= 0 AND used <= max_uses),
    expires_at      timestamptz NOT NULL,
    group_id        text,
    tags            text[] NOT NULL DEFAULT '{}',
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    created_at      timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE devices ADD COLUMN claim_id text REFERENCES provisioning_claims (claim_id);

ALTER TABLE service_principals DROP CONSTRAINT service_principals_role_check;
ALTER TABLE service_principals ADD CONSTRAINT service_principals_role_check
    CHECK (role IN ('ingest', 'control', 'devices', 'provisioning'));

-- Wake devicesvc when the API queues work (a lost notification only delays: devicesvc also scans).
CREATE FUNCTION kestrel_twin_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kestrel_twin', TG_TABLE_NAME || ':' || NEW.device_id);
    RETURN NEW;
END $$;
CREATE TRIGGER commands_notify AFTER INSERT OR UPDATE OF status ON commands
    FOR EACH ROW EXECUTE FUNCTION kestrel_twin_notify();
CREATE TRIGGER device_shadows_notify AFTER INSERT OR UPDATE OF version ON device_shadows
    FOR EACH ROW EXECUTE FUNCTION kestrel_twin_notify();
CREATE TRIGGER devices_twin_notify AFTER UPDATE OF status ON devices
    FOR EACH ROW WHEN (NEW.status = 'decommissioned') EXECUTE FUNCTION kestrel_twin_notify();

-- Decommissioning, for the API (as kestrel_api: RLS keeps it to the caller's tenant) and the operator CLI alike:
-- credentials revoked (the identity triggers then end the live session), open commands cancelled, the device
-- row kept for ever (history, and its id can never be registered again).
CREATE FUNCTION kestrel_decommission_device(p_device text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pki_certificates SET status = 'revoked', revoked_at = now(), revocation_reason = 'cessationOfOperation'
     WHERE device_id = p_device AND status = 'active';
    UPDATE jwt_keys SET status = 'revoked' WHERE device_id = p_device AND status = 'active';
    WITH cancelled AS (
        UPDATE commands SET status = 'cancelled', completed_at = now(), updated_at = now()
         WHERE device_id = p_device AND status IN ('queued', 'sent', 'delivered')
        RETURNING tenant_id, command_id)
    INSERT INTO command_events (tenant_id, command_id, event, detail)
    SELECT tenant_id, command_id, 'cancelled', '{"by": "decommission"}'::jsonb FROM cancelled;
    UPDATE devices SET status = 'decommissioned', version = version + 1, updated_at = now() WHERE device_id = p_device;
END $$;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['device_presence', 'device_connections', 'device_shadows', 'shadow_history', 'commands',
                             'command_events', 'provisioning_claims']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY system_all ON %I TO CURRENT_USER USING (true) WITH CHECK (true)', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON %I TO kestrel_api'
                       ' USING (tenant_id = kestrel_tenant()) WITH CHECK (tenant_id = kestrel_tenant())', t);
    END LOOP;
END $$;

GRANT SELECT ON device_presence, device_connections TO kestrel_api;
GRANT SELECT, INSERT, UPDATE ON device_shadows, commands, provisioning_claims TO kestrel_api;
GRANT SELECT, INSERT ON shadow_history, command_events TO kestrel_api;
GRANT UPDATE ON pki_certificates, jwt_keys TO kestrel_api;  -- decommissioning revokes them (RLS: own tenant)
GRANT EXECUTE ON FUNCTION kestrel_decommission_device(text) TO kestrel_api;
