//! Liveness: answers as long as the process can serve HTTP.

use axum::{Json, Router, routing::get};
use serde_json::{Value, json};

use crate::AppState;

/// `GET /healthz`.
pub fn router() -> Router<AppState> {
    Router::new().route("/healthz", get(healthz))
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}
