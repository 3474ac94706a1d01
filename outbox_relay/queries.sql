-- Every query outbox_relay runs, by name. Loaded by outbox_relay/sql.py; a
-- block runs from its "-- name:" line to the next one.

-- name: try_relay_lock
-- One active relay per service database, whatever its queue name: a session
-- lock held on the listener's own connection, released when that session ends.
SELECT pg_try_advisory_lock(hashtext('outbox_relay'), 1);

-- name: select_new_by_ids
SELECT id, correlation_id, generation
  FROM outbox_relay.outbox
 WHERE id = ANY($1::bigint[]) AND status = 'new';

-- name: select_new
SELECT id, correlation_id, generation
  FROM outbox_relay.outbox
 WHERE status = 'new' AND id > $1
 ORDER BY id
 LIMIT $2;

-- name: cutoff
-- $1 seconds ago by the database's own clock (the sweep's and prune's cut-offs).
SELECT now() - make_interval(secs => $1::float8);

-- name: mark_queued
-- Compare-and-set: a row a worker has already finished stays finished. Fenced:
-- it acts only while the lease is unexpired and of epoch $2 (the lease row is
-- locked FOR SHARE, so a takeover committing meanwhile is seen, and waits for
-- this statement). It never waits on a row lock: a row a worker holds is
-- skipped (it stays as it is; the next sweep finds it if it is still pending).
WITH lease AS (
    SELECT epoch
      FROM outbox_relay.relay_lease
     WHERE singleton AND epoch = $2 AND expires_at > now()
       FOR SHARE
), target AS (
    SELECT o.id
      FROM outbox_relay.outbox AS o
     WHERE o.id = ANY($1::bigint[]) AND o.status IN ('new', 'queued')
       AND EXISTS (SELECT 1 FROM lease)
       FOR UPDATE SKIP LOCKED
), queued AS (
    UPDATE outbox_relay.outbox AS o
       SET status = 'queued', queued_at = now(), queued_epoch = $2
      FROM target AS t
     WHERE o.id = t.id
    RETURNING o.id
)
SELECT EXISTS (SELECT 1 FROM lease) AS leading, (SELECT count(*) FROM queued) AS queued;

-- name: claim_row
-- Locks the row for the handler's transaction: a second delivery of the same
-- job waits here, then sees the row finished and changes nothing.
SELECT id, correlation_id, kind, outcome, payload, created_at, status, attempts, generation
  FROM outbox_relay.outbox
 WHERE id = $1
   FOR UPDATE;

-- name: finished_columns
-- The move to `finished`, written once: finish_row and the fast path use it.
status = 'finished', attempts = attempts + 1, last_error = NULL, finished_at = now()

-- name: finish_row
UPDATE outbox_relay.outbox SET {finished_columns} WHERE id = $1
RETURNING kind, extract(epoch FROM finished_at - created_at)::float8 AS commit_to_finish;

-- name: fast_path
-- The one-statement path, composed by outbox_relay/worker/processor.py from the
-- plugins' fast paths (outbox_relay.handlers.FastPath): the core claims the
-- pending rows, each plugin's effect CTEs read `claimed` and apply the effect,
-- and the union of their `applied` ids says which rows the core finishes.
WITH claimed AS (
    SELECT o.id, o.correlation_id, o.kind, o.outcome, o.payload
      FROM outbox_relay.outbox AS o
     WHERE o.id = ANY($1::bigint[]) AND o.status IN ('new', 'queued')
     ORDER BY o.id
       FOR UPDATE
), {effects}, applied AS (
    {applied}
), finished AS (
    UPDATE outbox_relay.outbox AS o
       SET {finished_columns}
      FROM applied AS a
     WHERE o.id = a.id
    RETURNING o.id, o.kind, extract(epoch FROM o.finished_at - o.created_at)::float8 AS commit_to_finish
)
SELECT id, kind, commit_to_finish FROM finished;

-- name: record_failure
-- Counts a failed attempt; the row turns failed once it has had $3 attempts
-- (MAX_ATTEMPTS; 0 fails it now: a permanent error). The attempt also joins the
-- failure history: the last 10 failed attempts, oldest first
-- (`$[last - 9 to last]` keeps at most ten, fewer as they are). A claimed row
-- ($4: its claim token, NULL for a row applied in a transaction) only while its
-- claim is still this worker's, and its claim goes.
UPDATE outbox_relay.outbox
   SET attempts    = attempts + 1,
       last_error  = $2,
       status      = CASE WHEN attempts + 1 >= $3 THEN 'failed' ELSE status END,
       finished_at = CASE WHEN attempts + 1 >= $3 THEN now() ELSE finished_at END,
       errors      = jsonb_path_query_array(
           errors || jsonb_build_array(jsonb_build_object(
               'at', now(), 'attempt', attempts + 1, 'error', $2::text)),
           '$[last - 9 to last]'),
       claim_token = NULL, claimed_until = NULL
 WHERE id = $1 AND status IN ('new', 'queued') AND ($4::bigint IS NULL OR claim_token = $4)
RETURNING status, attempts, kind;

-- name: status_counts
SELECT status, count(*) AS n FROM outbox_relay.outbox GROUP BY status;

-- name: oldest_pending_age
-- One minimum per partial index: the planner cannot match `status IN (...)`
-- against two partial indexes, and would scan the whole table.
SELECT extract(epoch FROM now() - least(
           (SELECT min(created_at) FROM outbox_relay.outbox WHERE status = 'new'),
           (SELECT min(created_at) FROM outbox_relay.outbox WHERE status = 'queued')))::float8;

-- name: failed_rows
SELECT correlation_id, kind, attempts, last_error, errors::text AS errors
  FROM outbox_relay.outbox
 WHERE status = 'failed'
 ORDER BY id
 LIMIT $1;

-- name: max_id
-- `status --watch`: the newest row, one probe of the primary key.
SELECT coalesce(max(id), 0) FROM outbox_relay.outbox;

-- name: rows_after
-- `status --watch`: rows that arrived after its last full count, a range of the
-- primary key (the cost follows the new rows, never the finished ones).
SELECT count(*) FROM outbox_relay.outbox WHERE id > $1;

-- name: recent_failed_rows
-- `status --watch`: the newest failed rows, from the failed rows' partial index.
SELECT correlation_id, kind, attempts, last_error, errors::text AS errors
  FROM outbox_relay.outbox
 WHERE status = 'failed'
 ORDER BY id DESC
 LIMIT $1;

-- name: requeue_ids
UPDATE outbox_relay.outbox
   SET status = 'new', attempts = 0, last_error = NULL, queued_at = NULL,
       finished_at = NULL, generation = generation + 1
 WHERE correlation_id = ANY($1::text[]) AND status = 'failed'
RETURNING correlation_id;

-- name: requeue_all_failed
WITH requeued AS (
    UPDATE outbox_relay.outbox
       SET status = 'new', attempts = 0, last_error = NULL, queued_at = NULL,
           finished_at = NULL, generation = generation + 1
     WHERE status = 'failed'
    RETURNING 1
)
SELECT count(*) FROM requeued;

-- name: wake_relay
-- The payload `sweep` asks the relay for an immediate sweep (a row id is the trigger's; anything
-- else is dropped and counted).
SELECT pg_notify('outbox_relay', 'sweep');

-- name: listener_ping
-- The relay's notification listener: answered late when its connection is behind (a flood).
SELECT 1;

-- name: migrate_lock
SELECT pg_advisory_xact_lock(hashtext('outbox_relay'), 0);

-- name: create_migrations_table
CREATE SCHEMA IF NOT EXISTS outbox_relay;
CREATE TABLE IF NOT EXISTS outbox_relay.schema_migrations (
    target     text        NOT NULL,
    version    integer     NOT NULL,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target, version)
);

-- name: applied_migrations
SELECT version FROM outbox_relay.schema_migrations WHERE target = $1 ORDER BY version;

-- name: record_migration
INSERT INTO outbox_relay.schema_migrations (target, version, name) VALUES ($1, $2, $3);

-- name: schema_version
SELECT coalesce(max(version), 0)
  FROM outbox_relay.schema_migrations
 WHERE target = $1;

-- name: migrations_table_exists
SELECT to_regclass('outbox_relay.schema_migrations') IS NOT NULL;

-- name: subscription_lock
-- Serialises `subscribe` and `unsubscribe` runs on one service database (two
-- relay instances starting at once): a session lock, held until the
-- command's connection closes. It takes no transaction id, so it never delays
-- the slot creation, which waits for open write transactions.
SELECT pg_advisory_lock(hashtext('outbox_relay'), 2);

-- name: slot_exists
SELECT count(*) > 0 FROM pg_replication_slots WHERE slot_name = $1;

-- name: create_slot
SELECT pg_create_logical_replication_slot($1, 'pgoutput');

-- name: create_failover_slot
-- PostgreSQL 17+: a slot that physical standbys running sync_replication_slots
-- keep a copy of, so that it survives the primary's failover.
SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true);

-- name: server_version_num
SELECT current_setting('server_version_num')::int;

-- name: in_recovery
SELECT pg_is_in_recovery();

-- name: repoint_slot
-- The subscription's slot on the (new) primary. Columns of 17+ (synced,
-- failover, invalidation_reason) through to_jsonb, so that one query serves 15 to 18.
SELECT s.active, s.database::text AS database, s.plugin::text AS plugin,
       s.wal_status::text AS wal_status, s.confirmed_flush_lsn::text AS confirmed_flush_lsn,
       coalesce((to_jsonb(s) ->> 'synced')::boolean, false) AS synced,
       coalesce((to_jsonb(s) ->> 'failover')::boolean, false) AS failover,
       coalesce(to_jsonb(s) ->> 'invalidation_reason',
                CASE WHEN (to_jsonb(s) ->> 'conflicting')::boolean THEN 'conflicting' END) AS invalid
  FROM pg_replication_slots s
 WHERE s.slot_name = $1 AND s.slot_type = 'logical';

-- name: subscription_oid
SELECT oid::bigint
  FROM pg_subscription
 WHERE subname = $1
   AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database());

-- name: apply_workers
-- The subscription's workers still running (a disabled subscription's exit within moments).
SELECT count(*) FROM pg_stat_subscription WHERE subid = $1::bigint::oid AND pid IS NOT NULL;

-- name: origin_advance
-- The subscription's replication origin (named pg_<oid> by PostgreSQL) moved to
-- the adopted slot's confirmed_flush_lsn: the new primary resends from there
-- (rows the service has are skipped by outbox_skip_known), so no row committed
-- after that point is skipped, whatever the subscriber received from the old primary.
SELECT pg_replication_origin_advance('pg_' || $1::bigint::text, $2::text::pg_lsn);

-- name: drop_slot
SELECT pg_drop_replication_slot(slot_name)
  FROM pg_replication_slots
 WHERE slot_name = $1 AND NOT active;

-- name: publication_exists
SELECT count(*) > 0 FROM pg_publication WHERE pubname = 'outbox_relay';

-- name: subscription_info
SELECT subenabled, subslotname
  FROM pg_subscription
 WHERE subname = $1
   AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database());

-- name: create_subscription
-- Identifiers and the connection string are quoted by outbox_relay/replication.py.
CREATE SUBSCRIPTION {subscription}
    CONNECTION {conninfo}
    PUBLICATION outbox_relay
    WITH (create_slot = false, slot_name = {slot}, copy_data = true{options});

-- name: alter_subscription_connection
ALTER SUBSCRIPTION {subscription} CONNECTION {conninfo};

-- name: subscription_failover_on
-- 17+ only; the subscription must be disabled and its slot idle (PostgreSQL alters the slot).
ALTER SUBSCRIPTION {subscription} SET (failover = true);

-- name: enable_subscription
ALTER SUBSCRIPTION {subscription} ENABLE;

-- name: disable_subscription
ALTER SUBSCRIPTION {subscription} DISABLE;

-- name: detach_subscription_slot
ALTER SUBSCRIPTION {subscription} SET (slot_name = NONE);

-- name: drop_subscription
DROP SUBSCRIPTION IF EXISTS {subscription};

-- name: subscription_table_states
SELECT srsubstate::text AS srsubstate
  FROM pg_subscription_rel r
  JOIN pg_subscription s ON s.oid = r.srsubid
 WHERE s.subname = $1;

-- name: prune_first_id
-- The first row at or after $1: one probe of the primary key, so a stretch of
-- ids with no rows (pruned before, or never used) costs nothing to cross.
SELECT min(id) FROM outbox_relay.outbox WHERE id >= $1;

-- name: prune_last_id
SELECT max(id) FROM outbox_relay.outbox;

-- name: prune_service_range
-- One short step of `prune` on the service database: a primary-key range scan
-- (no index beyond the primary key, nothing in the hot path). "oldest" is read
-- from the snapshot before the DELETE: the range's earliest created_at, which
-- tells prune.py whether anything deletable can still follow.
WITH pruned AS (
    DELETE FROM outbox_relay.outbox
     WHERE id BETWEEN $1 AND $2
       AND status = ANY($4::text[])
       AND finished_at < $3
    RETURNING 1
)
SELECT (SELECT count(*) FROM pruned) AS pruned,
       (SELECT min(created_at) FROM outbox_relay.outbox WHERE id BETWEEN $1 AND $2) AS oldest;

-- name: prune_primary_range
-- Candidates on the primary (which has no status): rows created before $3.
SELECT coalesce(array_agg(id ORDER BY id) FILTER (WHERE created_at < $3), '{}') AS ids,
       min(created_at) AS oldest
  FROM outbox_relay.outbox
 WHERE id BETWEEN $1 AND $2;

-- name: prune_wal_insert_lsn
-- Read after the candidates' snapshot exists: every row it sees committed before this LSN.
SELECT pg_current_wal_insert_lsn()::text;

-- name: prune_wal_nudge
-- Assigns a transaction id, so committing writes a WAL record after the LSN
-- read above: on an idle server the slots then still move past that LSN.
SELECT pg_current_xact_id()::text;

-- name: prune_logical_slots
-- Every logical slot of this database: a subscriber of any service (or any
-- other logical consumer) must have confirmed the LSN before rows go.
SELECT slot_name, active, confirmed_flush_lsn::text AS confirmed_flush_lsn,
       coalesce(confirmed_flush_lsn >= $1::text::pg_lsn, false) AS caught_up
  FROM pg_replication_slots
 WHERE database = current_database() AND slot_type = 'logical'
 ORDER BY slot_name;

-- name: prune_primary_ids
DELETE FROM outbox_relay.outbox WHERE id = ANY($1::bigint[]);

-- name: database_identity
-- What makes this database unique everywhere: its cluster's system identifier
-- (random, fixed at initdb) and its oid in that cluster.
SELECT (SELECT system_identifier FROM pg_control_system())::text AS system_identifier,
       oid::bigint AS database_oid,
       datname::text AS database
  FROM pg_database
 WHERE datname = current_database();

-- name: outbox_subscriptions
-- This database's subscriptions to the outbox publication (any name: one made
-- under an older default keeps being used).
SELECT subname::text AS subname, subslotname::text AS subslotname
  FROM pg_subscription
 WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND 'outbox_relay' = ANY (subpublications)
 ORDER BY subname;

-- name: recorded_slots
SELECT slot_name
  FROM outbox_relay.replication_slots
 WHERE primary_system_identifier = $1 AND primary_database = $2
 ORDER BY recorded_at, slot_name;

-- name: record_slot
INSERT INTO outbox_relay.replication_slots (primary_system_identifier, primary_database, slot_name)
VALUES ($1, $2, $3)
ON CONFLICT (primary_system_identifier, slot_name) DO NOTHING;

-- name: forget_slot
DELETE FROM outbox_relay.replication_slots
 WHERE primary_system_identifier = $1 AND slot_name = $2;

-- name: slot_state
SELECT active, database::text AS database, plugin::text AS plugin
  FROM pg_replication_slots
 WHERE slot_name = $1;

-- name: database_shape
-- Tells a service database (outbox with a status column) from a primary
-- (outbox without) from neither, so that a command pointed at the wrong one
-- can say so instead of failing on a missing column or an existing table.
SELECT to_regclass('outbox_relay.outbox') IS NOT NULL AS has_outbox,
       EXISTS (SELECT 1
                 FROM pg_attribute
                WHERE attrelid = to_regclass('outbox_relay.outbox')
                  AND attname = 'status'
                  AND NOT attisdropped) AS has_status;

-- name: select_stale_queued_page
-- Rows handed to the queue before $1 and still not done: the queue may have
-- lost them (Redis restarted empty, a job expired, a worker gave up). Keyset
-- paging on (queued_at, id) after ($3, $4), from the start when $3 is NULL: a row mark_queued skipped (a
-- worker holds it) keeps its queued_at and is not seen again in this sweep.
SELECT id, correlation_id, generation, queued_at
  FROM outbox_relay.outbox
 WHERE status = 'queued' AND queued_at < $1
   AND ($3::timestamptz IS NULL OR queued_at > $3 OR (queued_at = $3 AND id > $4))
 ORDER BY queued_at, id
 LIMIT $2;

-- name: take_lease
-- Leadership (relay/leadership.py). Run by the relay holding the leadership
-- lock, which proves no other relay's listening session is alive: the lease is
-- taken whatever its expiry, under the next epoch.
UPDATE outbox_relay.relay_lease
   SET holder = $1, epoch = epoch + 1, expires_at = now() + make_interval(secs => $2::float8)
 WHERE singleton
RETURNING epoch;

-- name: renew_lease
-- Extends the lease of holder $1, epoch $2 by $3 seconds; no row when it has
-- expired or another relay holds it (then this relay has lost its leadership).
UPDATE outbox_relay.relay_lease
   SET expires_at = now() + make_interval(secs => $3::float8)
 WHERE singleton AND holder = $1 AND epoch = $2 AND expires_at > now()
RETURNING epoch;

-- name: lease_state
SELECT holder, epoch, expires_at, expires_at > now() AS valid
  FROM outbox_relay.relay_lease
 WHERE singleton;

-- name: requeue_stale_ids
-- `requeue --correlation-id` of a row `queued` for longer than $2 seconds (the
-- queue lost it, or holds something else under its job id): back to `new`
-- under a new generation, so it gets a new job id whatever the queue holds.
-- A row a worker holds right now is left alone (it is being run).
WITH target AS (
    SELECT id
      FROM outbox_relay.outbox
     WHERE correlation_id = ANY($1::text[]) AND status = 'queued'
       AND queued_at < now() - make_interval(secs => $2::float8)
       FOR UPDATE SKIP LOCKED
)
UPDATE outbox_relay.outbox AS o
   SET status = 'new', queued_at = NULL, generation = o.generation + 1
  FROM target AS t
 WHERE o.id = t.id
RETURNING o.correlation_id;

-- name: kinds_of
-- The kind of each row (no lock): which rows a handler applies in a transaction and
-- which a sink delivers outside one.
SELECT id, kind FROM outbox_relay.outbox WHERE id = ANY($1::bigint[]);

-- name: claim_deliveries
-- Claim rows to deliver: a fresh token and a deadline ($2 seconds), for every row
-- still pending whose earlier claim (if any) has expired. A short transaction of
-- its own: nothing stays locked while the sink is called.
UPDATE outbox_relay.outbox
   SET claim_token = nextval('outbox_relay.claim_tokens'),
       claimed_until = clock_timestamp() + make_interval(secs => $2)
 WHERE id = ANY($1::bigint[])
   AND status IN ('new', 'queued')
   AND (claimed_until IS NULL OR claimed_until < clock_timestamp())
RETURNING id, correlation_id, kind, outcome, payload, created_at, status, attempts, generation,
          claim_token;

-- name: unclaimed_states
-- Why rows were not claimed: gone, ended, or claimed by another worker until when.
SELECT id, kind, status,
       extract(epoch FROM claimed_until - clock_timestamp())::float8 AS claimed_for
  FROM outbox_relay.outbox
 WHERE id = ANY($1::bigint[]);

-- name: finish_claimed
-- Finish delivered rows whose claim is still theirs (the token unchanged): a row
-- another worker has claimed since is left to it.
UPDATE outbox_relay.outbox AS o
   SET {finished_columns}, claim_token = NULL, claimed_until = NULL
  FROM unnest($1::bigint[], $2::bigint[]) AS c(id, token)
 WHERE o.id = c.id AND o.claim_token = c.token AND o.status IN ('new', 'queued')
RETURNING o.id, o.kind, extract(epoch FROM o.finished_at - o.created_at)::float8 AS commit_to_finish;

-- name: release_claim
-- Give a claimed row back untouched (put off, or handed back to another worker).
UPDATE outbox_relay.outbox SET claim_token = NULL, claimed_until = NULL
 WHERE id = $1 AND claim_token = $2;

-- name: heartbeat_worker
INSERT INTO outbox_relay.workers (worker, routes, kinds, seen_at)
VALUES ($1, $2::text[], $3::text[], now())
ON CONFLICT (worker) DO UPDATE SET routes = excluded.routes, kinds = excluded.kinds, seen_at = now();

-- name: forget_worker
DELETE FROM outbox_relay.workers WHERE worker = $1;

-- name: live_worker_routes
-- What the workers seen within $1 seconds route (their ROUTES patterns and their kinds).
SELECT worker, routes, kinds FROM outbox_relay.workers WHERE seen_at > now() - make_interval(secs => $1);
