-- Rule triggers beyond telemetry (issue 13, ADR-0020).
-- Lifecycle events: every change of a device's lifecycle status, and its creation, as a row that devicesvc publishes
-- in order on v1.{tenant}.d.{device}.lifecycle (DEVICE_EVENTS), like command_events. Written by a trigger, so every
-- writer (the API, the provisioner, the PKI's provisioning trigger, decommissioning) is covered.
CREATE TABLE lifecycle_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants (tenant_id),
    device_id   text NOT NULL REFERENCES devices (device_id),
    status      text NOT NULL,
    previous    text NOT NULL DEFAULT '',
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX lifecycle_events_device ON lifecycle_events (tenant_id, device_id, id);
CREATE INDEX lifecycle_events_at ON lifecycle_events (at);  -- retention

CREATE FUNCTION kestrel_lifecycle_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO lifecycle_events (tenant_id, device_id, status) VALUES (NEW.tenant_id, NEW.device_id, NEW.status);
    ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
        INSERT INTO lifecycle_events (tenant_id, device_id, status, previous)
        VALUES (NEW.tenant_id, NEW.device_id, NEW.status, OLD.status);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER devices_lifecycle_event AFTER INSERT OR UPDATE OF status ON devices
    FOR EACH ROW EXECUTE FUNCTION kestrel_lifecycle_event();

ALTER TABLE lifecycle_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE lifecycle_events FORCE ROW LEVEL SECURITY;
CREATE POLICY system_all ON lifecycle_events TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY tenant_isolation ON lifecycle_events TO kestrel_api
    USING (tenant_id = kestrel_tenant()) WITH CHECK (tenant_id = kestrel_tenant());
GRANT SELECT, INSERT ON lifecycle_events TO kestrel_api;

-- Schedule triggers: the last slot (epoch ms / every_s) whose ticks a rule worker published for a rule. Platform-wide
-- bookkeeping of the workers (a rule id, a number); the API never sees it.
CREATE TABLE rule_schedules (
    rule_id     text PRIMARY KEY REFERENCES rules (rule_id) ON DELETE CASCADE,
    slot        bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON rule_schedules FROM PUBLIC;
