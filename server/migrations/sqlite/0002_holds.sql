-- Holds (SPEC §12). `held` on the account is the sum of its active holds, kept with the
-- balance so that `available` is read under the same lock. A hold row keeps the balance,
-- held amount and version its placing and its closing left, so a retried operation answers
-- with exactly the event it caused. Timestamps are fixed-width RFC 3339 text (microseconds,
-- `Z`), so comparing them as text orders them in time.
-- Each ledger row keeps the account's `held` after it, so a replayed change answers the
-- very event it caused.
ALTER TABLE credit_transactions ADD COLUMN held_after INTEGER NOT NULL DEFAULT 0;
ALTER TABLE credit_accounts ADD COLUMN held INTEGER NOT NULL DEFAULT 0 CHECK (held >= 0);

CREATE TABLE credit_holds (
    id              TEXT    NOT NULL PRIMARY KEY,
    user_id         TEXT    NOT NULL REFERENCES credit_accounts (user_id),
    amount          INTEGER NOT NULL CHECK (amount > 0),
    captured        INTEGER NOT NULL CHECK (captured >= 0 AND captured <= amount),
    status          TEXT    NOT NULL CHECK (status IN ('held', 'captured', 'released', 'expired')),
    metadata        TEXT    NOT NULL,
    idempotency_key TEXT,
    created_at      TEXT    NOT NULL,
    expires_at      TEXT    NOT NULL,
    version         INTEGER NOT NULL,
    balance         INTEGER NOT NULL,
    held            INTEGER NOT NULL,
    closed_at       TEXT,
    closed_version  INTEGER,
    closed_balance  INTEGER,
    closed_held     INTEGER,
    capture_id      TEXT
);

CREATE UNIQUE INDEX credit_holds_idempotency
    ON credit_holds (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Only active holds are indexed, so neither the sweep nor the listing slows down as closed
-- holds accumulate.
CREATE INDEX credit_holds_due ON credit_holds (expires_at) WHERE status = 'held';
CREATE INDEX credit_holds_active ON credit_holds (user_id) WHERE status = 'held';
