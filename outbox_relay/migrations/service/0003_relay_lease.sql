-- The relay's lease: which relay session leads, until when, and its epoch
-- (the fencing token). One row. The active relay holds the leadership lock
-- (a session advisory lock) and this lease: it takes the lease when it takes
-- the lock (the epoch goes up by one), renews it every few seconds, and every
-- write of the relay names its epoch and acts only while the lease is
-- unexpired and still that epoch's. A relay frozen past the lease's expiry
-- (SIGSTOP, a hung host) therefore changes nothing when it resumes: its
-- writes find another epoch, or an expired lease, and it stands by.
CREATE TABLE outbox_relay.relay_lease (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    holder     text,
    epoch      bigint      NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO outbox_relay.relay_lease DEFAULT VALUES;

-- The epoch of the leader that last handed a row to the queue (NULL before
-- this migration and for rows never handed over): what a leader did can be
-- told from what its predecessor did.
ALTER TABLE outbox_relay.outbox ADD COLUMN queued_epoch bigint;
