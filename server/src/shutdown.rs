//! Graceful stop, in one place. On SIGTERM or Ctrl-C ([`signal`]) [`crate::run`] calls
//! [`Shutdown::begin`], closes the hub, then [`Shutdown::drain`]s. The steps, in order, and
//! the SPEC §5 line each serves:
//!
//! 1. Stop accepting connections — "stops accepting connections": the accept loop in
//!    [`crate::net`] ends and drops the listener.
//! 2. Refuse new requests on open keep-alive connections — "answering `503 unavailable` with
//!    `Connection: close`": `routes::refuse_while_stopping`, and hyper is told to close each
//!    connection once its request in flight is answered ([`crate::net`]).
//! 3. End live connections so clients reconnect elsewhere — "answers held long-polls with the
//!    current snapshot, closes WebSockets with 1012 and ends SSE streams": closing
//!    [`crate::realtime::hub::Hub`] ends every subscription, and `realtime::{poll, ws, sse}`
//!    each answer it their way.
//! 4. Let in-flight changes finish and answer — "no change is committed without its response
//!    being sent": every connection is a tracked task, and [`Shutdown::drain`] waits for them.
//! 5. Exit 0 within 10 s — [`Shutdown::drain`] gives up after [`GRACE`]; `main` exits 0.

use std::{future::Future, time::Duration};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Longest a graceful stop may take before the process exits anyway (SPEC §5: 10 s, less a
/// margin for the runtime to wind down).
pub const GRACE: Duration = Duration::from_secs(8);

/// The instance's stop switch and the tasks a stop waits for; clones share both.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    begun: CancellationToken,
    tasks: TaskTracker,
}

impl Shutdown {
    /// Starts the stop: everything waiting on [`Shutdown::begun`] wakes.
    pub fn begin(&self) {
        self.begun.cancel();
    }

    /// Whether the stop has begun.
    pub fn is_begun(&self) -> bool {
        self.begun.is_cancelled()
    }

    /// Completes once the stop has begun.
    pub async fn begun(&self) {
        self.begun.cancelled().await;
    }

    /// The stop as a token, for background tasks that end with it (the Redis link).
    pub fn token(&self) -> CancellationToken {
        self.begun.clone()
    }

    /// Runs `task` (a connection, a WebSocket session) as one that [`Shutdown::drain`]
    /// waits for.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// The tracker alone, for a task spawned elsewhere (a WebSocket session, which axum
    /// spawns) that [`Shutdown::drain`] must wait for; half the size of a `Shutdown` to keep.
    pub fn tracker(&self) -> TaskTracker {
        self.tasks.clone()
    }

    /// Waits for every tracked task to end, for at most [`GRACE`]. Returns whether they all
    /// did.
    pub async fn drain(&self) -> bool {
        self.tasks.close();
        let drained = tokio::time::timeout(GRACE, self.tasks.wait()).await.is_ok();
        if !drained {
            tracing::warn!(
                left = self.tasks.len(),
                "graceful stop took too long; exiting"
            );
        }
        drained
    }
}

/// Completes on Ctrl-C or SIGTERM, whichever comes first. The handlers are installed when
/// this is called, not when first polled: `main` calls it before announcing that it
/// listens, so a SIGTERM sent the moment it is announced still stops the server gracefully
/// instead of killing it.
pub fn signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let listen = |kind: SignalKind, name: &'static str| {
        let handler = signal(kind);
        async move {
            match handler {
                Ok(mut handler) => {
                    handler.recv().await;
                }
                Err(err) => {
                    tracing::error!(%err, "cannot listen for {name}");
                    std::future::pending::<()>().await;
                }
            }
        }
    };
    let ctrl_c = listen(SignalKind::interrupt(), "Ctrl-C");
    let terminate = listen(SignalKind::terminate(), "SIGTERM");
    async move {
        tokio::select! {
            () = ctrl_c => {}
            () = terminate => {}
        }
        tracing::info!("shutdown signal received");
    }
}
