//! The credit ledger (SPEC §3): balances, versions and the transaction log, on SQLite (embedded
//! default) or PostgreSQL (several instances). All SQL lives in the backend modules; the
//! rules of a change live in `change` and the transaction's steps in `ledger`, once for both.

/// The columns of a hold row (`hold::HoldRow`), in order, for every query that reads one;
/// a macro so that queries stay static strings for `concat!`.
macro_rules! hold_columns {
    () => {
        "id, user_id, amount, captured, status, metadata, idempotency_key, created_at, \
         expires_at, version, balance, held, closed_at, closed_version, closed_balance, \
         closed_held, capture_id"
    };
}

mod change;
mod committer;
mod hold;
mod lane;
mod ledger;
mod outage;
mod postgres;
mod sqlite;
pub mod sweeper;

use app::wire::{
    BalanceEvent, BalanceSnapshot, Hold, HoldStatus, Metadata, Transaction, TransactionPage,
};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

pub use change::{NewChange, validate_user_id};
pub use hold::{NewHold, Settle};

use ledger::Op;

use crate::config::DatabaseUrl;

/// Default page size of the ledger listing.
pub const DEFAULT_PAGE_LIMIT: u32 = 20;
/// Largest page of the ledger listing.
pub const MAX_PAGE_LIMIT: u32 = 100;

/// Why a store operation did not happen. Nothing was changed in any case. Cloneable because
/// one failed batch answers every change in it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{field} {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{field} out of range: {value} is beyond ±9007199254740991")]
    OutOfRange { field: &'static str, value: String },
    #[error("insufficient credits: {available} available, {needed} needed")]
    InsufficientCredits { available: i64, needed: i64 },
    #[error("idempotency key already used for a different request")]
    IdempotencyConflict,
    #[error("{0} not found")]
    NotFound(String),
    #[error("hold {id} is {}", status.as_str())]
    HoldClosed { id: String, status: HoldStatus },
    /// The database cannot be reached or is overloaded; retrying later may succeed.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] Arc<sqlx::Error>),
    #[error("database error: {0}")]
    Database(#[source] Arc<sqlx::Error>),
    #[error("database migration failed: {0}")]
    Migrate(#[source] Arc<sqlx::migrate::MigrateError>),
    #[error("corrupt ledger row: {0}")]
    Corrupt(String),
}

impl StoreError {
    fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        if is_unavailable(&err) {
            Self::Unavailable(Arc::new(err))
        } else {
            Self::Database(Arc::new(err))
        }
    }
}

/// Errors that mean "not now" rather than "never": lost connections, pool exhaustion, a
/// server shutting down or refusing connections, SQLite's busy lock.
fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // FATAL ends the session: the server refused or dropped the connection (e.g. a
        // database not accepting connections), whatever the code.
        sqlx::Error::Database(db)
            if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some_and(|pg| {
                    matches!(
                        pg.severity(),
                        sqlx::postgres::PgSeverity::Fatal | sqlx::postgres::PgSeverity::Panic
                    )
                }) =>
        {
            true
        }
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // PostgreSQL: connection exceptions (08…), shutdown (57P0…), too many
            // connections (53300); SQLite: BUSY (5) and LOCKED (6) with extended codes.
            code.starts_with("08")
                || code.starts_with("57P0")
                || code == "53300"
                || code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6))
        }),
        _ => false,
    }
}

/// The result of applying a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Committed now: publish it.
    New(BalanceEvent),
    /// The same change was committed before under this idempotency key: answer, publish nothing.
    Replayed(BalanceEvent),
}

/// A cheap handle to the ledger database; clones share one pool and one writer queue.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
    committer: committer::Committer,
}

#[derive(Clone, Debug)]
enum Backend {
    Sqlite(sqlite::Db),
    Postgres(postgres::Db),
}

impl Store {
    /// Opens the database (creating a SQLite file and its folder if missing) and runs the
    /// migrations. Every change this store commits is sent to `commits` in commit order, for
    /// publishing; a dropped receiver just stops that.
    ///
    /// # Errors
    /// When the database cannot be opened or migrated.
    pub async fn connect(
        url: &DatabaseUrl,
        commits: mpsc::Sender<BalanceEvent>,
    ) -> Result<Self, StoreError> {
        let (backend, writers) = match url {
            DatabaseUrl::Sqlite(url) => (
                Backend::Sqlite(sqlite::Db::connect(url).await?),
                sqlite::WRITERS,
            ),
            DatabaseUrl::Postgres(url) => (
                Backend::Postgres(postgres::Db::connect(url).await?),
                postgres::WRITERS,
            ),
        };
        let committer = committer::Committer::spawn(&backend, writers, &commits);
        Ok(Self { backend, committer })
    }

    /// The user's current balance; a user never seen has balance 0 and version 0.
    ///
    /// # Errors
    /// `Unavailable` or `Database`.
    pub async fn snapshot(&self, user_id: &str) -> Result<BalanceSnapshot, StoreError> {
        let row = match &self.backend {
            Backend::Sqlite(db) => db.account(user_id).await?,
            Backend::Postgres(db) => db.account(user_id).await?,
        };
        let (balance, held, version, updated_at) = row.unwrap_or((0, 0, 0, None));
        Ok(BalanceSnapshot::new(
            user_id, balance, held, version, updated_at,
        ))
    }

    /// The current balances of `user_ids` that have an account, in one query; used to heal
    /// connections after a bus outage.
    ///
    /// # Errors
    /// `Unavailable` or `Database`.
    pub async fn snapshots(&self, user_ids: &[String]) -> Result<Vec<BalanceSnapshot>, StoreError> {
        let rows = match &self.backend {
            Backend::Sqlite(db) => db.accounts(user_ids).await?,
            Backend::Postgres(db) => db.accounts(user_ids).await?,
        };
        Ok(rows
            .into_iter()
            .map(|(user_id, balance, held, version, updated_at)| {
                BalanceSnapshot::new(user_id, balance, held, version, updated_at)
            })
            .collect())
    }

    /// Applies one change atomically: validate, check the idempotency key, append the ledger
    /// row, update the account to the new balance and `version + 1`. Concurrent changes are
    /// committed together (see `committer`), each with the outcome it would have alone.
    ///
    /// # Errors
    /// Every refusal of `StoreError`; a refused change leaves no trace and keeps its key unused.
    pub async fn apply(&self, change: &NewChange) -> Result<Applied, StoreError> {
        let metadata = change.validate()?;
        self.committer
            .apply(Op::Change(ledger::Validated {
                change: change.clone(),
                metadata,
            }))
            .await
    }

    /// Places a hold (SPEC §12): reserves `amount` of the available credits until it is
    /// captured, released or expires. Serialised with the user's changes, like a change.
    ///
    /// # Errors
    /// As [`Store::apply`]; `InsufficientCredits` when `amount` exceeds what is available.
    pub async fn place_hold(&self, hold: &NewHold) -> Result<Applied, StoreError> {
        let metadata = hold.validate()?;
        self.committer
            .apply(Op::Place(hold.clone(), metadata))
            .await
    }

    /// Captures, releases or expires the hold `hold_id` (only if it is `owner`'s, when one
    /// is given); a retry of what was already done is `Replayed`.
    ///
    /// # Errors
    /// `NotFound` for an unknown hold, `HoldClosed` for one no longer held, `Invalid` for a
    /// capture beyond the hold's amount, or the database's errors.
    pub async fn settle_hold(
        &self,
        hold_id: &str,
        settle: Settle,
        owner: Option<&str>,
    ) -> Result<Applied, StoreError> {
        if let Settle::Capture(Some(amount)) = settle {
            hold::validate_amount(amount)?;
        }
        // The hold is read under its owner's lock; someone else's is `NotFound` there.
        self.committer
            .apply(Op::Settle {
                owner: owner.map(str::to_owned),
                hold_id: hold_id.to_owned(),
                settle,
            })
            .await
    }

    /// The user's active holds, newest first.
    ///
    /// # Errors
    /// `Unavailable`, `Database` or `Corrupt`.
    pub async fn holds(&self, user_id: &str) -> Result<Vec<Hold>, StoreError> {
        let now = Utc::now();
        let rows = match &self.backend {
            Backend::Sqlite(db) => db.active_holds(user_id, now).await?,
            Backend::Postgres(db) => db.active_holds(user_id, now).await?,
        };
        rows.into_iter()
            .map(|row| row.into_record().map(|record| record.hold))
            .collect()
    }

    /// Expires up to `limit` holds past their `expires_at`, oldest first, and returns how
    /// many it expired. Several instances may sweep at once: each expiry runs under the
    /// account lock and checks the hold is still held, so each hold expires exactly once.
    ///
    /// # Errors
    /// `Unavailable` or `Database` when the due holds cannot be read.
    pub async fn expire_due(&self, limit: u32) -> Result<usize, StoreError> {
        let due = match &self.backend {
            Backend::Sqlite(db) => db.due_holds(Utc::now(), limit).await?,
            Backend::Postgres(db) => db.due_holds(Utc::now(), limit).await?,
        };
        let expiries = due.into_iter().map(|(hold_id, user_id)| {
            self.committer.apply(Op::Settle {
                owner: Some(user_id),
                hold_id,
                settle: Settle::Expire,
            })
        });
        let outcomes = futures::future::join_all(expiries).await;
        Ok(outcomes
            .iter()
            .filter(|outcome| matches!(outcome, Ok(Applied::New(_))))
            .count())
    }

    /// A page of the user's ledger, newest first, strictly older than version `before`.
    ///
    /// # Errors
    /// `Invalid` for a `limit` outside 1..=100, else `Unavailable`, `Database` or `Corrupt`.
    pub async fn transactions(
        &self,
        user_id: &str,
        limit: u32,
        before: Option<i64>,
    ) -> Result<TransactionPage, StoreError> {
        if !(1..=MAX_PAGE_LIMIT).contains(&limit) {
            return Err(StoreError::invalid(
                "limit",
                format!("must be 1 to {MAX_PAGE_LIMIT}"),
            ));
        }
        let before = before.unwrap_or(i64::MAX);
        let rows = match &self.backend {
            Backend::Sqlite(db) => db.transactions(user_id, limit, before).await?,
            Backend::Postgres(db) => db.transactions(user_id, limit, before).await?,
        };
        let items = rows
            .into_iter()
            .map(LedgerRow::into_transaction)
            .collect::<Result<Vec<_>, _>>()?;
        let next_before = match items.last() {
            Some(last) if items.len() == limit as usize && last.version > 1 => Some(last.version),
            _ => None,
        };
        Ok(TransactionPage { items, next_before })
    }

    /// Checks that the database answers, for readiness probes.
    ///
    /// # Errors
    /// `Unavailable` or `Database`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(db) => db.ping().await,
            Backend::Postgres(db) => db.ping().await,
        }
    }
}

/// A ledger row as both backends read it; metadata is JSON text.
#[derive(sqlx::FromRow)]
struct LedgerRow {
    id: String,
    amount: i64,
    #[sqlx(rename = "type")]
    kind: String,
    metadata: String,
    balance_after: i64,
    version: i64,
    created_at: DateTime<Utc>,
}

impl LedgerRow {
    fn into_transaction(self) -> Result<Transaction, StoreError> {
        let metadata: Metadata = serde_json::from_str(&self.metadata)
            .map_err(|err| StoreError::Corrupt(format!("metadata of {}: {err}", self.id)))?;
        Ok(Transaction {
            id: self.id,
            amount: self.amount,
            kind: self.kind,
            metadata,
            balance_after: self.balance_after,
            version: self.version,
            created_at: self.created_at,
        })
    }
}

/// A ledger row found by its idempotency key, with the account's held credits after it.
#[derive(sqlx::FromRow)]
struct KeyedRow {
    user_id: String,
    idempotency_key: String,
    held_after: i64,
    #[sqlx(flatten)]
    row: LedgerRow,
}

/// An account row: balance, held, version, updated_at.
type AccountRow = (i64, i64, i64, Option<DateTime<Utc>>);
/// An account row with its user: user_id, balance, held, version, updated_at.
type NamedAccountRow = (String, i64, i64, i64, Option<DateTime<Utc>>);
