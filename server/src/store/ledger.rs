//! The steps of a batch of changes inside one database transaction, written once for both
//! backends. Each backend supplies the set-based SQL for the steps through [`LedgerTx`], so a
//! batch costs the same few statements whether it holds one change or hundreds.

use std::{collections::HashMap, future::Future};

use app::wire::Transaction;
use chrono::{DateTime, SubsecRound, Utc};

use super::{Applied, KeyedRow, NewChange, StoreError, change::event};

/// A validated change with its metadata encoded as stored.
#[derive(Debug)]
pub(super) struct Validated {
    pub change: NewChange,
    pub metadata: String,
}

/// A ledger row to append, with the columns the wire [`Transaction`] does not carry.
pub(super) struct Entry<'a> {
    pub user_id: &'a str,
    pub key: Option<&'a str>,
    pub metadata: &'a str,
    pub row: Transaction,
}

/// An account's balance and version after the batch.
pub(super) struct AccountState<'a> {
    pub user_id: &'a str,
    pub balance: i64,
    pub version: i64,
}

/// An open write transaction on the ledger. Dropping it without `commit` rolls it back.
pub(super) trait LedgerTx: Send {
    /// Creates the missing accounts at balance 0 and locks them all for the rest of the
    /// transaction; returns `(user_id, balance, version)` for each. Every later step relies on
    /// these locks to serialise changes of one user across connections and instances.
    /// `user_ids` is sorted and unique, so concurrent batches lock in one order and cannot
    /// deadlock.
    fn lock_accounts(
        &mut self,
        user_ids: &[&str],
    ) -> impl Future<Output = Result<Vec<(String, i64, i64)>, sqlx::Error>> + Send;

    /// The ledger rows committed earlier under these `(user_id, idempotency_key)` pairs.
    fn find_by_keys(
        &mut self,
        keys: &[(&str, &str)],
    ) -> impl Future<Output = Result<Vec<KeyedRow>, sqlx::Error>> + Send;

    /// Appends the rows and moves the accounts to their new balances and versions, all
    /// stamped `at`; removes the `abandoned` accounts, which the lock step created for
    /// changes that were all refused.
    fn append(
        &mut self,
        entries: &[Entry<'_>],
        accounts: &[AccountState<'_>],
        abandoned: &[&str],
        at: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    fn commit(self) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

/// Applies a batch of validated changes in `tx`, in order, as if each ran alone: a refused
/// change leaves no trace and the others still apply; a change repeating the key of an
/// earlier one (committed or in this batch) replays it. Commits once, when any change was
/// accepted. Returns one outcome per change; `Err` means none of them was applied.
pub(super) async fn apply(
    mut tx: impl LedgerTx,
    batch: &[&Validated],
) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
    let mut user_ids: Vec<&str> = batch.iter().map(|v| v.change.user_id.as_str()).collect();
    user_ids.sort_unstable();
    user_ids.dedup();
    let mut accounts: HashMap<String, (i64, i64)> = tx
        .lock_accounts(&user_ids)
        .await?
        .into_iter()
        .map(|(user_id, balance, version)| (user_id, (balance, version)))
        .collect();

    let mut keys: Vec<(&str, &str)> = batch
        .iter()
        .filter_map(|v| {
            Some((
                v.change.user_id.as_str(),
                v.change.idempotency_key.as_deref()?,
            ))
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut prior = HashMap::with_capacity(keys.len());
    if !keys.is_empty() {
        for keyed in tx.find_by_keys(&keys).await? {
            prior.insert(
                (keyed.user_id, keyed.idempotency_key),
                keyed.row.into_transaction()?,
            );
        }
    }

    // PostgreSQL keeps microseconds; rounding here makes a replay return the same instant.
    let at = Utc::now().trunc_subsecs(6);
    let mut entries = Vec::new();
    let mut outcomes = Vec::with_capacity(batch.len());
    for validated in batch {
        let change = &validated.change;
        let key = change.idempotency_key.as_deref();
        let slot = key.map(|key| (change.user_id.clone(), key.to_owned()));
        if let Some(earlier) = slot.as_ref().and_then(|slot| prior.get(slot)) {
            outcomes.push(change.replay(earlier.clone()).map(Applied::Replayed));
            continue;
        }
        let Some((balance, version)) = accounts.get_mut(&change.user_id) else {
            return Err(StoreError::Corrupt(format!(
                "account {} was not locked",
                change.user_id
            )));
        };
        let balance_after = match change.next_balance(*balance) {
            Ok(next) => next,
            Err(refused) => {
                outcomes.push(Err(refused));
                continue;
            }
        };
        *balance = balance_after;
        *version += 1;
        let row = Transaction {
            id: uuid::Uuid::now_v7().to_string(),
            amount: change.amount,
            kind: change.kind.clone(),
            metadata: change.metadata.clone(),
            balance_after,
            version: *version,
            created_at: at,
        };
        if let Some(slot) = slot {
            prior.insert(slot, row.clone());
        }
        outcomes.push(Ok(Applied::New(event(&change.user_id, row.clone()))));
        entries.push(Entry {
            user_id: &change.user_id,
            key,
            metadata: &validated.metadata,
            row,
        });
    }
    if entries.is_empty() {
        // Nothing accepted: dropping `tx` rolls back the accounts the lock step created.
        return Ok(outcomes);
    }

    let mut touched: Vec<&str> = entries.iter().map(|e| e.user_id).collect();
    touched.sort_unstable();
    touched.dedup();
    let states: Vec<AccountState<'_>> = touched
        .into_iter()
        .map(|user_id| {
            let (balance, version) = accounts[user_id];
            AccountState {
                user_id,
                balance,
                version,
            }
        })
        .collect();
    // A refused change leaves no trace: not even the empty account the lock step created
    // for a user whose changes in this batch were all refused.
    let mut abandoned: Vec<&str> = accounts
        .iter()
        .filter(|(_, (_, version))| *version == 0)
        .map(|(user_id, _)| user_id.as_str())
        .collect();
    abandoned.sort_unstable();
    tx.append(&entries, &states, &abandoned, at).await?;
    tx.commit().await?;
    Ok(outcomes)
}
