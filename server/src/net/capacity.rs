//! The accept loop's guard against running out of file descriptors: one permit per open
//! connection, and no accepting at the instance's capacity, which leaves further clients in
//! the kernel's backlog instead of failing with EMFILE.

use std::{sync::Arc, time::Duration};

use rustix::process::{Resource, getrlimit, setrlimit};
use tokio::{net::TcpListener, sync::Semaphore};

use super::Conn;

/// Descriptors kept back from connections for database pools, Redis, logs and files.
const RESERVED_FDS: u64 = 256;

/// Raises the soft open-files limit to the hard one; returns the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(err) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(%err, "cannot raise the open-files limit");
            limit = getrlimit(Resource::Nofile);
        }
    }
    limit.current.unwrap_or(1 << 20)
}

/// How many connections fit under the (raised) open-files limit, less a reserve.
pub fn connection_capacity() -> usize {
    let files = raise_open_files_limit();
    usize::try_from(files.saturating_sub(RESERVED_FDS).max(16)).unwrap_or(usize::MAX)
}

/// The open-connection slots of one listener.
pub(super) struct Permits(Arc<Semaphore>);

impl Permits {
    pub(super) fn new(capacity: usize) -> Self {
        Self(Arc::new(Semaphore::new(capacity)))
    }

    /// Accepts the next connection once a slot is free; the connection holds the slot until
    /// it closes. Cancel-safe: dropped before a connection arrives, it loses nothing.
    pub(super) async fn accept(&self, listener: &TcpListener) -> Conn {
        let permit = Arc::clone(&self.0)
            .acquire_owned()
            .await
            .expect("the permit semaphore is never closed");
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    // Small frames must leave at once; latency is the product.
                    let _ = stream.set_nodelay(true);
                    return Conn::new(stream, permit);
                }
                Err(err) => {
                    // EMFILE and friends: wait for descriptors to free up, never crash.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}
