-- A decommissioned device's retained topics (its status and desired state) are emptied at the broker even when
-- devicesvc is down at that moment (issue 12): the decommissioning transaction queues the clear here, devicesvc
-- publishes the empty retained messages and only then deletes the row. Before, a notification alone triggered it,
-- and a notification nobody was listening for was lost.
CREATE TABLE retained_clears (
    device_id       text PRIMARY KEY REFERENCES devices (device_id),
    tenant_id       text NOT NULL REFERENCES tenants (tenant_id),
    requested_at    timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE retained_clears ENABLE ROW LEVEL SECURITY;
ALTER TABLE retained_clears FORCE ROW LEVEL SECURITY;
CREATE POLICY system_all ON retained_clears TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY tenant_isolation ON retained_clears TO kestrel_api  -- no grant either: the API never touches it
    USING (tenant_id = kestrel_tenant()) WITH CHECK (tenant_id = kestrel_tenant());

-- Definer rights: the API's role decommissions devices but has no business with this queue.
CREATE FUNCTION kestrel_queue_retained_clear() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    INSERT INTO retained_clears (device_id, tenant_id) VALUES (NEW.device_id, NEW.tenant_id)
        ON CONFLICT (device_id) DO NOTHING;
    RETURN NEW;
END $$;

CREATE TRIGGER devices_retained_clear AFTER UPDATE OF status ON devices
    FOR EACH ROW WHEN (NEW.status = 'decommissioned' AND OLD.status IS DISTINCT FROM 'decommissioned')
    EXECUTE FUNCTION kestrel_queue_retained_clear();

-- Devices decommissioned before this migration: clear them once more (an empty retained message is harmless).
INSERT INTO retained_clears (device_id, tenant_id)
    SELECT device_id, tenant_id FROM devices WHERE status = 'decommissioned';
