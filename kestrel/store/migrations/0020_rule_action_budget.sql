-- Rule actions per second per tenant, and the rule workers' broker principal (issue 13).
--
-- Rule actions per second per tenant, counted across every rule worker (issue 13): one row per tenant holding the
-- current second's count, spent by kestrel_spend_rule_actions() in a short transaction of its own. The second is
-- the database's clock, so workers on skewed hosts share one window. The worker reserves a batch's actions before
-- it evaluates its effects; a batch that then fails has spent its share (the limit errs on the side of fewer).
CREATE TABLE rule_action_budget (
    tenant_id   text PRIMARY KEY REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    second      bigint NOT NULL,
    used        integer NOT NULL CHECK (used >= 0)
);
ALTER TABLE rule_action_budget ENABLE ROW LEVEL SECURITY;
ALTER TABLE rule_action_budget FORCE ROW LEVEL SECURITY;
CREATE POLICY system_all ON rule_action_budget TO CURRENT_USER USING (true) WITH CHECK (true);
-- The API's role has no grant on it; the policy is there all the same, as on every tenant table.
CREATE POLICY tenant_isolation ON rule_action_budget TO kestrel_api
    USING (tenant_id = kestrel_tenant()) WITH CHECK (tenant_id = kestrel_tenant());

-- Grants up to p_want actions of the tenant's current second and returns how many (0 when spent or no such tenant).
CREATE FUNCTION kestrel_spend_rule_actions(p_tenant text, p_want integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_limit integer;
    v_now bigint := floor(extract(epoch FROM clock_timestamp()));
    v_used integer;
    v_granted integer;
BEGIN
    SELECT rule_actions_per_s INTO v_limit FROM tenants WHERE tenant_id = p_tenant;
    IF v_limit IS NULL OR p_want <= 0 THEN
        RETURN 0;
    END IF;
    INSERT INTO rule_action_budget (tenant_id, second, used) VALUES (p_tenant, v_now, 0)
        ON CONFLICT (tenant_id) DO NOTHING;
    SELECT CASE WHEN second >= v_now THEN used ELSE 0 END INTO v_used
        FROM rule_action_budget WHERE tenant_id = p_tenant FOR UPDATE;
    v_granted := greatest(0, least(p_want, v_limit - v_used));
    UPDATE rule_action_budget SET second = greatest(second, v_now), used = v_used + v_granted
        WHERE tenant_id = p_tenant;
    RETURN v_granted;
END $$;

REVOKE ALL ON FUNCTION kestrel_spend_rule_actions(text, integer) FROM PUBLIC;

-- The platform administrator sets a tenant's rule quotas like its other quotas.
CREATE OR REPLACE FUNCTION kestrel_platform_update_tenant(
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
        max_rules = CASE WHEN p_changes ? 'max_rules' THEN (p_changes->>'max_rules')::integer ELSE max_rules END,
        rule_actions_per_s = CASE WHEN p_changes ? 'rule_actions_per_s'
            THEN (p_changes->>'rule_actions_per_s')::integer ELSE rule_actions_per_s END,
        version = version + 1,
        updated_at = now()
    WHERE tenant_id = p_tenant RETURNING * INTO updated;
    INSERT INTO audit_log (tenant_id, actor, action, target, before, after, request_id)
    VALUES (p_tenant, p_actor, 'tenant.update', 'tenant:' || p_tenant, to_jsonb(old), to_jsonb(updated), p_request_id);
    RETURN NEXT updated;
END $$;

-- The rule workers' broker principal (republish to MQTT): it may publish on the tenants' `out` topics only.
ALTER TABLE service_principals DROP CONSTRAINT service_principals_role_check;
ALTER TABLE service_principals ADD CONSTRAINT service_principals_role_check
    CHECK (role IN ('ingest', 'control', 'devices', 'provisioning', 'rules'));
