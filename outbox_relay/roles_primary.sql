-- outbox_relay roles on the PRIMARY (the producer's database). Apply as the
-- owner of the outbox_relay schema (or a superuser), after `migrate --primary`:
--     psql -d <primary db> -v ON_ERROR_STOP=1 -f roles_primary.sql
-- Safe to run again. Every role is a NOLOGIN group role: grant it to your own
-- login users (GRANT outbox_relay_producer TO backend_user); no passwords here.
-- Roles are cluster-wide; the grants are for this database.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['outbox_relay_producer', 'outbox_relay_subscriber', 'outbox_relay_operator'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$$;

-- producer: the backend writes outbox rows in its own transactions.
GRANT USAGE ON SCHEMA outbox_relay TO outbox_relay_producer;
GRANT INSERT ON outbox_relay.outbox TO outbox_relay_producer;
GRANT USAGE ON SEQUENCE outbox_relay.outbox_id_seq TO outbox_relay_producer;

-- subscriber: the user in SUBSCRIPTION_CONNINFO / PRIMARY_URL when `subscribe`
-- runs and the subscription streams. It reads the outbox (initial copy) and
-- makes and drops its slot. The REPLICATION attribute is not inherited from a
-- group role: give it to the login user itself (ALTER ROLE <user> REPLICATION).
GRANT USAGE ON SCHEMA outbox_relay TO outbox_relay_subscriber;
GRANT SELECT ON outbox_relay.outbox, outbox_relay.schema_migrations TO outbox_relay_subscriber;
GRANT EXECUTE ON FUNCTION pg_control_system() TO outbox_relay_subscriber;

-- operator: `prune --primary` (deletes rows every slot has confirmed).
GRANT USAGE ON SCHEMA outbox_relay TO outbox_relay_operator;
GRANT SELECT, DELETE ON outbox_relay.outbox TO outbox_relay_operator;
GRANT SELECT ON outbox_relay.schema_migrations TO outbox_relay_operator;
