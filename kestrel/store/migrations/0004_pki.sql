-- PKI: certificate authorities, issued certificates and an append-only audit trail (ADR-0008).
CREATE TABLE pki_authorities (
    ca_id           text PRIMARY KEY,                     -- 'root' or 'tenant:<tenant_id>'
    kind            text NOT NULL CHECK (kind IN ('root', 'tenant')),
    tenant_id       text REFERENCES tenants (tenant_id),
    serial          text NOT NULL UNIQUE,
    subject         text NOT NULL,
    cert_pem        text NOT NULL,
    key_encrypted   text NOT NULL CHECK (key_encrypted LIKE '-----BEGIN ENCRYPTED PRIVATE KEY-----%'),
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    not_after       timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'root') = (tenant_id IS NULL))
);

CREATE TABLE pki_certificates (
    serial              text PRIMARY KEY,                 -- hex, lower case
    tenant_id           text NOT NULL REFERENCES tenants (tenant_id),
    device_id           text NOT NULL REFERENCES devices (device_id),
    issuer_ca           text NOT NULL REFERENCES pki_authorities (ca_id),
    fingerprint_sha256  text NOT NULL UNIQUE,
    not_before          timestamptz NOT NULL,
    not_after           timestamptz NOT NULL,
    status              text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    revoked_at          timestamptz,
    revocation_reason   text,
    cert_pem            text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX pki_certificates_device ON pki_certificates (tenant_id, device_id, created_at DESC);

CREATE TABLE pki_audit (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor       text NOT NULL,
    action      text NOT NULL,
    tenant_id   text,
    device_id   text,
    serial      text,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);

-- The audit trail is append-only for everyone who is not its owner's superuser.
CREATE FUNCTION pki_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pki_audit is append-only' USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER pki_audit_no_update BEFORE UPDATE OR DELETE OR TRUNCATE ON pki_audit
    FOR EACH STATEMENT EXECUTE FUNCTION pki_audit_append_only();

-- CRL numbers must grow monotonically per CA; one sequence gives that for every CA.
CREATE SEQUENCE pki_crl_number;
