//! The PostgreSQL backend, for several instances sharing one ledger. The account row lock
//! taken by the upsert serialises changes of one user across every instance.

use std::{str::FromStr, time::Duration};

use app::wire::Transaction;
use sqlx::{
    PgPool, Postgres,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::{AccountRow, LedgerRow, NamedAccountRow, StoreError, ledger::LedgerTx};

/// Connections per instance.
const POOL_SIZE: u32 = 16;
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
            .map_err(StoreError::Migrate)?;
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
    async fn lock_account(&mut self, user_id: &str) -> Result<(i64, i64), sqlx::Error> {
        // The no-op update on conflict takes the row lock, like SELECT … FOR UPDATE, and
        // creates a missing account in the same round trip.
        sqlx::query_as(
            "INSERT INTO credit_accounts (user_id, balance, version) VALUES ($1, 0, 0) \
             ON CONFLICT (user_id) DO UPDATE SET version = credit_accounts.version \
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
             FROM credit_transactions WHERE user_id = $1 AND idempotency_key = $2",
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
            "WITH entry AS ( \
                 INSERT INTO credit_transactions \
                 (id, user_id, amount, type, metadata, idempotency_key, balance_after, version, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)) \
             UPDATE credit_accounts SET balance = $7, version = $8, updated_at = $9 \
             WHERE user_id = $2",
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
        Ok(())
    }

    async fn commit(self) -> Result<(), sqlx::Error> {
        sqlx::Transaction::commit(self).await
    }
}
