//! The request/response API under `/api/` (SPEC §5): balance and ledger for users, changes
//! for services, and the dev-mode routes. Every answer is JSON, errors included.

mod changes;
mod credits;
mod dev;
mod holds;
mod session;

use axum::{Router, extract::DefaultBodyLimit, routing::any};

use crate::{AppState, error};

/// Every `/api/` route; dev routes only when dev mode is on, so they are 404 otherwise.
pub fn router(dev_login: bool) -> Router<AppState> {
    let api = Router::new()
        .merge(credits::router())
        .merge(changes::router())
        .merge(holds::router())
        .merge(session::router());
    let api = if dev_login {
        api.merge(dev::router())
    } else {
        api
    };
    // The wildcard needs a segment, so the bare prefix is listed too.
    api.route("/api", any(error::api_not_found))
        .route("/api/", any(error::api_not_found))
        .route("/api/{*rest}", any(error::api_not_found))
        .layer(DefaultBodyLimit::max(error::MAX_BODY_BYTES))
}
