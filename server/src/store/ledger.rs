//! The steps of one change inside one database transaction, written once for both backends.
//! Each backend supplies the SQL for the steps through [`LedgerTx`].

use std::future::Future;

use app::wire::Transaction;
use chrono::{SubsecRound, Utc};

use super::{Applied, LedgerRow, NewChange, StoreError, change::event};

/// An open write transaction on the ledger. Dropping it without `commit` rolls it back.
pub(super) trait LedgerTx: Send {
    /// Creates the account at balance 0 if missing and locks it for the rest of the
    /// transaction; returns `(balance, version)`. Every later step relies on this lock to
    /// serialise changes of one user across connections and instances.
    fn lock_account(
        &mut self,
        user_id: &str,
    ) -> impl Future<Output = Result<(i64, i64), sqlx::Error>> + Send;

    /// The ledger row committed earlier under this user's idempotency key.
    fn find_by_key(
        &mut self,
        user_id: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<LedgerRow>, sqlx::Error>> + Send;

    /// Appends the ledger row and moves the account to its balance and version.
    fn append(
        &mut self,
        user_id: &str,
        row: &Transaction,
        metadata: &str,
        key: Option<&str>,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    fn commit(self) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

/// Applies a validated change in `tx`, committing only when the change is accepted.
/// `metadata` is the change's metadata as validated and encoded.
pub(super) async fn apply(
    mut tx: impl LedgerTx,
    change: &NewChange,
    metadata: &str,
) -> Result<Applied, StoreError> {
    let (balance, version) = tx.lock_account(&change.user_id).await?;
    if let Some(key) = &change.idempotency_key
        && let Some(prior) = tx.find_by_key(&change.user_id, key).await?
    {
        return change
            .replay(prior.into_transaction()?)
            .map(Applied::Replayed);
    }
    let row = Transaction {
        id: uuid::Uuid::now_v7().to_string(),
        amount: change.amount,
        kind: change.kind.clone(),
        metadata: change.metadata.clone(),
        balance_after: change.next_balance(balance)?,
        version: version + 1,
        // PostgreSQL keeps microseconds; rounding here makes a replay return the same instant.
        created_at: Utc::now().trunc_subsecs(6),
    };
    tx.append(
        &change.user_id,
        &row,
        metadata,
        change.idempotency_key.as_deref(),
    )
    .await?;
    tx.commit().await?;
    Ok(Applied::New(event(&change.user_id, row)))
}
