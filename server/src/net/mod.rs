//! Every connection's life, in one place: accepted under a permit, triaged, served by hyper
//! or on the lean stream path, and cut when it stalls (SPEC §10).
//!
//! | deadline | value | where |
//! |---|---|---|
//! | first request head complete, from accept | [`HEAD_TIMEOUT`] (10 s) | triage, then hyper's header timer or [`stream`] |
//! | next request head on keep-alive, from the previous response | [`HEAD_TIMEOUT`] | hyper restarts its header timer when a connection goes idle, so an idle keep-alive connection is closed after 10 s |
//! | a write that makes no progress | [`WRITE_TIMEOUT`] (10 s) | [`Conn`], under hyper, WebSockets and streams alike |
//! | open connections | `LIVECREDITS_MAX_CONNECTIONS` (default open-files limit − 256) | [`capacity`]: one permit per connection |
//!
//! So with every slot held by clients that never finish a head, a waiting client is accepted
//! within 10 s, when the first of them is cut. Live connections (WebSocket, event streams)
//! have a complete head; their own heartbeats and token expiry bound them (`realtime`).

pub mod capacity;
mod conn;
mod stream;

use std::{io, time::Duration};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, time::Instant};

pub use capacity::{connection_capacity, raise_open_files_limit};
pub use conn::Conn;

use crate::shutdown::Shutdown;

/// Time a client has to send a complete request head: after connecting, and after each
/// response on a keep-alive connection.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A write that makes no progress for this long ends its connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on `listener` until `shutdown` begins, at most `capacity` open at
/// once, and serves each with `router`. Every connection is a task that `shutdown` drains.
pub async fn serve(listener: TcpListener, router: Router, capacity: usize, shutdown: Shutdown) {
    let permits = capacity::Permits::new(capacity);
    loop {
        let conn = tokio::select! {
            conn = permits.accept(&listener) => conn,
            () = shutdown.begun() => return,
        };
        let router = router.clone();
        let tracked = shutdown.clone();
        shutdown.spawn(triage(conn, router, tracked));
    }
}

/// Sends a connection that opens with a stream request to [`stream`], in a task of its own
/// so that an idle stream does not carry hyper's state, and serves the rest with hyper. A
/// connection that says nothing within [`HEAD_TIMEOUT`] is closed.
async fn triage(conn: Conn, router: Router, shutdown: Shutdown) {
    let deadline = Instant::now() + HEAD_TIMEOUT;
    match stream::sniff(&conn, deadline).await {
        stream::Sniffed::Stream => shutdown.spawn(stream::serve(conn, router, deadline)),
        stream::Sniffed::Other => serve_http(conn, router, deadline, shutdown).await,
        stream::Sniffed::Silent => {}
    }
}

/// Serves HTTP/1.1 with hyper until the client leaves or a deadline passes; once shutdown
/// begins, the request in flight is answered and the connection closed.
async fn serve_http(conn: Conn, router: Router, deadline: Instant, shutdown: Shutdown) {
    // The first head keeps what is left of its deadline; later heads get the full timeout
    // less what the first used, which only a client slow to start ever notices.
    let head_timeout = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .serve_connection(TokioIo::new(conn), TowerToHyperService::new(router))
        .with_upgrades();
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.begun() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        log_connection_error(&err);
    }
}

/// Timeouts and clients that vanish are routine; anything else is worth a debug line.
fn log_connection_error(err: &hyper::Error) {
    let routine = err.is_timeout()
        || err.is_incomplete_message()
        || std::error::Error::source(err)
            .and_then(|source| source.downcast_ref::<io::Error>())
            .is_some();
    if !routine {
        tracing::debug!(%err, "connection ended with an error");
    }
}
