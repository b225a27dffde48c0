//! The PostgreSQL backend, for several instances sharing one ledger. The account row lock
//! taken by the upsert serialises changes of one user across every instance.

use std::{str::FromStr, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::{
    PgPool, Postgres,
    pool::PoolConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::{
    AccountRow, KeyedRow, LedgerRow, NamedAccountRow, StoreError,
    hold::{HoldRecord, HoldRow},
    ledger::{AccountState, Entry, LedgerTx, LockedAccount},
    outage::Outage,
};

/// Connections per instance.
const POOL_SIZE: u32 = 16;
/// Group-commit writers, each a transaction at a time: enough to overlap round trips and WAL
/// flushes, few enough to leave most of the pool to readers.
pub(super) const WRITERS: usize = 4;
/// How long a request waits for a connection before answering 503, so an unreachable
/// database fails requests fast instead of piling them up.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub(super) struct Db {
    pool: PgPool,
    outage: Arc<Outage>,
}

impl Db {
    pub(super) async fn connect(url: &str) -> Result<Self, StoreError> {
        // Statements stay prepared for a connection's life and are planned once, with
        // sequential scans ruled out: every statement reads through an index, and a plan made
        // while a table was nearly empty would otherwise keep scanning it as it grew (hold
        // throughput once fell by two thirds within a minute). Planning every execution
        // instead cost as much as running the statements.
        let options = PgConnectOptions::from_str(url)?
            .application_name("livecredits")
            .options([
                ("plan_cache_mode", "force_generic_plan"),
                ("enable_seqscan", "off"),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(|err| StoreError::Migrate(Arc::new(err)))?;
        Ok(Self {
            pool,
            outage: Arc::default(),
        })
    }

    /// A connection for a writer task to keep (see `committer`).
    pub(super) async fn writer(&self) -> Result<PoolConnection<Postgres>, StoreError> {
        self.outage.guard(self.pool.acquire()).await
    }

    pub(super) async fn account(&self, user_id: &str) -> Result<Option<AccountRow>, StoreError> {
        let query = sqlx::query_as(
            "SELECT balance, held, version, updated_at FROM credit_accounts WHERE user_id = $1",
        )
        .bind(user_id);
        self.outage.guard(query.fetch_optional(&self.pool)).await
    }

    pub(super) async fn accounts(
        &self,
        user_ids: &[String],
    ) -> Result<Vec<NamedAccountRow>, StoreError> {
        let query = sqlx::query_as(
            "SELECT user_id, balance, held, version, updated_at FROM credit_accounts \
             WHERE user_id = ANY($1)",
        )
        .bind(user_ids);
        self.outage.guard(query.fetch_all(&self.pool)).await
    }

    pub(super) async fn transactions(
        &self,
        user_id: &str,
        limit: u32,
        before: i64,
    ) -> Result<Vec<LedgerRow>, StoreError> {
        let query = sqlx::query_as(
            "SELECT id, amount, type, metadata, balance_after, version, created_at \
             FROM credit_transactions WHERE user_id = $1 AND version < $2 \
             ORDER BY version DESC LIMIT $3",
        )
        .bind(user_id)
        .bind(before)
        .bind(i64::from(limit));
        self.outage.guard(query.fetch_all(&self.pool)).await
    }

    pub(super) async fn active_holds(
        &self,
        user_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<HoldRow>, StoreError> {
        let query = sqlx::query_as(concat!(
            "SELECT ",
            hold_columns!(),
            " FROM credit_holds \
             WHERE user_id = $1 AND status = 'held' AND expires_at > $2 \
             ORDER BY created_at DESC, id DESC"
        ))
        .bind(user_id)
        .bind(now);
        self.outage.guard(query.fetch_all(&self.pool)).await
    }

    /// `(hold_id, user_id)` of up to `limit` held holds whose expiry has passed.
    pub(super) async fn due_holds(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let query = sqlx::query_as(
            "SELECT id, user_id FROM credit_holds WHERE status = 'held' AND expires_at <= $1 \
             ORDER BY expires_at LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit));
        self.outage.guard(query.fetch_all(&self.pool)).await
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        self.outage
            .guard(sqlx::query("SELECT 1").execute(&self.pool))
            .await?;
        Ok(())
    }
}

impl LedgerTx for sqlx::Transaction<'_, Postgres> {
    // Lists travel as arrays, one per column, so each step is one prepared statement
    // whatever the batch size.

    async fn lock_accounts(
        &mut self,
        user_ids: &[&str],
        hold_ids: &[&str],
    ) -> Result<Vec<LockedAccount>, sqlx::Error> {
        // Existing accounts are locked with FOR UPDATE, which writes no new row version; only
        // missing ones are inserted. One created by another transaction since this
        // statement's snapshot is locked by the no-op update on conflict. Each set is locked
        // in byte order (as Rust sorts); the two interleave only while accounts are being
        // created, where a deadlock is possible: PostgreSQL then aborts one batch, and the
        // committer retries its operations one by one.
        sqlx::query_as(
            "WITH wanted AS ( \
                 SELECT UNNEST($1::text[]) AS id \
                 UNION SELECT user_id FROM credit_holds WHERE id = ANY($2)), \
             existing AS ( \
                 SELECT user_id, balance, version, held FROM credit_accounts \
                 WHERE user_id IN (SELECT id FROM wanted) \
                 ORDER BY user_id COLLATE \"C\" FOR UPDATE), \
             created AS ( \
                 INSERT INTO credit_accounts (user_id, balance, version) \
                 SELECT id, 0, 0 FROM wanted WHERE id NOT IN (SELECT user_id FROM existing) \
                 ORDER BY id COLLATE \"C\" \
                 ON CONFLICT (user_id) DO UPDATE SET version = credit_accounts.version \
                 RETURNING user_id, balance, version, held) \
             SELECT * FROM existing UNION ALL SELECT * FROM created",
        )
        .bind(user_ids)
        .bind(hold_ids)
        .fetch_all(&mut **self)
        .await
    }

    async fn find_by_keys(&mut self, keys: &[(&str, &str)]) -> Result<Vec<KeyedRow>, sqlx::Error> {
        let (user_ids, keys): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
        sqlx::query_as(
            "SELECT t.user_id, t.idempotency_key, t.held_after, t.id, t.amount, t.type, \
             t.metadata, t.balance_after, t.version, t.created_at \
             FROM UNNEST($1::text[], $2::text[]) AS k(user_id, key) JOIN credit_transactions AS t \
             ON t.user_id = k.user_id AND t.idempotency_key = k.key \
             WHERE t.idempotency_key IS NOT NULL",
        )
        .bind(user_ids)
        .bind(keys)
        .fetch_all(&mut **self)
        .await
    }

    async fn find_holds(
        &mut self,
        ids: &[&str],
        keys: &[(&str, &str)],
    ) -> Result<Vec<HoldRow>, sqlx::Error> {
        let (user_ids, keys): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
        // Two index look-ups: joined by OR in one WHERE, they made a sequential scan.
        sqlx::query_as(concat!(
            "SELECT ",
            hold_columns!(),
            " FROM credit_holds WHERE id = ANY($1) \
             UNION ALL SELECT ",
            hold_columns!(),
            " FROM UNNEST($2::text[], $3::text[]) AS k(key_user, wanted_key) \
             JOIN credit_holds ON user_id = key_user AND idempotency_key = wanted_key \
             WHERE idempotency_key IS NOT NULL"
        ))
        .bind(ids)
        .bind(user_ids)
        .bind(keys)
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
        let hold_column =
            |f: fn(&HoldRecord) -> Option<i64>| holds.iter().map(|h| f(h)).collect::<Vec<_>>();
        // Every write of the batch in one statement, one round trip.
        sqlx::query(
            "WITH entry AS ( \
                 INSERT INTO credit_transactions \
                 (id, user_id, amount, type, metadata, idempotency_key, balance_after, version, \
                 held_after, created_at) \
                 SELECT *, $9 FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], \
                     $5::text[], $6::text[], $7::int8[], $8::int8[], $14::int8[])), \
             hold AS ( \
                 INSERT INTO credit_holds (id, user_id, amount, captured, status, metadata, \
                 idempotency_key, created_at, expires_at, version, balance, held, closed_at, \
                 closed_version, closed_balance, closed_held, capture_id) \
                 SELECT * FROM UNNEST($16::text[], $17::text[], $18::int8[], $19::int8[], \
                     $20::text[], $21::text[], $22::text[], $23::timestamptz[], \
                     $24::timestamptz[], $25::int8[], $26::int8[], $27::int8[], \
                     $28::timestamptz[], $29::int8[], $30::int8[], $31::int8[], $32::text[]) \
                 ON CONFLICT (id) DO UPDATE SET status = excluded.status, \
                 captured = excluded.captured, closed_at = excluded.closed_at, \
                 closed_version = excluded.closed_version, \
                 closed_balance = excluded.closed_balance, closed_held = excluded.closed_held, \
                 capture_id = excluded.capture_id), \
             abandoned AS ( \
                 DELETE FROM credit_accounts WHERE version = 0 AND user_id = ANY($13::text[])) \
             UPDATE credit_accounts AS a \
             SET balance = s.balance, held = s.held, version = s.version, updated_at = $9 \
             FROM UNNEST($10::text[], $11::int8[], $12::int8[], $15::int8[]) \
                 AS s(user_id, balance, version, held) \
             WHERE a.user_id = s.user_id",
        )
        .bind(
            entries
                .iter()
                .map(|e| e.row.id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(entries.iter().map(|e| &*e.user_id).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.row.amount).collect::<Vec<_>>())
        .bind(
            entries
                .iter()
                .map(|e| e.row.kind.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(entries.iter().map(|e| &*e.metadata).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.key).collect::<Vec<_>>())
        .bind(
            entries
                .iter()
                .map(|e| e.row.balance_after)
                .collect::<Vec<_>>(),
        )
        .bind(entries.iter().map(|e| e.row.version).collect::<Vec<_>>())
        .bind(at)
        .bind(accounts.iter().map(|a| a.user_id).collect::<Vec<_>>())
        .bind(accounts.iter().map(|a| a.balance).collect::<Vec<_>>())
        .bind(accounts.iter().map(|a| a.version).collect::<Vec<_>>())
        .bind(abandoned)
        .bind(entries.iter().map(|e| e.held).collect::<Vec<_>>())
        .bind(accounts.iter().map(|a| a.held).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.hold.id.as_str()).collect::<Vec<_>>())
        .bind(
            holds
                .iter()
                .map(|h| h.hold.user_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(holds.iter().map(|h| h.hold.amount).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.hold.captured).collect::<Vec<_>>())
        .bind(
            holds
                .iter()
                .map(|h| h.hold.status.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            holds
                .iter()
                .map(|h| h.metadata.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(holds.iter().map(|h| h.key.as_deref()).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.hold.created_at).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.hold.expires_at).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.placed.version).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.placed.balance).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.placed.held).collect::<Vec<_>>())
        .bind(
            holds
                .iter()
                .map(|h| h.closed.map(|c| c.at))
                .collect::<Vec<_>>(),
        )
        .bind(hold_column(|h| h.closed.map(|c| c.version)))
        .bind(hold_column(|h| h.closed.map(|c| c.balance)))
        .bind(hold_column(|h| h.closed.map(|c| c.held)))
        .bind(
            holds
                .iter()
                .map(|h| h.capture_id.as_deref())
                .collect::<Vec<_>>(),
        )
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
