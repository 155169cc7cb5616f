-- Stream tickets (issue 14, ADR-0021): a browser cannot put a bearer token in an EventSource or WebSocket request, and
-- a long-lived token never goes in a URL. A client holding a token asks for a ticket (kstt_<id>_<secret>, the secret
-- stored as SHA-256) that opens one stream within 30 seconds, once. The ticket carries the credential it was issued
-- for (an API token's id or an OAuth client's), so the stream ends when that credential expires or is revoked.
CREATE TABLE stream_tickets (
    ticket_id       text PRIMARY KEY CHECK (ticket_id ~ '^[0-9a-f]{16}$'),
    tenant_id       text NOT NULL REFERENCES tenants (tenant_id),
    secret_sha256   text NOT NULL,
    actor           text NOT NULL,
    credential      text NOT NULL,           -- token:<id> or oauth:<client_id>
    scopes          text[] NOT NULL,
    credential_expires_at timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    used_at         timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stream_tickets_expiry ON stream_tickets (expires_at);

ALTER TABLE stream_tickets ENABLE ROW LEVEL SECURITY;
ALTER TABLE stream_tickets FORCE ROW LEVEL SECURITY;
CREATE POLICY system_all ON stream_tickets TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY tenant_isolation ON stream_tickets TO kestrel_api
    USING (tenant_id = kestrel_tenant()) WITH CHECK (tenant_id = kestrel_tenant());
GRANT INSERT ON stream_tickets TO kestrel_api;

-- Redeeming happens before any tenant is known: a narrow function marks the ticket used (once, unexpired) and
-- returns what it grants; the caller compares the secret's digest first (a wrong secret does not spend the ticket).
CREATE FUNCTION kestrel_redeem_stream_ticket(p_ticket_id text, p_secret_sha256 text)
RETURNS TABLE (tenant_id text, actor text, credential text, scopes text[], credential_expires_at timestamptz)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    UPDATE stream_tickets SET used_at = now()
    WHERE ticket_id = p_ticket_id AND secret_sha256 = p_secret_sha256 AND used_at IS NULL AND expires_at > now()
    RETURNING tenant_id, actor, credential, scopes, credential_expires_at
$$;
REVOKE ALL ON FUNCTION kestrel_redeem_stream_ticket(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION kestrel_redeem_stream_ticket(text, text) TO kestrel_api;

-- Used and expired tickets are deleted by the API, a minute after they expire.
CREATE FUNCTION kestrel_prune_stream_tickets() RETURNS integer
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    WITH gone AS (DELETE FROM stream_tickets WHERE expires_at < now() - interval '1 minute' RETURNING 1)
    SELECT count(*)::integer FROM gone
$$;
REVOKE ALL ON FUNCTION kestrel_prune_stream_tickets() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION kestrel_prune_stream_tickets() TO kestrel_api;
