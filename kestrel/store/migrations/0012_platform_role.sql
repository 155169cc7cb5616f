-- The platform administrator's tenant operations run as a role of their own (issue 10, least privilege): kestrel_api
-- serves every tenant request and can no longer execute them, so an SQL injection in a tenant's request could not
-- create, list or change tenants. kestrel_platform owns nothing and reads no table: it may only call the three
-- SECURITY DEFINER functions of migration 0008, which audit what they do. The embedded default creates it with a
-- login (elsewhere the DBA does; this creates it NOLOGIN if missing, as 0008 does for kestrel_api).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'kestrel_platform') THEN
        CREATE ROLE kestrel_platform NOLOGIN;
    END IF;
END $$;

REVOKE EXECUTE ON FUNCTION kestrel_platform_tenants(), kestrel_platform_create_tenant(text, text, integer, integer,
    integer, text, text), kestrel_platform_update_tenant(text, integer, jsonb, text, text) FROM kestrel_api;
GRANT USAGE ON SCHEMA public TO kestrel_platform;
GRANT SELECT ON schema_migrations TO kestrel_platform;
GRANT EXECUTE ON FUNCTION kestrel_platform_tenants(), kestrel_platform_create_tenant(text, text, integer, integer,
    integer, text, text), kestrel_platform_update_tenant(text, integer, jsonb, text, text) TO kestrel_platform;
