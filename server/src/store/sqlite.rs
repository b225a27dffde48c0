//! The SQLite backend: one file in WAL mode, one writer connection (SQLite admits one writer
//! at a time, so queueing in the pool beats spinning on the busy lock) and a few readers.

use std::{path::Path, str::FromStr, sync::Arc, time::Duration};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use sqlx::{
    Connection, Sqlite, SqliteConnection, SqlitePool,
    pool::PoolConnection,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use crate::owner_only;

use super::{
    AccountRow, KeyedRow, LedgerRow, NamedAccountRow, StoreError,
    hold::{HoldRecord, HoldRow},
    ledger::{AccountState, Entry, LedgerTx, LockedAccount},
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

    /// The one writer connection, for the writer task to keep (see `committer`).
    pub(super) async fn writer(&self) -> Result<PoolConnection<Sqlite>, StoreError> {
        Ok(self.writer.acquire().await?)
    }

    pub(super) async fn account(&self, user_id: &str) -> Result<Option<AccountRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT balance, held, version, updated_at FROM credit_accounts WHERE user_id = ?",
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
            "SELECT user_id, balance, held, version, updated_at FROM credit_accounts \
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

    pub(super) async fn active_holds(
        &self,
        user_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<HoldRow>, StoreError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            hold_columns!(),
            " FROM credit_holds \
             WHERE user_id = ? AND status = 'held' AND expires_at > ? \
             ORDER BY created_at DESC, id DESC"
        ))
        .bind(user_id)
        .bind(stamp(now))
        .fetch_all(&self.reader)
        .await?)
    }

    /// `(hold_id, user_id)` of up to `limit` held holds whose expiry has passed.
    pub(super) async fn due_holds(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, user_id FROM credit_holds WHERE status = 'held' AND expires_at <= ? \
             ORDER BY expires_at LIMIT ?",
        )
        .bind(stamp(now))
        .bind(limit)
        .fetch_all(&self.reader)
        .await?)
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }
}

/// A write transaction that holds SQLite's write lock from its first statement, so two
/// processes on one file cannot deadlock upgrading read locks.
pub(super) async fn begin_write(
    conn: &mut SqliteConnection,
) -> Result<sqlx::Transaction<'_, Sqlite>, sqlx::Error> {
    conn.begin_with("BEGIN IMMEDIATE").await
}

impl LedgerTx for sqlx::Transaction<'_, Sqlite> {
    // Lists travel as one JSON array bound to one parameter, so each step is one prepared
    // statement whatever the batch size. `jsonb_each` where fields are read from each
    // element: it hands the element over parsed, where `json_each` gives text that every
    // `->>` would parse again.

    async fn lock_accounts(
        &mut self,
        user_ids: &[&str],
        hold_ids: &[&str],
    ) -> Result<Vec<LockedAccount>, sqlx::Error> {
        // BEGIN IMMEDIATE already holds the database's write lock; this creates the missing
        // accounts and reads them all back as one JSON row: one handoff to the SQLite thread.
        let accounts: String = sqlx::query_scalar(
            "INSERT INTO credit_accounts (user_id, balance, version) \
             SELECT value, 0, 0 FROM json_each(?1) WHERE true ON CONFLICT (user_id) DO NOTHING; \
             SELECT json_group_array(json_array(user_id, balance, version, held)) \
             FROM credit_accounts WHERE user_id IN (SELECT value FROM json_each(?1) \
                 UNION SELECT user_id FROM credit_holds \
                 WHERE id IN (SELECT value FROM json_each(?2)))",
        )
        .bind(json(user_ids)?)
        .bind(json(hold_ids)?)
        .fetch_one(&mut **self)
        .await?;
        serde_json::from_str(&accounts).map_err(|err| sqlx::Error::Decode(err.into()))
    }

    async fn find_by_keys(&mut self, keys: &[(&str, &str)]) -> Result<Vec<KeyedRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT t.user_id, t.idempotency_key, t.held_after, t.id, t.amount, t.type, \
             t.metadata, t.balance_after, t.version, t.created_at \
             FROM jsonb_each(?) AS k JOIN credit_transactions AS t \
             ON t.user_id = k.value ->> 0 AND t.idempotency_key = k.value ->> 1 \
             WHERE t.idempotency_key IS NOT NULL",
        )
        .bind(json(keys)?)
        .fetch_all(&mut **self)
        .await
    }

    async fn find_holds(
        &mut self,
        ids: &[&str],
        keys: &[(&str, &str)],
    ) -> Result<Vec<HoldRow>, sqlx::Error> {
        sqlx::query_as(concat!(
            "SELECT ",
            hold_columns!(),
            " FROM credit_holds WHERE id IN (SELECT value FROM json_each(?1)) \
             OR id IN (SELECT h.id FROM jsonb_each(?2) AS k JOIN credit_holds AS h \
             ON h.user_id = k.value ->> 0 AND h.idempotency_key = k.value ->> 1)"
        ))
        .bind(json(ids)?)
        .bind(json(keys)?)
        .fetch_all(&mut **self)
        .await
    }

    async fn append(
        &mut self,
        entries: &[Entry<'_>],
        holds: &[&HoldRecord],
        accounts: &[AccountState<'_>],
        abandoned: &[&str],
        at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        // sqlx's own text for a time, as binding `at` would store it.
        let at = at.to_rfc3339_opts(SecondsFormat::AutoSi, false);
        let batch = Batch {
            rows: entries.iter().map(|e| RowJson::new(e, &at)).collect(),
            states: accounts
                .iter()
                .map(|a| (a.user_id, a.balance, a.held, a.version, at.as_str()))
                .collect(),
            holds: holds.iter().map(|h| HoldJson::new(h)).collect(),
            abandoned,
        };
        // Every write of the batch in one query (one handoff to the SQLite thread), all of it
        // in the one parameter ?1: sqlx binds a statement's unnumbered slots below its highest
        // parameter from the arguments in turn, so a later statement using only ?2 could be
        // left without its argument. Each column comes from its element, so no statement
        // reads the whole document once per row.
        sqlx::query(
            "INSERT INTO credit_transactions \
             (id, user_id, amount, type, metadata, idempotency_key, held_after, balance_after, \
             version, created_at) \
             SELECT value ->> 'id', value ->> 'user_id', value ->> 'amount', value ->> 'type', \
             value ->> 'metadata', value ->> 'key', value ->> 'held', value ->> 'balance_after', \
             value ->> 'version', value ->> 'at' \
             FROM jsonb_each(?1, '$.rows'); \
             UPDATE credit_accounts \
             SET balance = a.value ->> 1, held = a.value ->> 2, version = a.value ->> 3, \
             updated_at = a.value ->> 4 \
             FROM jsonb_each(?1, '$.states') AS a WHERE credit_accounts.user_id = a.value ->> 0; \
             INSERT INTO credit_holds (id, user_id, amount, captured, status, metadata, \
             idempotency_key, created_at, expires_at, version, balance, held, closed_at, \
             closed_version, closed_balance, closed_held, capture_id) \
             SELECT value ->> 'id', value ->> 'user_id', value ->> 'amount', \
             value ->> 'captured', value ->> 'status', value ->> 'metadata', value ->> 'key', \
             value ->> 'created_at', value ->> 'expires_at', value ->> 'version', \
             value ->> 'balance', value ->> 'held', value ->> 'closed_at', \
             value ->> 'closed_version', value ->> 'closed_balance', value ->> 'closed_held', \
             value ->> 'capture_id' \
             FROM jsonb_each(?1, '$.holds') WHERE true \
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, \
             captured = excluded.captured, closed_at = excluded.closed_at, \
             closed_version = excluded.closed_version, \
             closed_balance = excluded.closed_balance, closed_held = excluded.closed_held, \
             capture_id = excluded.capture_id; \
             DELETE FROM credit_accounts WHERE version = 0 \
             AND user_id IN (SELECT value FROM json_each(?1, '$.abandoned'))",
        )
        .bind(json(&batch)?)
        .execute(&mut **self)
        .await?;
        Ok(())
    }

    async fn commit(self) -> Result<(), sqlx::Error> {
        sqlx::Transaction::commit(self).await
    }

    async fn rollback(self) -> Result<(), sqlx::Error> {
        sqlx::Transaction::rollback(self).await
    }
}

/// What the append query reads from its one parameter.
#[derive(Serialize)]
struct Batch<'a> {
    rows: Vec<RowJson<'a>>,
    /// `(user_id, balance, held, version, updated_at)`
    states: Vec<(&'a str, i64, i64, i64, &'a str)>,
    holds: Vec<HoldJson<'a>>,
    abandoned: &'a [&'a str],
}

/// A ledger row, by column.
#[derive(Serialize)]
struct RowJson<'a> {
    id: &'a str,
    user_id: &'a str,
    amount: i64,
    #[serde(rename = "type")]
    kind: &'a str,
    metadata: &'a str,
    key: Option<&'a str>,
    held: i64,
    balance_after: i64,
    version: i64,
    at: &'a str,
}

impl<'a> RowJson<'a> {
    fn new(entry: &'a Entry<'_>, at: &'a str) -> Self {
        Self {
            id: &entry.row.id,
            user_id: &entry.user_id,
            amount: entry.row.amount,
            kind: &entry.row.kind,
            metadata: &entry.metadata,
            key: entry.key,
            held: entry.held,
            balance_after: entry.row.balance_after,
            version: entry.row.version,
            at,
        }
    }
}

/// A hold row, by column.
#[derive(Serialize)]
struct HoldJson<'a> {
    id: &'a str,
    user_id: &'a str,
    amount: i64,
    captured: i64,
    status: &'static str,
    metadata: &'a str,
    key: Option<&'a str>,
    created_at: String,
    expires_at: String,
    version: i64,
    balance: i64,
    held: i64,
    closed_at: Option<String>,
    closed_version: Option<i64>,
    closed_balance: Option<i64>,
    closed_held: Option<i64>,
    capture_id: Option<&'a str>,
}

impl<'a> HoldJson<'a> {
    fn new(record: &'a HoldRecord) -> Self {
        let (hold, closed) = (&record.hold, record.closed);
        Self {
            id: &hold.id,
            user_id: &hold.user_id,
            amount: hold.amount,
            captured: hold.captured,
            status: hold.status.as_str(),
            metadata: &record.metadata,
            key: record.key.as_deref(),
            created_at: stamp(hold.created_at),
            expires_at: stamp(hold.expires_at),
            version: record.placed.version,
            balance: record.placed.balance,
            held: record.placed.held,
            closed_at: closed.map(|c| stamp(c.at)),
            closed_version: closed.map(|c| c.version),
            closed_balance: closed.map(|c| c.balance),
            closed_held: closed.map(|c| c.held),
            capture_id: record.capture_id.as_deref(),
        }
    }
}

/// A hold's time as stored: fixed-width RFC 3339 (microseconds, `Z`), so that text order is
/// time order.
fn stamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn json(value: &(impl serde::Serialize + ?Sized)) -> Result<String, sqlx::Error> {
    serde_json::to_string(value).map_err(|err| sqlx::Error::Encode(err.into()))
}
