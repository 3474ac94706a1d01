-- The bench's own SQL: scratch databases, the ledger's workload, and what each scenario measures.
-- Loaded by bench/sql.py (outbox_relay.sql.QueryFile): each block runs from its `-- name:` line.

-- name: create_database
CREATE DATABASE {database}

-- name: drop_database
DROP DATABASE IF EXISTS {database} WITH (FORCE)

-- name: insert_success_row
-- The commit-rate anchor: one outbox row, its own commit (the notify trigger fires).
INSERT INTO outbox_relay.outbox (correlation_id, outcome) VALUES ($1, 'success')

-- name: insert_row
INSERT INTO outbox_relay.outbox (correlation_id, outcome) VALUES ($1, $2)

-- name: insert_rows
-- A chunk of the replicated backlog, one statement.
INSERT INTO outbox_relay.outbox (correlation_id, outcome) SELECT unnest($1::text[]), 'success'

-- name: count_rows
SELECT count(*) FROM outbox_relay.outbox WHERE correlation_id = ANY($1::text[])

-- name: count_ended
SELECT count(*) FROM outbox_relay.outbox
 WHERE correlation_id = ANY($1::text[]) AND status IN ('finished', 'failed')

-- name: open_accounts
INSERT INTO ledger.accounts (id, balance)
SELECT 'bench-' || n, 9000000000000 FROM generate_series(0, $1 - 1) AS n

-- name: reserve
-- Reservations spread round robin over the accounts ($2 of them).
INSERT INTO ledger.reservations (correlation_id, account_id, amount)
SELECT cid, 'bench-' || ((n - 1) % $2), 10 FROM unnest($1::text[]) WITH ORDINALITY AS u(cid, n)

-- name: charge_reservations
UPDATE ledger.accounts AS a SET balance = a.balance - r.amount
  FROM (SELECT account_id, sum(amount) AS amount FROM ledger.reservations
         WHERE correlation_id = ANY($1::text[]) GROUP BY account_id) AS r
 WHERE a.id = r.account_id

-- name: latency_stats
SELECT count(*) AS n,
       extract(epoch FROM max(finished_at) - min(created_at))::float8 AS span,
       1000 * extract(epoch FROM percentile_cont(0.50)
                      WITHIN GROUP (ORDER BY finished_at - created_at))::float8 AS p50,
       1000 * extract(epoch FROM percentile_cont(0.95)
                      WITHIN GROUP (ORDER BY finished_at - created_at))::float8 AS p95,
       1000 * extract(epoch FROM percentile_cont(0.99)
                      WITHIN GROUP (ORDER BY finished_at - created_at))::float8 AS p99,
       1000 * extract(epoch FROM max(finished_at - created_at))::float8 AS max,
       1000 * extract(epoch FROM percentile_cont(0.50)
                      WITHIN GROUP (ORDER BY queued_at - created_at))::float8 AS p50_queued,
       1000 * extract(epoch FROM percentile_cont(0.99)
                      WITHIN GROUP (ORDER BY queued_at - created_at))::float8 AS p99_queued,
       count(*) FILTER (WHERE status <> 'finished') AS not_finished
  FROM outbox_relay.outbox
 WHERE correlation_id = ANY($1::text[])

-- name: finished_span
SELECT extract(epoch FROM min(finished_at))::float8 AS first,
       extract(epoch FROM max(finished_at))::float8 AS last
  FROM outbox_relay.outbox WHERE correlation_id = ANY($1::text[])

-- name: fill_finished_rows
-- The table-scale check's history: $1 rows finished a day ago.
INSERT INTO outbox_relay.outbox (correlation_id, outcome, status, attempts, finished_at, created_at)
SELECT 'old-' || g, 'success', 'finished', 1, now() - interval '1 day', now() - interval '1 day'
  FROM generate_series(1, $1) AS g

-- name: insert_probes
INSERT INTO outbox_relay.outbox (correlation_id, outcome)
SELECT 'probe-' || g, 'success' FROM generate_series(1, 100) AS g

-- name: vacuum_outbox
VACUUM ANALYZE outbox_relay.outbox

-- name: probe_ids
SELECT id FROM outbox_relay.outbox WHERE correlation_id LIKE 'probe-%'

-- name: explain_buffers
EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}

-- name: explain
EXPLAIN (FORMAT JSON) {statement}

-- name: insert_routed_rows
-- A sink route: $3 rows of kind $2 (routed to the sink), one statement; the range of their ids.
WITH rows AS (
    INSERT INTO outbox_relay.outbox (correlation_id, kind, outcome, payload)
    SELECT $1 || i, $2, 'success', jsonb_build_object('n', i)
      FROM generate_series(1, $3::int) AS i
    RETURNING id
)
SELECT min(id) AS first, max(id) AS last FROM rows

-- name: now_epoch
SELECT extract(epoch FROM clock_timestamp())::float8

-- name: routed_pending
-- Rows of the id range $1..$2 not ended yet; all of them until the range has arrived (the rows
-- were committed in one transaction, so they arrive together with the last one).
SELECT CASE WHEN EXISTS (SELECT 1 FROM outbox_relay.outbox WHERE id = $2)
            THEN (SELECT count(*) FROM outbox_relay.outbox
                   WHERE id BETWEEN $1 AND $2 AND status IN ('new', 'queued'))
            ELSE $2 - $1 + 1 END

-- name: routed_outcome
SELECT count(*) FILTER (WHERE status = 'finished') AS finished,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       extract(epoch FROM min(finished_at))::float8 AS first_finished,
       extract(epoch FROM max(finished_at))::float8 AS last_finished,
       min(last_error) FILTER (WHERE status = 'failed') AS error
  FROM outbox_relay.outbox WHERE id BETWEEN $1 AND $2

-- name: longest_idle_in_transaction
-- The session of databases $1 (other than the pids $2: the bench's own) idle in a transaction the
-- longest, and for how long (seconds).
SELECT extract(epoch FROM clock_timestamp() - state_change)::float8 AS seconds,
       application_name, backend_type, left(query, 200) AS query
  FROM pg_stat_activity
 WHERE state LIKE 'idle in transaction%' AND datname = ANY($1::text[]) AND pid <> ALL($2::int[])
 ORDER BY state_change
 LIMIT 1
