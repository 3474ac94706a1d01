-- The replication slots this service database made (or adopted) on a primary.
-- `subscribe` records a slot here before it creates it, so that a run
-- interrupted between the two can tell its own slot from one another
-- subscription uses; `unsubscribe` drops only slots recorded here or used by
-- this database's own subscription.
CREATE TABLE outbox_relay.replication_slots (
    primary_system_identifier text        NOT NULL,
    primary_database          text        NOT NULL,
    slot_name                 text        NOT NULL,
    recorded_at               timestamptz NOT NULL DEFAULT now(),
    -- slot names are unique per primary cluster
    PRIMARY KEY (primary_system_identifier, slot_name)
);
