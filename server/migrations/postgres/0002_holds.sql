-- Holds (SPEC §12). `held` on the account is the sum of its active holds, kept with the
-- balance so that `available` is read under the same row lock. A hold row keeps the
-- balance, held amount and version its placing and its closing left, so a retried
-- operation answers with exactly the event it caused.
-- Each ledger row keeps the account's `held` after it, so a replayed change answers the
-- very event it caused.
ALTER TABLE credit_transactions ADD COLUMN held_after BIGINT NOT NULL DEFAULT 0;
ALTER TABLE credit_accounts ADD COLUMN held BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0);

CREATE TABLE credit_holds (
    id              TEXT        NOT NULL PRIMARY KEY,
    user_id         TEXT        NOT NULL REFERENCES credit_accounts (user_id),
    amount          BIGINT      NOT NULL CHECK (amount > 0),
    captured        BIGINT      NOT NULL CHECK (captured >= 0 AND captured <= amount),
    status          TEXT        NOT NULL CHECK (status IN ('held', 'captured', 'released', 'expired')),
    metadata        TEXT        NOT NULL,
    idempotency_key TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    expires_at      TIMESTAMPTZ NOT NULL,
    version         BIGINT      NOT NULL,
    balance         BIGINT      NOT NULL,
    held            BIGINT      NOT NULL,
    closed_at       TIMESTAMPTZ,
    closed_version  BIGINT,
    closed_balance  BIGINT,
    closed_held     BIGINT,
    capture_id      TEXT
);

CREATE UNIQUE INDEX credit_holds_idempotency
    ON credit_holds (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Only active holds are indexed, so neither the sweep nor the listing slows down as closed
-- holds accumulate.
CREATE INDEX credit_holds_due ON credit_holds (expires_at) WHERE status = 'held';
CREATE INDEX credit_holds_active ON credit_holds (user_id) WHERE status = 'held';
