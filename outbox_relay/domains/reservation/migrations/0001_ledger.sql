-- The reservation domain's own schema: two-phase currency reservations.
--
-- Idempotent on purpose: databases made by outbox_relay 0.1.0 already hold
-- this schema (it was part of the core's first service migration); there this
-- migration adopts it unchanged.
CREATE SCHEMA IF NOT EXISTS ledger;

CREATE TABLE IF NOT EXISTS ledger.accounts (
    id      text   PRIMARY KEY,
    balance bigint NOT NULL CHECK (balance >= 0)
);

CREATE TABLE IF NOT EXISTS ledger.reservations (
    correlation_id text        PRIMARY KEY,
    account_id     text        NOT NULL REFERENCES ledger.accounts (id),
    amount         bigint      NOT NULL CHECK (amount > 0),
    state          text        NOT NULL DEFAULT 'reserved'
                               CHECK (state IN ('reserved', 'burned', 'reclaimed')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    settled_at     timestamptz
);

CREATE INDEX IF NOT EXISTS reservations_account_idx ON ledger.reservations (account_id);

-- Take `amount` off the balance and record the reservation, in one statement.
CREATE OR REPLACE FUNCTION ledger.reserve(p_account_id text, p_amount bigint, p_correlation_id text)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION 'reservation amount must be positive, got %', p_amount
            USING ERRCODE = 'check_violation';
    END IF;
    IF EXISTS (SELECT 1 FROM ledger.reservations WHERE correlation_id = p_correlation_id) THEN
        RAISE EXCEPTION 'duplicate reservation %', p_correlation_id
            USING ERRCODE = 'unique_violation';
    END IF;
    UPDATE ledger.accounts SET balance = balance - p_amount
     WHERE id = p_account_id AND balance >= p_amount;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM ledger.accounts WHERE id = p_account_id) THEN
            RAISE EXCEPTION 'insufficient balance on account % to reserve %', p_account_id, p_amount
                USING ERRCODE = 'check_violation';
        END IF;
        RAISE EXCEPTION 'unknown account %', p_account_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    INSERT INTO ledger.reservations (correlation_id, account_id, amount)
    VALUES (p_correlation_id, p_account_id, p_amount);
END
$$;
