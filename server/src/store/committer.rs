//! Group commit. Operations (changes and hold operations) wait in a queue; its writer task
//! takes every operation waiting, up to [`MAX_BATCH`], into a single database transaction. The fixed costs of a transaction —
//! BEGIN, COMMIT, the lock step, a round trip or thread handoff per statement — are then paid
//! once per batch instead of once per change. Nothing waits for a batch to fill: an idle
//! writer takes the first operation at once, and batches grow only while it is busy.
//!
//! A backend with several writers (PostgreSQL) gets one queue per writer, and each user's
//! operations always take the same queue (`lane`): concurrent batches never wait on each
//! other's account locks, and each user's versions are committed and published in order.

use std::sync::Arc;

use app::wire::BalanceEvent;
use sqlx::{Connection as _, Postgres, Sqlite, pool::PoolConnection};
use tokio::sync::{mpsc, oneshot};

use super::{Applied, Backend, StoreError, ledger, ledger::Op, sqlite};

/// Most changes in one transaction; bounds the time locks are held and the statement size.
const MAX_BATCH: usize = 256;
/// Changes that may wait before `apply` itself waits for room (backpressure).
const QUEUE_CAPACITY: usize = 4096;

type Outcome = Result<Applied, StoreError>;

struct Queued {
    op: Op,
    reply: oneshot::Sender<Outcome>,
}

/// The handle to a backend's writer tasks; clones share the queues, and the tasks end when
/// the last handle is dropped.
#[derive(Clone, Debug)]
pub(super) struct Committer {
    queues: Arc<[mpsc::Sender<Queued>]>,
}

impl Committer {
    /// Starts `writers` writer tasks for `backend`, which send each committed change to
    /// `commits`.
    pub(super) fn spawn(
        backend: &Backend,
        writers: usize,
        commits: &mpsc::Sender<BalanceEvent>,
    ) -> Self {
        let queues: Arc<[_]> = (0..writers.max(1))
            .map(|_| {
                let (queue, waiting) = mpsc::channel(QUEUE_CAPACITY);
                tokio::spawn(run(backend.clone(), waiting, commits.clone()));
                queue
            })
            .collect();
        Self { queues }
    }

    /// Queues a validated operation on its user's writer and waits for its outcome; if the
    /// writer is gone, the dropped reply says so.
    pub(super) async fn apply(&self, op: Op) -> Outcome {
        let (reply, outcome) = oneshot::channel();
        let queue = &self.queues[usize::from(op.lane()) % self.queues.len()];
        let _ = queue.send(Queued { op, reply }).await;
        outcome.await.map_err(|_| writer_gone())?
    }
}

fn writer_gone() -> StoreError {
    StoreError::Unavailable(Arc::new(sqlx::Error::WorkerCrashed))
}

async fn run(
    backend: Backend,
    mut waiting: mpsc::Receiver<Queued>,
    commits: mpsc::Sender<BalanceEvent>,
) {
    let mut kept = None;
    loop {
        let mut batch = Vec::new();
        if waiting.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        for (queued, outcome) in commit(&backend, &mut kept, batch).await {
            if let Ok(Applied::New(event)) = &outcome {
                // Sent before the answer, by this one task: commit order is publishing order.
                let _ = commits.send(event.clone()).await;
            }
            // A requester that went away still has its change applied; nobody to tell.
            let _ = queued.reply.send(outcome);
        }
    }
}

/// Commits a batch; returns each change with its outcome. When the batch fails for a reason
/// other than an unreachable database, each change is retried alone, so one change the
/// database rejects cannot fail the others.
async fn commit(
    backend: &Backend,
    kept: &mut Option<Connection>,
    batch: Vec<Queued>,
) -> Vec<(Queued, Outcome)> {
    tracing::debug!(size = batch.len(), "committing a batch");
    let ops: Vec<&Op> = batch.iter().map(|q| &q.op).collect();
    match backend.apply(kept, &ops).await {
        Ok(outcomes) => batch.into_iter().zip(outcomes).collect(),
        Err(err) if batch.len() > 1 && !matches!(err, StoreError::Unavailable(_)) => {
            tracing::warn!(error = %err, size = batch.len(), "batch failed; retrying its changes one by one");
            let mut answered = Vec::with_capacity(batch.len());
            for queued in batch {
                let outcome = match backend.apply(kept, &[&queued.op]).await {
                    Ok(mut outcomes) => outcomes.pop().unwrap_or_else(|| Err(writer_gone())),
                    Err(err) => Err(err),
                };
                answered.push((queued, outcome));
            }
            answered
        }
        Err(err) => batch
            .into_iter()
            .map(|queued| (queued, Err(err.clone())))
            .collect(),
    }
}

/// A writer's connection, kept from batch to batch: one taken from the pool per batch costs
/// two more round trips, as sqlx pings a connection when it is taken and when it is given
/// back (on PostgreSQL a third of the round trips of a batch of one).
enum Connection {
    Sqlite(PoolConnection<Sqlite>),
    Postgres(PoolConnection<Postgres>),
}

/// Why a batch failed: before anything was sent (taking a connection or its BEGIN), or after.
enum Failed {
    Begin(StoreError),
    Batch(StoreError),
}

impl Connection {
    /// Runs one batch in a fresh write transaction.
    async fn apply(&mut self, batch: &[&Op]) -> Result<Vec<Outcome>, Failed> {
        let failed = |err: sqlx::Error| Failed::Begin(err.into());
        match self {
            Self::Sqlite(conn) => {
                ledger::apply(sqlite::begin_write(conn).await.map_err(failed)?, batch).await
            }
            Self::Postgres(conn) => ledger::apply(conn.begin().await.map_err(failed)?, batch).await,
        }
        .map_err(Failed::Batch)
    }
}

impl Backend {
    /// Runs one batch on the writer's `kept` connection. A kept PostgreSQL connection may have
    /// been closed by the server while idle (restart, failover, idle timeout): its BEGIN
    /// fails and nothing was written, so the batch goes once more on a fresh connection,
    /// which the pool tests before handing out.
    async fn apply(
        &self,
        kept: &mut Option<Connection>,
        batch: &[&Op],
    ) -> Result<Vec<Outcome>, StoreError> {
        let may_be_closed = kept.is_some() && matches!(self, Self::Postgres(_));
        let outcome = match self.apply_on(kept, batch).await {
            Err(Failed::Begin(err)) if may_be_closed => {
                tracing::debug!(%err, "kept connection closed; taking a fresh one");
                self.apply_on(kept, batch).await
            }
            outcome => outcome,
        };
        outcome.map_err(|(Failed::Begin(err) | Failed::Batch(err))| err)
    }

    /// Runs one batch on `kept`, taking a connection first if there is none and giving it
    /// back when the batch failed: the failed transaction's rollback is only queued on the
    /// connection, and the pool sends it at once (it tests each connection returned), so the
    /// batch's locks are freed now, not at this writer's next batch.
    async fn apply_on(
        &self,
        kept: &mut Option<Connection>,
        batch: &[&Op],
    ) -> Result<Vec<Outcome>, Failed> {
        let conn = match kept {
            Some(conn) => conn,
            None => kept.insert(self.writer().await.map_err(Failed::Begin)?),
        };
        let outcome = conn.apply(batch).await;
        if outcome.is_err() {
            *kept = None;
        }
        outcome
    }

    async fn writer(&self) -> Result<Connection, StoreError> {
        Ok(match self {
            Self::Sqlite(db) => Connection::Sqlite(db.writer().await?),
            Self::Postgres(db) => Connection::Postgres(db.writer().await?),
        })
    }
}
