-- Tenants and devices: the registry every other table hangs on.
-- Device ids are globally unique because the MQTT client id must equal the device id (ADR-0002):
-- two tenants sharing a device id could take over each other's broker sessions.
CREATE TABLE tenants (
    tenant_id   text PRIMARY KEY CHECK (tenant_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    name        text NOT NULL DEFAULT '',
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    device_id   text PRIMARY KEY CHECK (device_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    tenant_id   text NOT NULL REFERENCES tenants (tenant_id),
    name        text NOT NULL DEFAULT '',
    status      text NOT NULL DEFAULT 'active'
                CHECK (status IN ('registered', 'provisioned', 'active', 'suspended', 'decommissioned')),
    attributes  jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, device_id)
);

-- Storage policy read by the maintenance functions (one row).
CREATE TABLE storage_policy (
    id              boolean PRIMARY KEY DEFAULT true CHECK (id),
    retention_days  integer NOT NULL DEFAULT 30 CHECK (retention_days BETWEEN 1 AND 3650),
    ahead_days      integer NOT NULL DEFAULT 7 CHECK (ahead_days BETWEEN 1 AND 60)
);
INSERT INTO storage_policy DEFAULT VALUES;
