-- The failure history (contract section 2): the last 10 failed attempts of a
-- row, oldest first, each {"at", "attempt", "error"}. Written by the worker
-- with every failed attempt (queries.sql: fail_row, record_transient_failure),
-- kept when a later attempt succeeds and across `requeue`.
ALTER TABLE outbox_relay.outbox ADD COLUMN IF NOT EXISTS errors jsonb NOT NULL DEFAULT '[]';
