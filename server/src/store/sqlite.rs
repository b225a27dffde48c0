//! The SQLite backend: one file in WAL mode, one writer connection (SQLite admits one writer
//! at a time, so queueing in the pool beats spinning on the busy lock) and a few readers.

use std::{str::FromStr, time::Duration};

use app::wire::Transaction;
use sqlx::{
    Sqlite, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use super::{AccountRow, LedgerRow, NamedAccountRow, StoreError, ledger::LedgerTx};

/// How long a writer waits for another process's write lock before giving up (→ 503).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent readers; WAL lets them run beside the writer.
const READERS: u32 = 4;

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
        if let Some(dir) = options.get_filename().parent() {
            std::fs::create_dir_all(dir).map_err(|err| StoreError::Unavailable(err.into()))?;
        }
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&writer)
            .await
            .map_err(StoreError::Migrate)?;
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
        let ids =
            serde_json::to_string(user_ids).map_err(|err| StoreError::Corrupt(err.to_string()))?;
        Ok(sqlx::query_as(
            "SELECT user_id, balance, version, updated_at FROM credit_accounts \
             WHERE user_id IN (SELECT value FROM json_each(?))",
        )
        .bind(ids)
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
    async fn lock_account(&mut self, user_id: &str) -> Result<(i64, i64), sqlx::Error> {
        // BEGIN IMMEDIATE already holds the database's write lock.
        sqlx::query_as(
            "INSERT INTO credit_accounts (user_id, balance, version) VALUES (?, 0, 0) \
             ON CONFLICT (user_id) DO UPDATE SET version = version \
             RETURNING balance, version",
        )
        .bind(user_id)
        .fetch_one(&mut **self)
        .await
    }

    async fn find_by_key(
        &mut self,
        user_id: &str,
        key: &str,
    ) -> Result<Option<LedgerRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT id, amount, type, metadata, balance_after, version, created_at \
             FROM credit_transactions WHERE user_id = ? AND idempotency_key = ?",
        )
        .bind(user_id)
        .bind(key)
        .fetch_optional(&mut **self)
        .await
    }

    async fn append(
        &mut self,
        user_id: &str,
        row: &Transaction,
        metadata: &str,
        key: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO credit_transactions \
             (id, user_id, amount, type, metadata, idempotency_key, balance_after, version, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&row.id)
        .bind(user_id)
        .bind(row.amount)
        .bind(&row.kind)
        .bind(metadata)
        .bind(key)
        .bind(row.balance_after)
        .bind(row.version)
        .bind(row.created_at)
        .execute(&mut **self)
        .await?;
        sqlx::query(
            "UPDATE credit_accounts SET balance = ?, version = ?, updated_at = ? WHERE user_id = ?",
        )
        .bind(row.balance_after)
        .bind(row.version)
        .bind(row.created_at)
        .bind(user_id)
        .execute(&mut **self)
        .await?;
        Ok(())
    }

    async fn commit(self) -> Result<(), sqlx::Error> {
        sqlx::Transaction::commit(self).await
    }
}
