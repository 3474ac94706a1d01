-- outbox_relay roles on the SERVICE DATABASE. Apply as the owner of the
-- outbox_relay schema (or a superuser), after `migrate`:
--     psql -d <service db> -v ON_ERROR_STOP=1 -f roles_service.sql
-- Safe to run again (also after an upgrade's `migrate`). Every role is a
-- NOLOGIN group role: grant it to your own login users
-- (GRANT outbox_relay_worker TO svc_worker); no passwords here. Roles are
-- cluster-wide; the grants are for this database.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['outbox_relay_relay', 'outbox_relay_worker', 'outbox_relay_operator',
                             'outbox_relay_subscriber'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$$;

-- relay (`run`): reads new and stale rows, moves them to queued, prunes
-- finished rows when RETENTION is set. LISTEN, pg_notify and advisory locks
-- need no grant.
GRANT USAGE ON SCHEMA outbox_relay TO outbox_relay_relay;
GRANT SELECT, DELETE ON outbox_relay.outbox TO outbox_relay_relay;
GRANT UPDATE (status, queued_at, queued_epoch) ON outbox_relay.outbox TO outbox_relay_relay;
GRANT SELECT ON outbox_relay.schema_migrations TO outbox_relay_relay;
-- the leadership lease (taken, renewed, and locked FOR SHARE by each hand-over)
GRANT SELECT, UPDATE ON outbox_relay.relay_lease TO outbox_relay_relay;

-- worker (`worker`): claims a row and records its outcome.
GRANT USAGE ON SCHEMA outbox_relay TO outbox_relay_worker;
GRANT SELECT ON outbox_relay.outbox, outbox_relay.schema_migrations TO outbox_relay_worker;
GRANT UPDATE (status, attempts, last_error, finished_at, errors, claim_token, claimed_until)
    ON outbox_relay.outbox TO outbox_relay_worker;
-- deliveries outside transactions: claim tokens, and the live workers' routes
GRANT USAGE ON SEQUENCE outbox_relay.claim_tokens TO outbox_relay_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_relay.workers TO outbox_relay_worker;
GRANT SELECT ON outbox_relay.workers TO outbox_relay_relay;

-- operator (`status`, `requeue`, `prune`, `doctor`).
GRANT USAGE ON SCHEMA outbox_relay TO outbox_relay_operator;
GRANT SELECT, DELETE ON outbox_relay.outbox TO outbox_relay_operator;
GRANT UPDATE (status, attempts, last_error, queued_at, finished_at, generation)
    ON outbox_relay.outbox TO outbox_relay_operator;
GRANT SELECT ON outbox_relay.schema_migrations, outbox_relay.replication_slots, outbox_relay.relay_lease,
    outbox_relay.workers TO outbox_relay_operator;
GRANT pg_monitor TO outbox_relay_operator;  -- doctor: subscription and replication statistics

-- subscriber (`subscribe`, `unsubscribe` on this side). PostgreSQL 16 and later:
-- pg_create_subscription plus CREATE on the database; the subscription's owner
-- must also be able to SET ROLE to the outbox table's owner (the apply worker
-- writes as that owner): grant that owner role to the login user. PostgreSQL 15:
-- only a superuser can create a subscription; these grants do not suffice there.
GRANT USAGE ON SCHEMA outbox_relay TO outbox_relay_subscriber;
GRANT SELECT ON outbox_relay.outbox, outbox_relay.schema_migrations TO outbox_relay_subscriber;
GRANT SELECT, INSERT, DELETE ON outbox_relay.replication_slots TO outbox_relay_subscriber;
GRANT EXECUTE ON FUNCTION pg_control_system() TO outbox_relay_subscriber;
DO $$
BEGIN
    EXECUTE format('GRANT CREATE ON DATABASE %I TO outbox_relay_subscriber', current_database());
    IF current_setting('server_version_num')::int >= 160000 THEN
        EXECUTE 'GRANT pg_create_subscription TO outbox_relay_subscriber';
    END IF;
END
$$;

-- ---------------------------------------------------------------------------
-- Reservation domain (the shipped reference handler). Separate on purpose:
-- these grants will move into the reservation plugin's own SQL.
-- ---------------------------------------------------------------------------
GRANT USAGE ON SCHEMA ledger TO outbox_relay_worker;
GRANT SELECT, UPDATE ON ledger.reservations, ledger.accounts TO outbox_relay_worker;

-- ---------------------------------------------------------------------------
-- Sinks (the `sinks` migration set, applied by every `migrate`).
-- ---------------------------------------------------------------------------
DO $$
BEGIN
    IF to_regnamespace('outbox_relay_sinks') IS NOT NULL THEN
        GRANT USAGE ON SCHEMA outbox_relay_sinks TO outbox_relay_worker;
        GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA outbox_relay_sinks TO outbox_relay_worker;
    END IF;
END
$$;
