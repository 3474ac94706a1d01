-- The sinks' own schema (migration set `sinks`, present when OUTBOX_RELAY_ROUTES
-- is set): which sink has acknowledged which outbox row, so that a retry of a
-- route with several sinks delivers only to those that have not.
CREATE SCHEMA IF NOT EXISTS outbox_relay_sinks;

-- No foreign key to outbox_relay.outbox on purpose: a partial delivery is
-- recorded from a second connection while the row's own transaction holds the
-- row FOR UPDATE, and a foreign-key check would wait on that lock.
CREATE TABLE outbox_relay_sinks.deliveries (
    outbox_id    bigint      NOT NULL,
    sink         text        NOT NULL,
    delivered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (outbox_id, sink)
);

-- `prune` deletes outbox rows in batches: their deliveries go with them. As the
-- owner (SECURITY DEFINER), so that the roles that prune need no grant here.
CREATE FUNCTION outbox_relay_sinks.forget_pruned() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
    DELETE FROM outbox_relay_sinks.deliveries AS d USING pruned WHERE d.outbox_id = pruned.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_sinks_forget_pruned
    AFTER DELETE ON outbox_relay.outbox
    REFERENCING OLD TABLE AS pruned
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_relay_sinks.forget_pruned();

-- The worker's least-privilege role (roles_service.sql), when it exists already.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_relay_worker') THEN
        GRANT USAGE ON SCHEMA outbox_relay_sinks TO outbox_relay_worker;
        GRANT SELECT, INSERT ON outbox_relay_sinks.deliveries TO outbox_relay_worker;
    END IF;
END
$$;
