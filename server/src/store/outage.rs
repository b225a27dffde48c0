//! Failing fast while PostgreSQL is unreachable. Without this, every request that arrives
//! during an outage makes its own connection attempt and queues for the pool's permits, so
//! it is answered 503 only after up to the acquire timeout: in a 5 s cut under 500 changes/s
//! the soak saw 503s after 1.3–2.5 s, clients holding ~1,200 extra connections per instance
//! for it, and the heap doubling. Once an operation finds the database unavailable, one
//! operation at a time (the probe) still tries it, and every other gets the probe's last
//! error at once, until an operation succeeds.

use std::{
    future::Future,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::sync::Semaphore;

use super::StoreError;

#[derive(Debug)]
pub(super) struct Outage {
    /// Set while the last operation to finish found the database unavailable; the fast path
    /// of a healthy database reads only this.
    down: AtomicBool,
    /// Why, for the operations answered without trying.
    cause: Mutex<Option<StoreError>>,
    probe: Semaphore,
}

impl Default for Outage {
    fn default() -> Self {
        Self {
            down: AtomicBool::new(false),
            cause: Mutex::new(None),
            probe: Semaphore::new(1),
        }
    }
}

impl Outage {
    /// Runs `operation` unless the database is down and another operation is already finding
    /// out whether it is back; records what the outcome says about the database.
    pub(super) async fn guard<T>(
        &self,
        operation: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        let _probe = if self.down.load(Ordering::Acquire) {
            match self.probe.try_acquire() {
                Ok(permit) => Some(permit),
                Err(_) => match self.cause() {
                    Some(cause) => return Err(cause),
                    None => None,
                },
            }
        } else {
            None
        };
        let outcome = operation.await.map_err(StoreError::from);
        match &outcome {
            Err(err @ StoreError::Unavailable(_)) => {
                *self.lock() = Some(err.clone());
                if !self.down.swap(true, Ordering::AcqRel) {
                    tracing::warn!(%err, "database unavailable; answering 503 at once until it is back");
                }
            }
            // Any other answer came from the database, so it is reachable.
            _ => {
                if self.down.swap(false, Ordering::AcqRel) {
                    tracing::info!("database reachable again");
                }
            }
        }
        outcome
    }

    fn cause(&self) -> Option<StoreError> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<StoreError>> {
        self.cause.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn refused() -> sqlx::Error {
        sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into())
    }

    #[tokio::test]
    async fn while_down_one_operation_probes_and_the_rest_fail_at_once() {
        let outage = Arc::new(Outage::default());
        assert!(outage.guard(async { Ok(1) }).await.is_ok());
        assert!(matches!(
            outage.guard(async { Err::<(), _>(refused()) }).await,
            Err(StoreError::Unavailable(_))
        ));

        // A probe is in flight: the next operation is answered without being run.
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let probe = tokio::spawn({
            let outage = outage.clone();
            async move {
                outage
                    .guard(async {
                        let _ = released.await;
                        Ok(2)
                    })
                    .await
            }
        });
        while outage.probe.available_permits() == 1 {
            tokio::task::yield_now().await;
        }
        let ran = AtomicBool::new(false);
        let answer = outage
            .guard(async {
                ran.store(true, Ordering::Relaxed);
                Ok(3)
            })
            .await;
        assert!(matches!(answer, Err(StoreError::Unavailable(_))));
        assert!(
            !ran.load(Ordering::Relaxed),
            "not run while the probe is out"
        );

        // The probe succeeds, and every operation runs again.
        release.send(()).expect("probe waiting");
        assert_eq!(probe.await.expect("probe task").expect("probe"), 2);
        assert_eq!(outage.guard(async { Ok(4) }).await.expect("back"), 4);
    }

    #[tokio::test]
    async fn refusals_from_a_reachable_database_do_not_count() {
        let outage = Outage::default();
        let refused = outage
            .guard(async { Err::<(), _>(sqlx::Error::RowNotFound) })
            .await;
        assert!(matches!(refused, Err(StoreError::Database(_))));
        assert!(!outage.down.load(Ordering::Relaxed));
    }
}
