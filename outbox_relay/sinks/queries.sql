-- The sinks' queries (outbox_relay/sinks/__init__.py), by name.

-- name: delivered_sinks
-- The sinks that have already acknowledged this row (an earlier, partly failed attempt).
SELECT sink FROM outbox_relay_sinks.deliveries WHERE outbox_id = $1;

-- name: record_deliveries
INSERT INTO outbox_relay_sinks.deliveries (outbox_id, sink)
SELECT $1, unnest($2::text[])
ON CONFLICT (outbox_id, sink) DO NOTHING;
