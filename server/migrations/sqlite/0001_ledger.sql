-- The ledger (SPEC §3). Timestamps are RFC 3339 text in UTC with microsecond precision;
-- metadata is a JSON object stored as text.
CREATE TABLE credit_accounts (
    user_id    TEXT    NOT NULL PRIMARY KEY,
    balance    INTEGER NOT NULL CHECK (balance >= 0),
    version    INTEGER NOT NULL CHECK (version >= 0),
    updated_at TEXT
);

CREATE TABLE credit_transactions (
    id              TEXT    NOT NULL PRIMARY KEY,
    user_id         TEXT    NOT NULL REFERENCES credit_accounts (user_id),
    amount          INTEGER NOT NULL CHECK (amount <> 0),
    type            TEXT    NOT NULL,
    metadata        TEXT    NOT NULL,
    idempotency_key TEXT,
    balance_after   INTEGER NOT NULL CHECK (balance_after >= 0),
    version         INTEGER NOT NULL,
    created_at      TEXT    NOT NULL,
    UNIQUE (user_id, version)
);

CREATE UNIQUE INDEX credit_transactions_idempotency
    ON credit_transactions (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
