//! Liveness and readiness (SPEC §5). Readiness is `ready`, `degraded` (200, so a load
//! balancer keeps an instance whose polling and local delivery still work) or 503 when the
//! ledger is unreachable.

use app::wire::paths;
use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde_json::{Value, json};

use crate::AppState;

/// `GET /healthz` and `GET /readyz`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(paths::HEALTHZ, get(healthz))
        .route(paths::READYZ, get(readyz))
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if let Err(err) = state.store.ping().await {
        tracing::warn!(%err, "not ready: database unreachable");
        let body = json!({ "status": "unavailable", "reasons": ["database"] });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body));
    }
    let reasons = state.bus.degraded_reasons();
    let body = if reasons.is_empty() {
        json!({ "status": "ready" })
    } else {
        json!({ "status": "degraded", "reasons": reasons })
    };
    (StatusCode::OK, Json(body))
}
