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
//! - [`net`] — the accept loop: connection slots, deadlines, hyper and lean event streams
//! - [`security`] — response headers for browsers
//! - [`owner_only`] — local files only the server's user may read
//! - [`health`], [`metrics`] — readiness and Prometheus metrics
//! - [`error`] — the API's error type and JSON extractors
//! - [`shutdown`] — the graceful stop, step by step

pub mod api;
pub mod auth;
pub mod bus;
pub mod config;
pub mod error;
pub mod health;
pub mod metrics;
pub mod net;
pub mod owner_only;
pub mod pages;
pub mod realtime;
pub mod routes;
pub mod security;
pub mod shutdown;
pub mod state;
pub mod store;

use std::future::Future;

use tokio::net::TcpListener;

pub use config::Config;
pub use state::{AppState, StartError};

/// Serves the app on `listener` until `signal` completes, then stops gracefully
/// ([`shutdown`] lists the steps).
pub async fn run(state: AppState, listener: TcpListener, signal: impl Future<Output = ()>) {
    let shutdown = state.shutdown.clone();
    let accepting = net::serve(
        listener,
        routes::router(state.clone()),
        state.max_connections,
        shutdown.clone(),
    );
    // The signal drops the accept loop, and with it the listener: no new connections.
    tokio::select! {
        () = accepting => {}
        () = signal => {}
    }
    shutdown.begin();
    state.hub.close();
    shutdown.drain().await;
}
