-- The ledger (SPEC §3). Metadata is kept as the JSON text the API accepted, like on SQLite.
CREATE TABLE credit_accounts (
    user_id    TEXT        NOT NULL PRIMARY KEY,
    balance    BIGINT      NOT NULL CHECK (balance >= 0),
    version    BIGINT      NOT NULL CHECK (version >= 0),
    updated_at TIMESTAMPTZ
);

CREATE TABLE credit_transactions (
    id              TEXT        NOT NULL PRIMARY KEY,
    user_id         TEXT        NOT NULL REFERENCES credit_accounts (user_id),
    amount          BIGINT      NOT NULL CHECK (amount <> 0),
    type            TEXT        NOT NULL,
    metadata        TEXT        NOT NULL,
    idempotency_key TEXT,
    balance_after   BIGINT      NOT NULL CHECK (balance_after >= 0),
    version         BIGINT      NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    UNIQUE (user_id, version)
);

CREATE UNIQUE INDEX credit_transactions_idempotency
    ON credit_transactions (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
