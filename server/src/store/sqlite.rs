//! The SQLite backend: one file in WAL mode, one writer connection (SQLite admits one writer
//! at a time, so queueing in the pool beats spinning on the busy lock) and a few readers.

use std::{path::Path, str::FromStr, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::{
    Sqlite, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use crate::owner_only;

use super::{
    AccountRow, KeyedRow, LedgerRow, NamedAccountRow, StoreError,
    ledger::{AccountState, Entry, LedgerTx},
};

/// How long a writer waits for another process's write lock before giving up (→ 503).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent readers; WAL lets them run beside the writer.
const READERS: u32 = 4;
/// Group-commit writers: SQLite has one writer connection.
pub(super) const WRITERS: usize = 1;

#[derive(Clone, Debug)]
pub(super) struct Db {
    reader: SqlitePool,
    writer: SqlitePool,
}

impl Db {
    pub(super) async fn connect(url: &str) -> Result<Self, StoreError> {
        // NORMAL is durable across process crashes in WAL mode; a power loss may drop the
        // last commits. See docs/LEDGER.md.
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let file = options.get_filename();
        if file != Path::new(":memory:") {
            let create = |file: &Path| {
                if let Some(dir) = file.parent().filter(|dir| !dir.as_os_str().is_empty()) {
                    owner_only::create_dir(dir)?;
                }
                owner_only::touch(file)
            };
            create(file).map_err(|err| StoreError::Unavailable(Arc::new(err.into())))?;
        }
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&writer)
            .await
            .map_err(|err| StoreError::Migrate(Arc::new(err)))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self { reader, writer })
    }

    /// A write transaction that holds SQLite's write lock from its first statement, so two
    /// processes on one file cannot deadlock upgrading read locks.
    pub(super) async fn begin_write(
        &self,
    ) -> Result<sqlx::Transaction<'static, Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }

    pub(super) async fn account(&self, user_id: &str) -> Result<Option<AccountRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT balance, version, updated_at FROM credit_accounts WHERE user_id = ?",
        )
        .bind(user_id)
        .fetch_optional(&self.reader)
        .await?)
    }

    pub(super) async fn accounts(
        &self,
        user_ids: &[String],
    ) -> Result<Vec<NamedAccountRow>, StoreError> {
        // One statement for any number of ids: the list travels as a JSON array.
        Ok(sqlx::query_as(
            "SELECT user_id, balance, version, updated_at FROM credit_accounts \
             WHERE user_id IN (SELECT value FROM json_each(?))",
        )
        .bind(json(user_ids)?)
        .fetch_all(&self.reader)
        .await?)
    }

    pub(super) async fn transactions(
        &self,
        user_id: &str,
        limit: u32,
        before: i64,
    ) -> Result<Vec<LedgerRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, amount, type, metadata, balance_after, version, created_at \
             FROM credit_transactions WHERE user_id = ? AND version < ? \
             ORDER BY version DESC LIMIT ?",
        )
        .bind(user_id)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?)
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }
}

impl LedgerTx for sqlx::Transaction<'_, Sqlite> {
    // Lists travel as one JSON array bound to one parameter, so each step is one prepared
    // statement whatever the batch size.

    async fn lock_accounts(
        &mut self,
        user_ids: &[&str],
    ) -> Result<Vec<(String, i64, i64)>, sqlx::Error> {
        // BEGIN IMMEDIATE already holds the database's write lock; this creates the missing
        // accounts and reads them all back as one JSON row: one handoff to the SQLite thread.
        let accounts: String = sqlx::query_scalar(
            "INSERT INTO credit_accounts (user_id, balance, version) \
             SELECT value, 0, 0 FROM json_each(?1) WHERE true ON CONFLICT (user_id) DO NOTHING; \
             SELECT json_group_array(json_array(user_id, balance, version)) \
             FROM credit_accounts WHERE user_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(json(user_ids)?)
        .fetch_one(&mut **self)
        .await?;
        serde_json::from_str(&accounts).map_err(|err| sqlx::Error::Decode(err.into()))
    }

    async fn find_by_keys(&mut self, keys: &[(&str, &str)]) -> Result<Vec<KeyedRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT t.user_id, t.idempotency_key, t.id, t.amount, t.type, t.metadata, \
             t.balance_after, t.version, t.created_at \
             FROM json_each(?) AS k JOIN credit_transactions AS t \
             ON t.user_id = k.value ->> 0 AND t.idempotency_key = k.value ->> 1 \
             WHERE t.idempotency_key IS NOT NULL",
        )
        .bind(json(keys)?)
        .fetch_all(&mut **self)
        .await
    }

    async fn append(
        &mut self,
        entries: &[Entry<'_>],
        accounts: &[AccountState<'_>],
        abandoned: &[&str],
        at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        let rows: Vec<_> = entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "id": e.row.id,
                    "user_id": e.user_id,
                    "amount": e.row.amount,
                    "type": e.row.kind,
                    "metadata": e.metadata,
                    "key": e.key,
                    "balance_after": e.row.balance_after,
                    "version": e.row.version,
                })
            })
            .collect();
        let states: Vec<_> = accounts
            .iter()
            .map(|a| (a.user_id, a.balance, a.version))
            .collect();
        // Both statements in one query: one handoff to the SQLite thread.
        sqlx::query(
            "INSERT INTO credit_transactions \
             (id, user_id, amount, type, metadata, idempotency_key, balance_after, version, created_at) \
             SELECT value ->> 'id', value ->> 'user_id', value ->> 'amount', value ->> 'type', \
             value ->> 'metadata', value ->> 'key', value ->> 'balance_after', \
             value ->> 'version', ?3 \
             FROM json_each(?1); \
             UPDATE credit_accounts \
             SET balance = a.value ->> 1, version = a.value ->> 2, updated_at = ?3 \
             FROM json_each(?2) AS a WHERE credit_accounts.user_id = a.value ->> 0",
        )
        .bind(json(&rows)?)
        .bind(json(&states)?)
        .bind(at)
        .execute(&mut **self)
        .await?;
        // A statement of its own, and only when needed (rare): sqlx fills a statement's
        // unused lower-numbered parameters from the arguments in turn, so a third statement
        // would never see a fourth argument.
        if !abandoned.is_empty() {
            sqlx::query(
                "DELETE FROM credit_accounts \
                 WHERE version = 0 AND user_id IN (SELECT value FROM json_each(?1))",
            )
            .bind(json(abandoned)?)
            .execute(&mut **self)
            .await?;
        }
        Ok(())
    }

    async fn commit(self) -> Result<(), sqlx::Error> {
        sqlx::Transaction::commit(self).await
    }
}

fn json(value: &(impl serde::Serialize + ?Sized)) -> Result<String, sqlx::Error> {
    serde_json::to_string(value).map_err(|err| sqlx::Error::Encode(err.into()))
}
