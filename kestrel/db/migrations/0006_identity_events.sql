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
    payload jsonb;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.status IS NOT DISTINCT FROM OLD.status THEN
        RETURN NEW;
    END IF;
    payload := CASE TG_TABLE_NAME
        WHEN 'devices' THEN jsonb_build_object('scope', 'device', 'tenant', NEW.tenant_id, 'device', NEW.device_id)
        WHEN 'pki_certificates' THEN jsonb_build_object('scope', 'device', 'tenant', NEW.tenant_id, 'device', NEW.device_id)
        WHEN 'jwt_keys' THEN CASE WHEN NEW.device_id IS NULL
            THEN jsonb_build_object('scope', 'tenant', 'tenant', NEW.tenant_id)
            ELSE jsonb_build_object('scope', 'device', 'tenant', NEW.tenant_id, 'device', NEW.device_id) END
        WHEN 'tenants' THEN jsonb_build_object('scope', 'tenant', 'tenant', NEW.tenant_id)
        WHEN 'pki_authorities' THEN CASE WHEN NEW.tenant_id IS NULL
            THEN jsonb_build_object('scope', 'all')
            ELSE jsonb_build_object('scope', 'tenant', 'tenant', NEW.tenant_id) END
        WHEN 'service_principals' THEN jsonb_build_object('scope', 'service', 'service', NEW.name)
    END;
    PERFORM pg_notify('kestrel_identity', (payload || jsonb_build_object('status', NEW.status))::text);
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
CREATE TRIGGER service_principals_identity AFTER UPDATE OF status ON service_principals
    FOR EACH ROW EXECUTE FUNCTION kestrel_identity_notify();
