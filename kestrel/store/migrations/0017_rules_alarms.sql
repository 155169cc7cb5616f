-- Rules, alarms and notifications (issue 13, ADR-0018, ADR-0019). Every table carries its tenant and is under
-- row-level security like the registry: the API's role sees its tenant's rows only; the rule workers run as the
-- owner and filter by tenant themselves (and resolve every target inside the rule's tenant).

ALTER TABLE tenants ADD COLUMN max_rules integer NOT NULL DEFAULT 200 CHECK (max_rules BETWEEN 0 AND 100000);
ALTER TABLE tenants ADD COLUMN rule_actions_per_s integer NOT NULL DEFAULT 50 CHECK (rule_actions_per_s > 0);

-- A rule: its current definition (kestrel_core.rules.model.Rule as JSON) and version; every version is kept.
CREATE TABLE rules (
    rule_id     text PRIMARY KEY CHECK (rule_id ~ '^r[0-9a-f]{24}$'),
    tenant_id   text NOT NULL REFERENCES tenants (tenant_id),
    name        text NOT NULL,
    enabled     boolean NOT NULL DEFAULT true,
    version     integer NOT NULL DEFAULT 1,
    definition  jsonb NOT NULL,
    created_by  text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rules_tenant ON rules (tenant_id, rule_id);

CREATE TABLE rule_versions (
    rule_id     text NOT NULL REFERENCES rules (rule_id) ON DELETE CASCADE,
    version     integer NOT NULL,
    tenant_id   text NOT NULL REFERENCES tenants (tenant_id),
    enabled     boolean NOT NULL,
    definition  jsonb NOT NULL,
    changed_by  text NOT NULL DEFAULT '',
    changed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rule_id, version)
);

-- One device's evaluation state for one rule (kestrel_core.rules.evaluate.DeviceState), written by the worker that
-- owns the device's partition in the transaction that records the transitions it caused. The API never sees it.
CREATE TABLE rule_state (
    rule_id      text NOT NULL REFERENCES rules (rule_id) ON DELETE CASCADE,
    device_id    text NOT NULL REFERENCES devices (device_id),
    tenant_id    text NOT NULL REFERENCES tenants (tenant_id),
    partition    integer NOT NULL,
    rule_version integer NOT NULL,
    state        jsonb NOT NULL,
    deadline_ms  bigint,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rule_id, device_id)
);
CREATE INDEX rule_state_partition ON rule_state (partition, deadline_ms) WHERE deadline_ms IS NOT NULL;
CREATE INDEX rule_state_by_partition ON rule_state (partition);

-- Where each partition's worker is in the stream RULES_IN, committed with the states of the same batch: the next
-- owner starts right after it (ADR-0019). Platform-wide (a partition holds many tenants); the API never sees it.
CREATE TABLE rule_partitions (
    partition   integer PRIMARY KEY,
    stream_seq  bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON rule_partitions FROM PUBLIC;

-- Alarms: at most one active alarm per (rule, device). States: active (acknowledged or not), cleared (acknowledged
-- or not). A raise while the last alarm of (rule, device) is cleared but unacknowledged re-opens it (re-trigger).
CREATE TABLE alarms (
    alarm_id         text PRIMARY KEY CHECK (alarm_id ~ '^a[0-9a-f]{24}$'),
    tenant_id        text NOT NULL REFERENCES tenants (tenant_id),
    rule_id          text NOT NULL,  -- no foreign key: alarms outlive the rule that raised them
    rule_name        text NOT NULL,
    device_id        text NOT NULL REFERENCES devices (device_id),
    severity         text NOT NULL CHECK (severity IN ('critical', 'major', 'minor', 'warning', 'info')),
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'cleared')),
    acknowledged     boolean NOT NULL DEFAULT false,
    raised_at        timestamptz NOT NULL,
    raised_values    jsonb NOT NULL DEFAULT '{}'::jsonb,
    retriggers       integer NOT NULL DEFAULT 0,
    acknowledged_at  timestamptz,
    acknowledged_by  text,
    cleared_at       timestamptz,
    cleared_by       text,
    cleared_values   jsonb,
    version          integer NOT NULL DEFAULT 1,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX alarms_one_active ON alarms (rule_id, device_id) WHERE status = 'active';
CREATE INDEX alarms_latest ON alarms (rule_id, device_id, raised_at DESC);
CREATE INDEX alarms_tenant ON alarms (tenant_id, status, severity, raised_at DESC);

CREATE TABLE alarm_comments (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alarm_id    text NOT NULL REFERENCES alarms (alarm_id),
    tenant_id   text NOT NULL REFERENCES tenants (tenant_id),
    author      text NOT NULL,
    body        text NOT NULL CHECK (length(body) BETWEEN 1 AND 4000),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alarm_comments_alarm ON alarm_comments (alarm_id, id);

-- Every transition, in order: the history of an alarm and the outbox of its NATS events (published = false until
-- a worker published it with this id as Nats-Msg-Id).
CREATE TABLE alarm_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alarm_id    text NOT NULL REFERENCES alarms (alarm_id),
    tenant_id   text NOT NULL REFERENCES tenants (tenant_id),
    event       text NOT NULL CHECK (event IN ('raised', 'retriggered', 'cleared', 'acknowledged', 'commented')),
    actor       text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    "values"    jsonb NOT NULL DEFAULT '{}'::jsonb,
    published   boolean NOT NULL DEFAULT false
);
CREATE INDEX alarm_events_alarm ON alarm_events (alarm_id, id);
CREATE INDEX alarm_events_unpublished ON alarm_events (id) WHERE NOT published;

-- Notification channels. The webhook secret is returned once, at creation; reads never return it.
CREATE TABLE channels (
    channel_id       text NOT NULL CHECK (channel_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    tenant_id        text NOT NULL REFERENCES tenants (tenant_id),
    kind             text NOT NULL CHECK (kind IN ('email', 'webhook', 'chat')),
    name             text NOT NULL DEFAULT '',
    config           jsonb NOT NULL,
    secret           text NOT NULL DEFAULT '',
    per_minute       integer NOT NULL DEFAULT 30 CHECK (per_minute BETWEEN 1 AND 10000),
    enabled          boolean NOT NULL DEFAULT true,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, channel_id)
);

-- One row per (transition, channel): the idempotency key receivers see, the retry schedule and the log.
-- status: pending -> delivered | dead (after the last attempt) | digested (folded into a digest by the rate limit).
CREATE TABLE deliveries (
    delivery_id     text PRIMARY KEY CHECK (delivery_id ~ '^n[0-9a-f]{24}$'),
    tenant_id       text NOT NULL REFERENCES tenants (tenant_id),
    channel_id      text NOT NULL,
    alarm_id        text REFERENCES alarms (alarm_id),
    event_id        bigint REFERENCES alarm_events (id),
    kind            text NOT NULL DEFAULT 'alarm' CHECK (kind IN ('alarm', 'digest')),
    payload         jsonb NOT NULL,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead', 'digested')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz,    -- the channel's rate counts deliveries attempted in the last minute
    digest_id       text,           -- the digest a rate-limited delivery was folded into
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    FOREIGN KEY (tenant_id, channel_id) REFERENCES channels (tenant_id, channel_id) ON DELETE CASCADE,
    UNIQUE (event_id, channel_id)
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_alarm ON deliveries (alarm_id, created_at);
CREATE INDEX deliveries_alarm_pending ON deliveries (alarm_id, channel_id, event_id) WHERE status = 'pending';
CREATE INDEX deliveries_channel_recent ON deliveries (tenant_id, channel_id, last_attempt_at)
    WHERE last_attempt_at IS NOT NULL;
CREATE INDEX deliveries_digest ON deliveries (digest_id) WHERE digest_id IS NOT NULL;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['rules', 'rule_versions', 'rule_state', 'alarms', 'alarm_comments', 'alarm_events',
                             'channels', 'deliveries']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY system_all ON %I TO CURRENT_USER USING (true) WITH CHECK (true)', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON %I TO kestrel_api'
                       ' USING (tenant_id = kestrel_tenant()) WITH CHECK (tenant_id = kestrel_tenant())', t);
    END LOOP;
END $$;

GRANT SELECT, INSERT, UPDATE, DELETE ON rules TO kestrel_api;
GRANT SELECT, INSERT ON rule_versions, alarm_comments, alarm_events TO kestrel_api;
GRANT SELECT, UPDATE ON alarms TO kestrel_api;
GRANT SELECT, INSERT, DELETE ON channels TO kestrel_api;
GRANT SELECT ON deliveries TO kestrel_api;
GRANT UPDATE (enabled, name, per_minute) ON channels TO kestrel_api;
-- The secret column stays unreadable to the API's role after creation: it may insert it, never select it.
REVOKE SELECT ON channels FROM kestrel_api;
GRANT SELECT (channel_id, tenant_id, kind, name, config, per_minute, enabled, created_at) ON channels TO kestrel_api;

-- Rule changes wake the workers (hot reload); a lost notification is caught by their periodic reload.
CREATE FUNCTION kestrel_rules_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kestrel_rules', COALESCE(NEW.rule_id, OLD.rule_id));
    RETURN NULL;
END $$;
CREATE TRIGGER rules_changed AFTER INSERT OR UPDATE OR DELETE ON rules
    FOR EACH ROW EXECUTE FUNCTION kestrel_rules_changed();
