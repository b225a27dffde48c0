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
use tokio::sync::{mpsc, oneshot};

use super::{Applied, Backend, StoreError, ledger, ledger::Op};

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
    loop {
        let mut batch = Vec::new();
        if waiting.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        for (queued, outcome) in commit(&backend, batch).await {
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
async fn commit(backend: &Backend, batch: Vec<Queued>) -> Vec<(Queued, Outcome)> {
    tracing::debug!(size = batch.len(), "committing a batch");
    let ops: Vec<&Op> = batch.iter().map(|q| &q.op).collect();
    match backend.apply(&ops).await {
        Ok(outcomes) => batch.into_iter().zip(outcomes).collect(),
        Err(err) if batch.len() > 1 && !matches!(err, StoreError::Unavailable(_)) => {
            tracing::warn!(error = %err, size = batch.len(), "batch failed; retrying its changes one by one");
            let mut answered = Vec::with_capacity(batch.len());
            for queued in batch {
                let outcome = match backend.apply(&[&queued.op]).await {
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

impl Backend {
    /// Runs one batch in a fresh write transaction.
    async fn apply(&self, batch: &[&Op]) -> Result<Vec<Outcome>, StoreError> {
        match self {
            Self::Sqlite(db) => ledger::apply(db.begin_write().await?, batch).await,
            Self::Postgres(db) => ledger::apply(db.begin().await?, batch).await,
        }
    }
}
