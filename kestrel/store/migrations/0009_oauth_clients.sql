-- OAuth 2.0 client credentials for integrators (ADR-0012): a client of one tenant exchanges its id and secret
-- for a short-lived EdDSA-signed access token. The secret is shown once and stored as SHA-256; the signing key
-- is the API's own (a file, never in the database), rotated by deploying a new one.
CREATE TABLE oauth_clients (
    client_id       text PRIMARY KEY CHECK (client_id ~ '^kcl_[0-9a-f]{16}$'),
    tenant_id       text NOT NULL REFERENCES tenants (tenant_id),
    name            text NOT NULL DEFAULT '',
    scopes          text[] NOT NULL,
    secret_sha256   text NOT NULL CHECK (secret_sha256 ~ '^[0-9a-f]{64}$'),
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz
);
CREATE INDEX oauth_clients_tenant ON oauth_clients (tenant_id, created_at);
ALTER TABLE oauth_clients ENABLE ROW LEVEL SECURITY;
ALTER TABLE oauth_clients FORCE ROW LEVEL SECURITY;
CREATE POLICY system_all ON oauth_clients TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY tenant_isolation ON oauth_clients TO kestrel_api
    USING (tenant_id = kestrel_tenant()) WITH CHECK (tenant_id = kestrel_tenant());
GRANT SELECT, INSERT, UPDATE ON oauth_clients TO kestrel_api;

-- Looked up before the tenant is known (the token endpoint, and every request carrying an access token).
CREATE FUNCTION kestrel_oauth_client_lookup(p_client_id text)
RETURNS TABLE (tenant_id text, scopes text[], secret_sha256 text, revoked_at timestamptz, tenant_status text,
               api_requests_per_s integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT c.tenant_id, c.scopes, c.secret_sha256, c.revoked_at, t.status, t.api_requests_per_s
    FROM oauth_clients c JOIN tenants t ON t.tenant_id = c.tenant_id
    WHERE c.client_id = p_client_id
$$;
REVOKE ALL ON FUNCTION kestrel_oauth_client_lookup(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION kestrel_oauth_client_lookup(text) TO kestrel_api;
