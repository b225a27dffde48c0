//! The steps of a batch of operations — changes and hold operations — inside one database
//! transaction, written once for both backends. Each backend supplies the set-based SQL for
//! the steps through [`LedgerTx`], so a batch costs the same few statements whether it holds
//! one operation or hundreds.

use std::{borrow::Cow, collections::HashMap, future::Future};

use app::wire::Transaction;
use chrono::{DateTime, SubsecRound, Utc};

use super::{
    Applied, KeyedRow, NewChange, StoreError,
    change::event,
    hold::{HoldRecord, HoldRow, Mark, NewHold, Outcome, Settle},
    lane,
};

/// A validated change with its metadata encoded as stored.
#[derive(Debug)]
pub(super) struct Validated {
    pub change: NewChange,
    pub metadata: String,
}

/// One operation on a user's account.
#[derive(Debug)]
pub(super) enum Op {
    Change(Validated),
    /// Place a hold; the metadata is encoded as stored.
    Place(NewHold, String),
    /// Capture, release or expire a hold: only `owner`'s, when one is given; otherwise its
    /// owner is read when the accounts are locked.
    Settle {
        owner: Option<String>,
        hold_id: String,
        settle: Settle,
    },
}

impl Op {
    /// The user the operation is for, where the operation names one.
    fn user_id(&self) -> Option<&str> {
        match self {
            Self::Change(validated) => Some(&validated.change.user_id),
            Self::Place(hold, _) => Some(&hold.user_id),
            Self::Settle { owner, .. } => owner.as_deref(),
        }
    }

    /// The writer lane key: the user's, or the one its hold's id carries.
    pub fn lane(&self) -> u16 {
        match self {
            Self::Change(validated) => lane::of_user(&validated.change.user_id),
            Self::Place(hold, _) => lane::of_user(&hold.user_id),
            Self::Settle {
                owner: Some(owner), ..
            } => lane::of_user(owner),
            Self::Settle { hold_id, .. } => lane::of_hold(hold_id),
        }
    }
}

/// A ledger row to append, with the columns the wire [`Transaction`] does not carry.
pub(super) struct Entry<'a> {
    pub user_id: Cow<'a, str>,
    pub key: Option<&'a str>,
    pub metadata: Cow<'a, str>,
    /// The account's held credits after this row, for an exact replay.
    pub held: i64,
    pub row: Transaction,
}

/// An account's balance, held credits and version after the batch.
pub(super) struct AccountState<'a> {
    pub user_id: &'a str,
    pub balance: i64,
    pub held: i64,
    pub version: i64,
}

/// A locked account row: `(user_id, balance, version, held)`.
pub(super) type LockedAccount = (String, i64, i64, i64);

/// An open write transaction on the ledger. Dropping it without `commit` rolls it back.
pub(super) trait LedgerTx: Send {
    /// Creates the missing accounts of `user_ids` at balance 0 and locks them, and those of
    /// the owners of `hold_ids`, for the rest of the transaction; returns every account
    /// locked. Every later step relies on these locks to serialise the operations of one user
    /// across connections and instances. Accounts are locked in the order of their user ids,
    /// so concurrent batches do not deadlock (on PostgreSQL, save while accounts are being
    /// created: see its lock step). A hold's owner never changes, so reading it
    /// before its account is locked is safe.
    fn lock_accounts(
        &mut self,
        user_ids: &[&str],
        hold_ids: &[&str],
    ) -> impl Future<Output = Result<Vec<LockedAccount>, sqlx::Error>> + Send;

    /// The ledger rows committed earlier under these `(user_id, idempotency_key)` pairs.
    fn find_by_keys(
        &mut self,
        keys: &[(&str, &str)],
    ) -> impl Future<Output = Result<Vec<KeyedRow>, sqlx::Error>> + Send;

    /// The holds with these ids, and those placed under these `(user_id, idempotency_key)`.
    fn find_holds(
        &mut self,
        ids: &[&str],
        keys: &[(&str, &str)],
    ) -> impl Future<Output = Result<Vec<HoldRow>, sqlx::Error>> + Send;

    /// Appends the rows, writes the holds (new or changed) and moves the accounts to their
    /// new state, all stamped `at`; removes the `abandoned` accounts, which the lock step
    /// created for operations that were all refused.
    fn append(
        &mut self,
        entries: &[Entry<'_>],
        holds: &[&HoldRecord],
        accounts: &[AccountState<'_>],
        abandoned: &[&str],
        at: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    fn commit(self) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Rolls back now. Dropping the transaction only queues its rollback on the connection,
    /// and a writer keeps its connection, so the locks would stay until its next batch.
    fn rollback(self) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

/// A locked account as the batch moves it.
struct Account {
    balance: i64,
    held: i64,
    version: i64,
    locked_version: i64,
}

impl Account {
    /// Counts one more version and returns what the account is left at.
    fn bump(&mut self, at: DateTime<Utc>) -> Mark {
        self.version += 1;
        Mark {
            version: self.version,
            balance: self.balance,
            held: self.held,
            at,
        }
    }
}

/// Applies a batch of validated operations in `tx`, in order, as if each ran alone: a
/// refused operation leaves no trace and the others still apply; one repeating an earlier
/// one (committed or in this batch) replays it. Commits once, when any operation was
/// accepted. Returns one outcome per operation; `Err` means none of them was applied.
pub(super) async fn apply(
    mut tx: impl LedgerTx,
    batch: &[&Op],
) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
    let mut user_ids: Vec<&str> = batch.iter().filter_map(|op| op.user_id()).collect();
    user_ids.sort_unstable();
    user_ids.dedup();
    let (mut change_keys, mut hold_keys, mut hold_ids) = (Vec::new(), Vec::new(), Vec::new());
    for op in batch {
        match op {
            Op::Change(v) => {
                change_keys.extend(keyed(&v.change.user_id, &v.change.idempotency_key))
            }
            Op::Place(hold, _) => hold_keys.extend(keyed(&hold.user_id, &hold.idempotency_key)),
            Op::Settle { hold_id, .. } => hold_ids.push(hold_id.as_str()),
        }
    }
    let mut accounts: HashMap<String, Account> = tx
        .lock_accounts(&user_ids, &hold_ids)
        .await?
        .into_iter()
        .map(|(user_id, balance, version, held)| {
            let account = Account {
                balance,
                held,
                version,
                locked_version: version,
            };
            (user_id, account)
        })
        .collect();

    let mut prior = HashMap::with_capacity(change_keys.len());
    if !change_keys.is_empty() {
        change_keys.sort_unstable();
        change_keys.dedup();
        for keyed in tx.find_by_keys(&change_keys).await? {
            let held = keyed.held_after;
            prior.insert(
                (keyed.user_id, keyed.idempotency_key),
                (keyed.row.into_transaction()?, held),
            );
        }
    }
    let mut holds: HashMap<String, HoldRecord> = HashMap::new();
    if !(hold_ids.is_empty() && hold_keys.is_empty()) {
        for row in tx.find_holds(&hold_ids, &hold_keys).await? {
            let record = row.into_record()?;
            holds.insert(record.hold.id.clone(), record);
        }
    }
    let mut hold_by_key: HashMap<(String, String), String> = holds
        .values()
        .filter_map(|r| Some(((r.hold.user_id.clone(), r.key.clone()?), r.hold.id.clone())))
        .collect();

    // PostgreSQL keeps microseconds; rounding here makes a replay return the same instant.
    let at = Utc::now().trunc_subsecs(6);
    let mut entries = Vec::new();
    let mut written: Vec<String> = Vec::new();
    let mut outcomes = Vec::with_capacity(batch.len());
    for op in batch {
        let outcome = match op {
            Op::Change(validated) => {
                let change = &validated.change;
                let account = locked(&mut accounts, &change.user_id)?;
                let key = change.idempotency_key.as_deref();
                let slot = key.map(|key| (change.user_id.clone(), key.to_owned()));
                if let Some((earlier, held)) = slot.as_ref().and_then(|slot| prior.get(slot)) {
                    outcomes.push(change.replay(earlier.clone(), *held).map(Applied::Replayed));
                    continue;
                }
                change
                    .next_balance(account.balance, account.held)
                    .map(|balance_after| {
                        account.balance = balance_after;
                        let mark = account.bump(at);
                        let row = Transaction {
                            id: uuid::Uuid::now_v7().to_string(),
                            amount: change.amount,
                            kind: change.kind.clone(),
                            metadata: change.metadata.clone(),
                            balance_after,
                            version: mark.version,
                            created_at: at,
                        };
                        if let Some(slot) = slot {
                            prior.insert(slot, (row.clone(), mark.held));
                        }
                        let event = event(&change.user_id, row.clone(), mark.held);
                        entries.push(Entry {
                            user_id: Cow::Borrowed(&change.user_id),
                            key,
                            metadata: Cow::Borrowed(&validated.metadata),
                            held: mark.held,
                            row,
                        });
                        Applied::New(event)
                    })
            }
            Op::Place(request, metadata) => {
                let slot = request
                    .idempotency_key
                    .clone()
                    .map(|key| (request.user_id.clone(), key));
                if let Some(earlier) = slot.as_ref().and_then(|slot| hold_by_key.get(slot)) {
                    outcomes.push(request.replay(&holds[earlier]).map(Applied::Replayed));
                    continue;
                }
                let account = locked(&mut accounts, &request.user_id)?;
                let available = account.balance - account.held;
                if request.amount > available {
                    Err(StoreError::InsufficientCredits {
                        available,
                        needed: request.amount,
                    })
                } else {
                    account.held += request.amount;
                    let record = HoldRecord::place(request, metadata.clone(), account.bump(at));
                    let (id, event) = (record.hold.id.clone(), record.placed_event());
                    if let Some(slot) = slot {
                        hold_by_key.insert(slot, id.clone());
                    }
                    holds.insert(id.clone(), record);
                    written.push(id);
                    Ok(Applied::New(event))
                }
            }
            Op::Settle {
                owner,
                hold_id,
                settle,
            } => {
                let Some(record) = holds.get_mut(hold_id).filter(|record| {
                    owner
                        .as_ref()
                        .is_none_or(|owner| *owner == record.hold.user_id)
                }) else {
                    outcomes.push(Err(StoreError::NotFound(format!("hold {hold_id}"))));
                    continue;
                };
                let account = locked(&mut accounts, &record.hold.user_id)?;
                record
                    .settle(*settle, at)
                    .and_then(|outcome| match outcome {
                        Outcome::Replay => record.closed_event().map(Applied::Replayed),
                        Outcome::Close { status, captured } => {
                            account.held -= record.hold.amount;
                            account.balance -= captured;
                            record.close(status, captured, account.bump(at));
                            if let Some(change) = record.capture_change() {
                                let user_id = Cow::Owned(record.hold.user_id.clone());
                                entries.push(capture_entry(user_id, change, account));
                            }
                            written.push(hold_id.clone());
                            record.closed_event().map(Applied::New)
                        }
                    })
            }
        };
        outcomes.push(outcome);
    }

    let mut states: Vec<AccountState<'_>> = accounts
        .iter()
        .filter(|(_, account)| account.version != account.locked_version)
        .map(|(user_id, account)| AccountState {
            user_id,
            balance: account.balance,
            held: account.held,
            version: account.version,
        })
        .collect();
    if states.is_empty() {
        // Nothing accepted: undo the accounts the lock step created, and free the locks.
        tx.rollback().await?;
        return Ok(outcomes);
    }
    states.sort_unstable_by_key(|state| state.user_id);
    // A refused operation leaves no trace: not even the empty account the lock step
    // created for a user whose operations in this batch were all refused.
    let mut abandoned: Vec<&str> = accounts
        .iter()
        .filter(|(_, account)| account.version == 0)
        .map(|(user_id, _)| user_id.as_str())
        .collect();
    abandoned.sort_unstable();
    written.sort_unstable();
    written.dedup();
    let holds: Vec<&HoldRecord> = written.iter().map(|id| &holds[id]).collect();
    tx.append(&entries, &holds, &states, &abandoned, at).await?;
    tx.commit().await?;
    Ok(outcomes)
}

/// The account of `user_id`, which the lock step must have locked.
fn locked<'a>(
    accounts: &'a mut HashMap<String, Account>,
    user_id: &str,
) -> Result<&'a mut Account, StoreError> {
    accounts
        .get_mut(user_id)
        .ok_or_else(|| StoreError::Corrupt(format!("account {user_id} was not locked")))
}

/// The `(user_id, key)` of a keyed operation.
fn keyed<'a>(user_id: &'a str, key: &'a Option<String>) -> Option<(&'a str, &'a str)> {
    Some((user_id, key.as_deref()?))
}

/// The ledger row of a capture, which leaves `account` as it is now.
fn capture_entry<'a>(
    user_id: Cow<'a, str>,
    change: app::wire::Change,
    account: &Account,
) -> Entry<'a> {
    let metadata = serde_json::Value::from(change.metadata.clone()).to_string();
    Entry {
        user_id,
        key: None,
        metadata: Cow::Owned(metadata),
        held: account.held,
        row: Transaction {
            id: change.id,
            amount: change.amount,
            kind: change.kind,
            metadata: change.metadata,
            balance_after: account.balance,
            version: account.version,
            created_at: change.created_at,
        },
    }
}
