-- Tenancy (ADR-0012): users, scoped API tokens, device groups and tags, the audit log, per-tenant limits, and
-- row-level security on every table that holds a tenant's rows.
--
-- Roles: the migrating role owns the tables and is the "system" (writer, authsvc, PKI and operator CLI); the
-- API connects as kestrel_api, which owns nothing, cannot bypass RLS, and sees a tenant's rows only inside a
-- transaction that set kestrel.tenant. With no tenant set, its policies match nothing.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'kestrel_api') THEN
        CREATE ROLE kestrel_api NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
END $$;

-- The tenant of the current transaction, or '' (never a valid id: ids are 1 to 64 characters).
CREATE FUNCTION kestrel_tenant() RETURNS text LANGUAGE sql STABLE AS
$$ SELECT coalesce(current_setting('kestrel.tenant', true), '') $$;

ALTER TABLE tenants
    ADD COLUMN max_devices integer CHECK (max_devices > 0),
    ADD COLUMN api_requests_per_s integer CHECK (api_requests_per_s > 0),
    ADD COLUMN ingest_messages_per_s integer CHECK (ingest_messages_per_s > 0),
    ADD COLUMN version integer NOT NULL DEFAULT 1,
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();

ALTER TABLE devices
    ADD COLUMN tags text[] NOT NULL DEFAULT '{}' CHECK (cardinality(tags) <= 64),
    ADD COLUMN version integer NOT NULL DEFAULT 1,
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX devices_tenant_status ON devices (tenant_id, status, device_id);
CREATE INDEX devices_tags ON devices USING gin (tags);

CREATE TABLE users (
    user_id     text PRIMARY KEY,                               -- 'u' + 16 hex
    tenant_id   text NOT NULL REFERENCES tenants (tenant_id),
    email       text NOT NULL CHECK (email ~ '^[^@\s]{1,64}@[^@\s]{1,255}$'),
    role        text NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    version     integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, email)
);

-- kst_<token_id>_<secret>: the id is public (recognisable, listed), the secret is shown once and stored as
-- SHA-256 (256 bits of entropy). A platform token has no tenant. Effective scopes = the token's scopes
-- limited by its user's current role, so demoting or disabling a user also narrows their tokens.
CREATE TABLE api_tokens (
    token_id        text PRIMARY KEY CHECK (token_id ~ '^[0-9a-f]{16}$'),
    tenant_id       text REFERENCES tenants (tenant_id),
    user_id         text REFERENCES users (user_id),
    name            text NOT NULL DEFAULT '',
    scopes          text[] NOT NULL,
    secret_sha256   text NOT NULL CHECK (secret_sha256 ~ '^[0-9a-f]{64}$'),
    expires_at      timestamptz NOT NULL,
    revoked_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (tenant_id IS NOT NULL OR user_id IS NULL)
);
CREATE INDEX api_tokens_tenant ON api_tokens (tenant_id, created_at);

CREATE TABLE device_groups (
    tenant_id   text NOT NULL REFERENCES tenants (tenant_id),
    group_id    text NOT NULL CHECK (group_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    name        text NOT NULL DEFAULT '',
    version     integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, group_id)
);

CREATE TABLE device_group_members (
    tenant_id   text NOT NULL,
    group_id    text NOT NULL,
    device_id   text NOT NULL,
    PRIMARY KEY (tenant_id, group_id, device_id),
    FOREIGN KEY (tenant_id, group_id) REFERENCES device_groups (tenant_id, group_id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id)
);
CREATE INDEX device_group_members_device ON device_group_members (tenant_id, device_id);

-- Every mutating API call; append-only for everyone (a trigger), readable by the tenant's admins.
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    tenant_id   text,
    actor       text NOT NULL,
    action      text NOT NULL,
    target      text NOT NULL,
    before      jsonb,
    after       jsonb,
    request_id  text NOT NULL
);
CREATE INDEX audit_log_tenant ON audit_log (tenant_id, id);
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only' USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- Idempotency-Key on creates: the first answer is stored and replayed for a repeat with the same body.
CREATE TABLE idempotency_keys (
    tenant_id       text NOT NULL REFERENCES tenants (tenant_id),
    key             text NOT NULL CHECK (length(key) BETWEEN 1 AND 200),
    request_sha256  text NOT NULL,
    status          integer NOT NULL,
    body            jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, key)
);

-- Row-level security, enabled and forced, on every table with a tenant_id. The owner (the system) keeps a
-- policy of its own; kestrel_api gets the tenant policy only.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['tenants', 'devices', 'telemetry', 'pki_authorities', 'pki_certificates', 'pki_audit',
                             'jwt_keys', 'users', 'api_tokens', 'device_groups', 'device_group_members',
                             'audit_log', 'idempotency_keys']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY system_all ON %I TO CURRENT_USER USING (true) WITH CHECK (true)', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON %I TO kestrel_api'
                       ' USING (tenant_id = kestrel_tenant()) WITH CHECK (tenant_id = kestrel_tenant())', t);
    END LOOP;
END $$;

-- What the API may touch at all (RLS then narrows it to one tenant's rows).
GRANT USAGE ON SCHEMA public TO kestrel_api;
GRANT SELECT ON schema_migrations TO kestrel_api;  -- readiness: is the schema migrated?
GRANT SELECT ON tenants TO kestrel_api;
GRANT SELECT, INSERT, UPDATE ON devices, device_groups, users TO kestrel_api;
GRANT DELETE ON device_groups TO kestrel_api;
GRANT SELECT, INSERT, DELETE ON device_group_members TO kestrel_api;
GRANT SELECT ON telemetry, telemetry_hourly, pki_certificates, jwt_keys TO kestrel_api;
GRANT SELECT, INSERT, UPDATE ON api_tokens TO kestrel_api;
GRANT SELECT, INSERT ON audit_log, idempotency_keys TO kestrel_api;
GRANT USAGE ON SEQUENCE audit_log_id_seq TO kestrel_api;

-- Token authentication happens before the tenant is known: one narrow function, run as the owner, returns the
-- single row the token's id names (the caller still compares the secret's digest).
CREATE FUNCTION kestrel_token_lookup(p_token_id text)
RETURNS TABLE (tenant_id text, user_id text, scopes text[], secret_sha256 text, expires_at timestamptz,
               revoked_at timestamptz, user_role text, user_status text, tenant_status text,
               api_requests_per_s integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT k.tenant_id, k.user_id, k.scopes, k.secret_sha256, k.expires_at, k.revoked_at, u.role, u.status, t.status,
           t.api_requests_per_s
    FROM api_tokens k
    LEFT JOIN users u ON u.user_id = k.user_id
    LEFT JOIN tenants t ON t.tenant_id = k.tenant_id
    WHERE k.token_id = p_token_id
$$;
REVOKE ALL ON FUNCTION kestrel_token_lookup(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION kestrel_token_lookup(text) TO kestrel_api;

-- The platform administrator's operations on tenants: narrow functions run as the owner, each writing its
-- audit row (the API role itself can see no tenant but the one of its transaction).
CREATE FUNCTION kestrel_platform_tenants() RETURNS SETOF tenants
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS
$$ SELECT * FROM tenants ORDER BY tenant_id $$;

CREATE FUNCTION kestrel_platform_create_tenant(
    p_tenant text, p_name text, p_max_devices integer, p_api_rps integer, p_ingest_mps integer,
    p_actor text, p_request_id text
) RETURNS SETOF tenants
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    created tenants;
BEGIN
    INSERT INTO tenants (tenant_id, name, max_devices, api_requests_per_s, ingest_messages_per_s)
    VALUES (p_tenant, p_name, p_max_devices, p_api_rps, p_ingest_mps) RETURNING * INTO created;
    INSERT INTO audit_log (tenant_id, actor, action, target, after, request_id)
    VALUES (p_tenant, p_actor, 'tenant.create', 'tenant:' || p_tenant, to_jsonb(created), p_request_id);
    RETURN NEXT created;
END $$;

CREATE FUNCTION kestrel_platform_update_tenant(
    p_tenant text, p_expected_version integer, p_changes jsonb, p_actor text, p_request_id text
) RETURNS SETOF tenants
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    old tenants;
    updated tenants;
BEGIN
    SELECT * INTO old FROM tenants WHERE tenant_id = p_tenant FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF p_expected_version IS NOT NULL AND old.version <> p_expected_version THEN
        RAISE EXCEPTION 'version mismatch' USING ERRCODE = 'P0412';
    END IF;
    UPDATE tenants SET
        name = coalesce(p_changes->>'name', name),
        status = coalesce(p_changes->>'status', status),
        max_devices = CASE WHEN p_changes ? 'max_devices' THEN (p_changes->>'max_devices')::integer ELSE max_devices END,
        api_requests_per_s = CASE WHEN p_changes ? 'api_requests_per_s'
            THEN (p_changes->>'api_requests_per_s')::integer ELSE api_requests_per_s END,
        ingest_messages_per_s = CASE WHEN p_changes ? 'ingest_messages_per_s'
            THEN (p_changes->>'ingest_messages_per_s')::integer ELSE ingest_messages_per_s END,
        version = version + 1,
        updated_at = now()
    WHERE tenant_id = p_tenant RETURNING * INTO updated;
    INSERT INTO audit_log (tenant_id, actor, action, target, before, after, request_id)
    VALUES (p_tenant, p_actor, 'tenant.update', 'tenant:' || p_tenant, to_jsonb(old), to_jsonb(updated), p_request_id);
    RETURN NEXT updated;
END $$;

REVOKE ALL ON FUNCTION kestrel_platform_tenants(), kestrel_platform_create_tenant(text, text, integer, integer, integer,
    text, text), kestrel_platform_update_tenant(text, integer, jsonb, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION kestrel_platform_tenants(), kestrel_platform_create_tenant(text, text, integer, integer,
    integer, text, text), kestrel_platform_update_tenant(text, integer, jsonb, text, text) TO kestrel_api;
