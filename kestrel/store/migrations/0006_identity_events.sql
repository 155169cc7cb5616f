-- Backend principals (the ingest bridge, authsvc's control client, ...) and identity-change
-- notifications (ADR-0010).

-- A principal authenticates to the broker with username = name and a random secret shown once; only the
-- secret's SHA-256 is stored (the secret has 256 bits of entropy, so a slow hash adds nothing). Its role
-- selects a fixed ACL in authsvc. Client ids of principals are "svc:<name>:<instance>", which no device
-- id can be, so a principal can never take over a device's session or the other way round.
CREATE TABLE service_principals (
    name            text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_-]{1,64}$'),
    role            text NOT NULL CHECK (role IN ('ingest', 'control')),
    secret_sha256   text NOT NULL CHECK (secret_sha256 ~ '^[0-9a-f]{64}$'),
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Every change that can withdraw a credential notifies channel 'kestrel_identity' in the changing
-- transaction (delivered on commit only). authsvc drops its lookup cache and disconnects the affected
-- clients. A trigger, not application code, so every path (CLI, API, plain SQL) is covered.
CREATE FUNCTION kestrel_identity_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r jsonb := to_jsonb(NEW);  -- by name, so one function serves tables with different columns
    old_r jsonb := to_jsonb(OLD);
    status text := NEW.status;
    payload jsonb;
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
    END;
    PERFORM pg_notify('kestrel_identity', (payload || jsonb_build_object('status', status))::text);
    RETURN NEW;
END $$;

CREATE TRIGGER devices_identity AFTER UPDATE OF status ON devices
    FOR EACH ROW EXECUTE FUNCTION kestrel_identity_notify();
CREATE TRIGGER tenants_identity AFTER UPDATE OF status ON tenants
    FOR EACH ROW EXECUTE FUNCTION kestrel_identity_notify();
CREATE TRIGGER pki_certificates_identity AFTER UPDATE OF status ON pki_certificates
    FOR EACH ROW EXECUTE FUNCTION kestrel_identity_notify();
CREATE TRIGGER pki_authorities_identity AFTER UPDATE OF status ON pki_authorities
    FOR EACH ROW EXECUTE FUNCTION kestrel_identity_notify();
CREATE TRIGGER jwt_keys_identity AFTER UPDATE OF status ON jwt_keys
    FOR EACH ROW EXECUTE FUNCTION kestrel_identity_notify();
CREATE TRIGGER service_principals_identity AFTER UPDATE OF status, secret_sha256 ON service_principals
    FOR EACH ROW EXECUTE FUNCTION kestrel_identity_notify();
