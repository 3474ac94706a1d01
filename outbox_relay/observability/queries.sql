-- Queries of the active relay's gauge refresh (outbox_relay.observability.refresh).
-- Each pending-status count walks only its partial index: the cost follows the
-- pending rows, never the finished ones.

-- name: pending_counts
SELECT (SELECT count(*) FROM outbox_relay.outbox WHERE status = 'new')    AS new,
       (SELECT count(*) FROM outbox_relay.outbox WHERE status = 'queued') AS queued,
       (SELECT count(*) FROM outbox_relay.outbox WHERE status = 'failed') AS failed;

-- name: subscription_health
-- This database's subscription to the outbox publication (whatever its name):
-- its name, enabled, seconds since the apply worker last reported to the primary (NULL
-- when no apply worker runs), apply and sync error counts, and its slot.
SELECT s.subname::text AS name,
       s.subenabled AS enabled,
       s.subslotname::text AS slot,
       extract(epoch FROM now() - st.latest_end_time)::float8 AS lag_seconds,
       coalesce(ss.apply_error_count, 0) AS apply_errors,
       coalesce(ss.sync_error_count, 0) AS sync_errors
  FROM pg_catalog.pg_subscription s
  LEFT JOIN pg_catalog.pg_stat_subscription st ON st.subid = s.oid AND st.relid IS NULL
  LEFT JOIN pg_catalog.pg_stat_subscription_stats ss ON ss.subid = s.oid
 WHERE 'outbox_relay' = ANY (s.subpublications)
   AND s.subdbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
 ORDER BY s.subname
 LIMIT 1;

-- name: slot_lag_bytes
-- On the primary: WAL the slot has not confirmed yet.
SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8
  FROM pg_catalog.pg_replication_slots
 WHERE slot_name = $1;
