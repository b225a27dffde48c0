//! Balance changes requested by a service (SPEC §5 `POST /api/credits/changes`).

use app::wire::{ChangeRequest, paths};
use axum::{
    Json, Router,
    extract::State,
    http::{HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};

use crate::{
    AppState,
    auth::ServiceCaller,
    error::{ApiError, AppJson},
    store::{Applied, NewChange},
};

/// Set on the answer to a repeated change: the original result, nothing applied again.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

pub fn router() -> Router<AppState> {
    Router::new().route(paths::CHANGES, post(create))
}

async fn create(
    State(state): State<AppState>,
    _service: ServiceCaller,
    AppJson(request): AppJson<ChangeRequest>,
) -> Result<Response, ApiError> {
    apply(&state, &NewChange::from(request)).await
}

/// Applies `change` and answers: 201 with the event for a new change (the store hands it to
/// the bus), 200 with `Idempotent-Replayed: true` for a replay, which publishes nothing.
pub async fn apply(state: &AppState, change: &NewChange) -> Result<Response, ApiError> {
    Ok(match state.store.apply(change).await? {
        Applied::New(event) => (StatusCode::CREATED, Json(event)).into_response(),
        Applied::Replayed(event) => (
            StatusCode::OK,
            [(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"))],
            Json(event),
        )
            .into_response(),
    })
}
