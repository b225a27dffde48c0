//! The PostgreSQL backend, for several instances sharing one ledger. The account row lock
//! taken by the upsert serialises changes of one user across every instance.

use std::{str::FromStr, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::{
    PgPool, Postgres,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::{
    AccountRow, KeyedRow, LedgerRow, NamedAccountRow, StoreError,
    ledger::{AccountState, Entry, LedgerTx},
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
}

impl Db {
    pub(super) async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?.application_name("livecredits");
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(|err| StoreError::Migrate(Arc::new(err)))?;
        Ok(Self { pool })
    }

    pub(super) async fn begin(&self) -> Result<sqlx::Transaction<'static, Postgres>, StoreError> {
        Ok(self.pool.begin().await?)
    }

    pub(super) async fn account(&self, user_id: &str) -> Result<Option<AccountRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT balance, version, updated_at FROM credit_accounts WHERE user_id = $1",
        )
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    pub(super) async fn accounts(
        &self,
        user_ids: &[String],
    ) -> Result<Vec<NamedAccountRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT user_id, balance, version, updated_at FROM credit_accounts \
             WHERE user_id = ANY($1)",
        )
        .bind(user_ids)
        .fetch_all(&self.pool)
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
             FROM credit_transactions WHERE user_id = $1 AND version < $2 \
             ORDER BY version DESC LIMIT $3",
        )
        .bind(user_id)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

impl LedgerTx for sqlx::Transaction<'_, Postgres> {
    // Lists travel as arrays, one per column, so each step is one prepared statement
    // whatever the batch size.

    async fn lock_accounts(
        &mut self,
        user_ids: &[&str],
    ) -> Result<Vec<(String, i64, i64)>, sqlx::Error> {
        // The no-op update on conflict takes each row lock, like SELECT … FOR UPDATE, and
        // creates the missing accounts in the same round trip, in the order given.
        sqlx::query_as(
            "INSERT INTO credit_accounts (user_id, balance, version) \
             SELECT id, 0, 0 FROM UNNEST($1::text[]) WITH ORDINALITY AS u(id, n) ORDER BY n \
             ON CONFLICT (user_id) DO UPDATE SET version = credit_accounts.version \
             RETURNING user_id, balance, version",
        )
        .bind(user_ids)
        .fetch_all(&mut **self)
        .await
    }

    async fn find_by_keys(&mut self, keys: &[(&str, &str)]) -> Result<Vec<KeyedRow>, sqlx::Error> {
        let (user_ids, keys): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
        sqlx::query_as(
            "SELECT t.user_id, t.idempotency_key, t.id, t.amount, t.type, t.metadata, \
             t.balance_after, t.version, t.created_at \
             FROM UNNEST($1::text[], $2::text[]) AS k(user_id, key) JOIN credit_transactions AS t \
             ON t.user_id = k.user_id AND t.idempotency_key = k.key \
             WHERE t.idempotency_key IS NOT NULL",
        )
        .bind(user_ids)
        .bind(keys)
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
        sqlx::query(
            "WITH entry AS ( \
                 INSERT INTO credit_transactions \
                 (id, user_id, amount, type, metadata, idempotency_key, balance_after, version, created_at) \
                 SELECT *, $9 FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], \
                     $5::text[], $6::text[], $7::int8[], $8::int8[])), \
             abandoned AS ( \
                 DELETE FROM credit_accounts WHERE version = 0 AND user_id = ANY($13::text[])) \
             UPDATE credit_accounts AS a SET balance = s.balance, version = s.version, updated_at = $9 \
             FROM UNNEST($10::text[], $11::int8[], $12::int8[]) AS s(user_id, balance, version) \
             WHERE a.user_id = s.user_id",
        )
        .bind(entries.iter().map(|e| e.row.id.as_str()).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.user_id).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.row.amount).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.row.kind.as_str()).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.metadata).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.key).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.row.balance_after).collect::<Vec<_>>())
        .bind(entries.iter().map(|e| e.row.version).collect::<Vec<_>>())
        .bind(at)
        .bind(accounts.iter().map(|a| a.user_id).collect::<Vec<_>>())
        .bind(accounts.iter().map(|a| a.balance).collect::<Vec<_>>())
        .bind(accounts.iter().map(|a| a.version).collect::<Vec<_>>())
        .bind(abandoned)
        .execute(&mut **self)
        .await?;
        Ok(())
    }

    async fn commit(self) -> Result<(), sqlx::Error> {
        sqlx::Transaction::commit(self).await
    }
}
