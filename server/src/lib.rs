//! The livecredits server as a library, so `main`, the CLI and the tests share one code path.
//!
//! - [`config`] — settings from the environment
//! - [`state`] — the shared handles built from them at start-up
//! - [`store`] — the ledger on SQLite or PostgreSQL
//! - [`auth`] — user tokens, service credentials, dev sign-in
//! - [`api`] — the JSON API under `/api/`
//! - [`routes`] — the router that assembles every feature module
//! - [`health`] — liveness
//! - [`error`] — the API's error type and JSON extractors
//! - [`shutdown`] — the signal that starts a graceful stop

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod health;
pub mod routes;
pub mod shutdown;
pub mod state;
pub mod store;

use std::future::Future;

use tokio::net::TcpListener;

pub use config::Config;
pub use state::{AppState, StartError};

/// Serves the app on `listener` until `shutdown` completes, then drains open requests.
///
/// # Errors
/// When the listener fails in a way axum cannot recover from.
pub async fn run(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, routes::router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
