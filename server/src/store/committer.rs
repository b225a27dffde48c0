//! Group commit. Changes wait in one queue; a writer takes every change waiting, up to
//! [`MAX_BATCH`], into a single database transaction. The fixed costs of a transaction —
//! BEGIN, COMMIT, the lock step, a round trip or thread handoff per statement — are then paid
//! once per batch instead of once per change. Nothing waits for a batch to fill: an idle
//! writer takes the first change at once, and batches grow only while writers are busy.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Applied, Backend, StoreError, ledger, ledger::Validated};

/// Most changes in one transaction; bounds the time locks are held and the statement size.
const MAX_BATCH: usize = 256;
/// Changes that may wait before `apply` itself waits for room (backpressure).
const QUEUE_CAPACITY: usize = 4096;

type Outcome = Result<Applied, StoreError>;

struct Queued {
    validated: Validated,
    reply: oneshot::Sender<Outcome>,
}

/// The handle to a backend's writer task; clones share the queue, and the task ends when the
/// last handle is dropped.
#[derive(Clone, Debug)]
pub(super) struct Committer {
    queue: mpsc::Sender<Queued>,
}

impl Committer {
    /// Starts the writer task for `backend`, running at most `writers` batches at a time.
    pub(super) fn spawn(backend: Backend, writers: usize) -> Self {
        let (queue, waiting) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(run(backend, waiting, writers));
        Self { queue }
    }

    /// Queues a validated change and waits for its outcome.
    pub(super) async fn apply(&self, validated: Validated) -> Outcome {
        let (reply, outcome) = oneshot::channel();
        self.queue
            .send(Queued { validated, reply })
            .await
            .map_err(|_| writer_gone())?;
        outcome.await.map_err(|_| writer_gone())?
    }
}

fn writer_gone() -> StoreError {
    StoreError::Unavailable(Arc::new(sqlx::Error::WorkerCrashed))
}

async fn run(backend: Backend, mut waiting: mpsc::Receiver<Queued>, writers: usize) {
    let writers = Arc::new(Semaphore::new(writers));
    loop {
        // Waiting for a free writer before taking from the queue lets the next batch grow.
        let Ok(writer) = writers.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(MAX_BATCH);
        if waiting.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let backend = backend.clone();
        tokio::spawn(async move {
            commit(&backend, batch).await;
            drop(writer);
        });
    }
}

/// Commits a batch and answers each change. When the batch fails for a reason other than an
/// unreachable database, each change is retried alone, so one change the database rejects
/// cannot fail the others.
async fn commit(backend: &Backend, batch: Vec<Queued>) {
    tracing::debug!(size = batch.len(), "committing a batch");
    let changes: Vec<&Validated> = batch.iter().map(|q| &q.validated).collect();
    match backend.apply(&changes).await {
        Ok(outcomes) => {
            for (queued, outcome) in batch.into_iter().zip(outcomes) {
                // A requester that went away still has its change applied; nobody to tell.
                let _ = queued.reply.send(outcome);
            }
        }
        Err(err) if batch.len() > 1 && !matches!(err, StoreError::Unavailable(_)) => {
            tracing::warn!(error = %err, size = batch.len(), "batch failed; retrying its changes one by one");
            for queued in batch {
                let outcome = match backend.apply(&[&queued.validated]).await {
                    Ok(mut outcomes) => outcomes.pop().unwrap_or_else(|| Err(writer_gone())),
                    Err(err) => Err(err),
                };
                let _ = queued.reply.send(outcome);
            }
        }
        Err(err) => {
            for queued in batch {
                let _ = queued.reply.send(Err(err.clone()));
            }
        }
    }
}

impl Backend {
    /// Runs one batch in a fresh write transaction.
    async fn apply(&self, batch: &[&Validated]) -> Result<Vec<Outcome>, StoreError> {
        match self {
            Self::Sqlite(db) => ledger::apply(db.begin_write().await?, batch).await,
            Self::Postgres(db) => ledger::apply(db.begin().await?, batch).await,
        }
    }
}
