-- Public keys that verify device JWTs (ADR-0009). A key belongs to a tenant and optionally to one device;
-- the algorithm is pinned per key (EdDSA or ES256 only).
CREATE TABLE jwt_keys (
    kid             text PRIMARY KEY CHECK (kid ~ '^[A-Za-z0-9_-]{8,64}$'),
    tenant_id       text NOT NULL REFERENCES tenants (tenant_id),
    device_id       text REFERENCES devices (device_id),
    alg             text NOT NULL CHECK (alg IN ('EdDSA', 'ES256')),
    public_key_pem  text NOT NULL CHECK (public_key_pem LIKE '-----BEGIN PUBLIC KEY-----%'),
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jwt_keys_tenant ON jwt_keys (tenant_id);
