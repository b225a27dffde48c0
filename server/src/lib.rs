//! The livecredits server as a library, so `main`, the CLI and the tests share one code path.
//!
//! - [`config`] — settings from the environment
//! - [`state`] — the shared handles built from them at start-up
//! - [`store`] — the ledger on SQLite or PostgreSQL
//! - [`auth`] — user tokens, service credentials, dev sign-in
//! - [`api`] — the JSON API under `/api/`
//! - [`bus`] — carries committed changes to every instance's hub
//! - [`realtime`] — the hub and the WebSocket, SSE and long-poll transports
//! - [`pages`] — the page context every server render starts from
//! - [`routes`] — the router that assembles every feature module
//! - [`listener`] — the connection-capped accept loop
//! - [`stream_conn`] — event streams served without hyper's per-connection buffers
//! - [`health`], [`metrics`] — readiness and Prometheus metrics
//! - [`error`] — the API's error type and JSON extractors
//! - [`shutdown`] — the signal that starts a graceful stop

pub mod api;
pub mod auth;
pub mod bus;
pub mod config;
pub mod error;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod pages;
pub mod realtime;
pub mod routes;
pub mod shutdown;
pub mod state;
pub mod store;
pub mod stream_conn;

use std::{future::Future, time::Duration};

use tokio::net::TcpListener;

pub use config::Config;
pub use state::{AppState, StartError};

/// Longest a graceful stop may take before the process exits anyway (SPEC §5: 10 s).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// Serves the app on `listener` until `signal` completes, then stops gracefully: no new
/// connections, live connections told to reconnect elsewhere, in-flight requests finished.
///
/// # Errors
/// When the listener fails in a way axum cannot recover from.
pub async fn run(
    state: AppState,
    listener: TcpListener,
    signal: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let shutdown = state.shutdown.clone();
    let trigger = shutdown.clone();
    let hub = state.hub.clone();
    let tasks = state.tasks.clone();
    let max_connections = state.max_connections;
    let router = routes::router(state);
    let triage = stream_conn::Triage::new(router.clone(), tasks.clone());
    let listener = listener::LimitedListener::new(listener, max_connections, triage);
    // A make-service hands each connection a cheap clone of the router; serving the `Router`
    // itself would copy every route per connection (~10 KiB).
    let app = router.into_make_service();
    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
        signal.await;
        // Closing the hub ends every live connection and answers held long-polls.
        hub.close();
        trigger.cancel();
    });
    let stopped = async {
        serve.await?;
        tasks.close();
        tasks.wait().await;
        Ok(())
    };
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        tracing::warn!("graceful stop took too long; exiting");
    };
    tokio::select! {
        result = stopped => result,
        () = deadline => Ok(()),
    }
}
