-- The queries of `doctor` (outbox_relay/doctor.py), by name. Read-only, each
-- cheap: catalogs, statistics views, and the outbox's partial indexes only.
-- Columns that differ between PostgreSQL releases are read through
-- to_jsonb(row), so one query serves 15 to 18 (never a row of pg_subscription:
-- see subscriptions). Every query runs as the outbox_relay_operator role.

-- name: server
SELECT current_setting('server_version_num')::int AS version_num,
       current_setting('server_version') AS version,
       current_database()::text AS database;

-- name: clock
-- The server's clock now (not the transaction's start), seconds since the epoch.
SELECT extract(epoch FROM clock_timestamp())::float8;

-- name: notify_trigger
-- tgenabled: 'O' origin/local only, 'A' always, 'R' replica only, 'D' disabled.
SELECT t.tgenabled::text AS enabled
  FROM pg_trigger t
 WHERE t.tgrelid = to_regclass('outbox_relay.outbox')
   AND t.tgname = 'outbox_notify'
   AND NOT t.tgisinternal;

-- name: subscriptions
-- This database's subscriptions to the outbox publication, or the one named $1.
-- Only columns PostgreSQL grants to PUBLIC (every one but subconninfo, which
-- holds a password): never to_jsonb(s) or s.*, which read subconninfo too and
-- are refused to the operator role. substream is boolean on 15, 'f'/'t'/'p' on 16+.
SELECT s.oid::bigint AS oid, s.subname::text AS name, s.subenabled AS enabled,
       s.subslotname::text AS slot, s.substream::text AS streaming
  FROM pg_subscription s
 WHERE s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND (s.subname = $1 OR ($1 IS NULL AND 'outbox_relay' = ANY (s.subpublications)))
 ORDER BY s.subname;

-- name: apply_worker
-- The subscription's leader apply worker (no table, no leader of its own),
-- and how long ago it last heard from the primary.
SELECT st.pid,
       extract(epoch FROM now() - st.last_msg_receipt_time)::float8 AS receipt_age,
       extract(epoch FROM now() - st.latest_end_time)::float8 AS lag_seconds
  FROM pg_stat_subscription st
 WHERE st.subid = $1::bigint::oid
   AND st.relid IS NULL
   AND to_jsonb(st) ->> 'leader_pid' IS NULL
 ORDER BY st.pid NULLS LAST
 LIMIT 1;

-- name: subscription_errors
-- PostgreSQL 15 and later; cumulative until pg_stat_reset_subscription_stats.
SELECT apply_error_count::bigint AS apply_errors, sync_error_count::bigint AS sync_errors
  FROM pg_stat_subscription_stats
 WHERE subid = $1::bigint::oid;

-- name: subscription_tables
-- srsubstate: i initialize, d data copy, f finished copy, s synchronized, r ready.
SELECT r.srrelid::regclass::text AS relation, r.srsubstate::text AS state
  FROM pg_subscription_rel r
 WHERE r.srsubid = $1::bigint::oid
 ORDER BY 1;

-- name: wal_level
SELECT current_setting('wal_level') AS wal_level,
       current_setting('server_version_num')::int AS version_num,
       current_setting('max_slot_wal_keep_size') AS max_slot_wal_keep_size,
       (SELECT setting FROM pg_settings WHERE name = 'idle_replication_slot_timeout')
           AS idle_replication_slot_timeout;

-- name: publication
SELECT p.pubinsert AS ins, p.pubupdate AS upd, p.pubdelete AS del, p.pubtruncate AS trunc,
       p.puballtables AS all_tables,
       EXISTS (SELECT 1 FROM pg_publication_tables pt
                WHERE pt.pubname = p.pubname
                  AND pt.schemaname = 'outbox_relay' AND pt.tablename = 'outbox') AS has_outbox
  FROM pg_publication p
 WHERE p.pubname = 'outbox_relay';

-- name: slot
SELECT s.active, s.wal_status::text AS wal_status, s.database::text AS database,
       (pg_current_wal_lsn() - s.confirmed_flush_lsn)::bigint AS lag_bytes
  FROM pg_replication_slots s
 WHERE s.slot_name = $1;

-- name: relay_lock_holders
-- Sessions holding the relay's leadership lock (queries.sql: try_relay_lock):
-- a two-int4 advisory lock shows its first key in classid (as an oid), the
-- second in objid, and objsubid = 2.
SELECT l.pid, a.application_name::text AS application_name,
       extract(epoch FROM now() - a.backend_start)::float8 AS session_age,
       a.client_addr::text AS client_addr
  FROM pg_locks l
  LEFT JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid = (hashtext('outbox_relay')::bigint & 4294967295)::text::oid
   AND l.objid = 1 AND l.objsubid = 2
 ORDER BY l.pid;

-- name: relay_lease_exists
SELECT to_regclass('outbox_relay.relay_lease') IS NOT NULL;

-- name: relay_lease
-- Only run when the lease table exists (a later service migration adds it).
-- expires_in is NULL for a lease never taken ('-infinity': PostgreSQL before 16
-- cannot subtract an infinite timestamp, and later ones would say "expired inf ago").
SELECT holder::text AS holder, epoch::bigint AS epoch,
       CASE WHEN isfinite(expires_at) THEN extract(epoch FROM expires_at - now())::float8 END
           AS expires_in
  FROM outbox_relay.relay_lease
 LIMIT 1;

-- name: worker_sessions
SELECT count(*)::int
  FROM pg_stat_activity
 WHERE datname = current_database() AND application_name = 'outbox_relay.worker';

-- name: failed_count
SELECT count(*)::bigint FROM outbox_relay.outbox WHERE status = 'failed';

-- name: notification_queue
SELECT pg_notification_queue_usage()::float8;

-- name: outbox_tuples
SELECT n_live_tup::bigint AS live, n_dead_tup::bigint AS dead,
       extract(epoch FROM now() - greatest(last_vacuum, last_autovacuum))::float8 AS vacuumed_ago
  FROM pg_stat_user_tables
 WHERE relid = to_regclass('outbox_relay.outbox');

-- name: oldest_xmin
-- The session of this database whose snapshot is oldest: it holds back what
-- VACUUM may remove (the outbox's dead tuples among it).
SELECT a.pid, a.application_name::text AS application_name, a.state::text AS state,
       age(a.backend_xmin)::bigint AS xmin_age,
       extract(epoch FROM now() - a.xact_start)::float8 AS xact_seconds
  FROM pg_stat_activity a
 WHERE a.datname = current_database() AND a.backend_xmin IS NOT NULL AND a.pid <> pg_backend_pid()
 ORDER BY age(a.backend_xmin) DESC
 LIMIT 1;

-- name: recent_kinds
-- The kinds of the newest rows (a bounded look, never a scan of the whole table).
SELECT DISTINCT kind FROM (SELECT kind FROM outbox_relay.outbox ORDER BY id DESC LIMIT 10000) AS newest
 ORDER BY kind;

-- name: pending_kinds
-- The kinds of pending rows, with how many (the oldest 10,000 pending rows looked at).
SELECT kind, count(*) AS rows FROM (
    SELECT kind FROM outbox_relay.outbox WHERE status IN ('new', 'queued') ORDER BY id LIMIT 10000
) AS pending GROUP BY kind ORDER BY kind;

-- name: live_workers
-- What the workers seen in the last 30 s route and handle (outbox_relay.workers).
SELECT routes, kinds FROM outbox_relay.workers WHERE seen_at > now() - interval '30 seconds';

-- name: failover_facts
-- What the primary shows of its physical standbys' readiness to take the
-- subscription's slot ($1) over after a failover. Readable by any role: slots
-- and settings are public, and pg_stat_activity shows every session's
-- application_name (a standby's slot sync worker: '[<cluster_name>_]slotsync worker').
-- 17+ columns and settings through to_jsonb / missing_ok, so one query serves 15 to 18.
SELECT current_setting('server_version_num')::int AS version_num,
       coalesce(current_setting('synchronized_standby_slots', true), '') AS synchronized_standby_slots,
       (SELECT (to_jsonb(s) ->> 'failover')::boolean
          FROM pg_replication_slots s WHERE s.slot_name = $1) AS slot_failover,
       (SELECT count(*) FROM pg_stat_activity
         WHERE application_name LIKE '%slotsync worker')::int AS slotsync_sessions,
       coalesce((SELECT jsonb_agg(jsonb_build_object('name', s.slot_name, 'active', s.active,
                                                    'feedback', s.xmin IS NOT NULL
                                                                OR s.catalog_xmin IS NOT NULL)
                                  ORDER BY s.slot_name)
                   FROM pg_replication_slots s WHERE s.slot_type = 'physical'), '[]')::text AS standbys;
