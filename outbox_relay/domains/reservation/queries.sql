-- The reservation domain's queries, by name (loaded by handler.py).

-- name: burn_reservation
UPDATE ledger.reservations
   SET state = 'burned', settled_at = now()
 WHERE correlation_id = $1 AND state = 'reserved';

-- name: reclaim_reservation
WITH settled AS (
    UPDATE ledger.reservations
       SET state = 'reclaimed', settled_at = now()
     WHERE correlation_id = $1 AND state = 'reserved'
    RETURNING account_id, amount
)
UPDATE ledger.accounts AS a
   SET balance = a.balance + settled.amount
  FROM settled
 WHERE a.id = settled.account_id;

-- name: reservation_state
SELECT state FROM ledger.reservations WHERE correlation_id = $1;

-- name: fast_path_ctes
-- The effect of the one-statement fast path (see outbox_relay.handlers.FastPath):
-- lock the reservation of each well-formed claimed row (skipping one another
-- transaction holds: that row takes the general path alone, so a held
-- reservation never holds up the rest of a batch), settle it if it is
-- still reserved (burn, or reclaim with the refund). Refunds are summed per
-- account (an UPDATE ... FROM updates a target row once, whatever it joins),
-- and the accounts locked in id order first, as the reservations are.
reservation_rows AS (
    SELECT c.id, r.correlation_id, r.state,
           CASE c.outcome WHEN 'success' THEN 'burned' ELSE 'reclaimed' END AS new_state
      FROM claimed AS c
      JOIN ledger.reservations AS r ON r.correlation_id = c.correlation_id
     WHERE c.kind = 'reservation'
       AND c.outcome IN ('success', 'failure')
       AND jsonb_typeof(c.payload) = 'object'
     ORDER BY r.correlation_id
       FOR UPDATE OF r SKIP LOCKED
), reservation_settled AS (
    UPDATE ledger.reservations AS r
       SET state = x.new_state, settled_at = now()
      FROM reservation_rows AS x
     WHERE r.correlation_id = x.correlation_id AND x.state = 'reserved'
    RETURNING r.account_id, r.amount, r.state
), reservation_accounts AS (
    -- The refunded accounts, locked in id order (the sort comes before the
    -- lock): concurrent batches refunding to the same accounts queue up
    -- instead of deadlocking.
    SELECT a.id, s.amount
      FROM ledger.accounts AS a
      JOIN (SELECT account_id, sum(amount) AS amount
              FROM reservation_settled
             WHERE state = 'reclaimed'
             GROUP BY account_id) AS s ON s.account_id = a.id
     ORDER BY a.id
       FOR UPDATE OF a
), reservation_refunded AS (
    UPDATE ledger.accounts AS a
       SET balance = a.balance + l.amount
      FROM reservation_accounts AS l
     WHERE a.id = l.id
    RETURNING a.id
)

-- name: fast_path_applied
-- Every claimed row whose reservation exists is settled now (or was before).
SELECT id FROM reservation_rows
