-- Deliveries outside transactions (contract section 5.9). A row routed to a
-- sink is claimed in a short transaction (a token from a sequence and a
-- deadline), delivered with no transaction open, and finished in another short
-- transaction that lands only while the token is still the row's: a worker
-- that froze or vanished mid-delivery holds no lock, and once its claim has
-- expired another worker claims the row (a new token) and delivers it again
-- under the same delivery id.
ALTER TABLE outbox_relay.outbox ADD COLUMN IF NOT EXISTS claim_token bigint;
ALTER TABLE outbox_relay.outbox ADD COLUMN IF NOT EXISTS claimed_until timestamptz;
CREATE SEQUENCE IF NOT EXISTS outbox_relay.claim_tokens;

-- The live workers and what each routes (ROUTES patterns and its own kinds), so that
-- during a rolling change of ROUTES a worker without a route hands a row back to
-- the others instead of failing it, and `doctor` names kinds no live worker routes.
CREATE TABLE IF NOT EXISTS outbox_relay.workers (
    worker   text        PRIMARY KEY,
    routes   text[]      NOT NULL,
    kinds    text[]      NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT now()
);

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_relay_worker') THEN
        GRANT UPDATE (claim_token, claimed_until) ON outbox_relay.outbox TO outbox_relay_worker;
        GRANT USAGE ON SEQUENCE outbox_relay.claim_tokens TO outbox_relay_worker;
        GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_relay.workers TO outbox_relay_worker;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_relay_relay') THEN
        GRANT SELECT ON outbox_relay.workers TO outbox_relay_relay;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_relay_operator') THEN
        GRANT SELECT ON outbox_relay.workers TO outbox_relay_operator;
    END IF;
END
$$;
