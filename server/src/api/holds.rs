//! Holds (SPEC §12): a service reserves credits before work and captures or releases them
//! after; a user lists their active holds.

use app::wire::{CaptureRequest, HoldList, HoldRequest, HoldResponse, paths};
use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};

use super::changes::IDEMPOTENT_REPLAYED;
use crate::{
    AppState,
    auth::{AuthUser, ServiceCaller},
    error::{ApiError, AppJson, OptionalJson},
    store::{Applied, NewHold, Settle, StoreError},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route(paths::HOLDS, post(place).get(list))
        .route(paths::HOLD_CAPTURE, post(capture))
        .route(paths::HOLD_RELEASE, post(release))
}

async fn place(
    State(state): State<AppState>,
    _service: ServiceCaller,
    AppJson(request): AppJson<HoldRequest>,
) -> Result<Response, ApiError> {
    answer(
        state.store.place_hold(&NewHold::from(request)).await,
        StatusCode::CREATED,
    )
}

async fn capture(
    State(state): State<AppState>,
    _service: ServiceCaller,
    Path(id): Path<String>,
    OptionalJson(request): OptionalJson<CaptureRequest>,
) -> Result<Response, ApiError> {
    settle(&state, &id, Settle::Capture(request.amount), None).await
}

async fn release(
    State(state): State<AppState>,
    _service: ServiceCaller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    settle(&state, &id, Settle::Release, None).await
}

async fn list(State(state): State<AppState>, caller: AuthUser) -> Result<Json<HoldList>, ApiError> {
    let items = state.store.holds(&caller.user.user_id).await?;
    Ok(Json(HoldList { items }))
}

/// Captures or releases hold `id`, only if it belongs to `owner` when one is given.
pub async fn settle(
    state: &AppState,
    id: &str,
    settle: Settle,
    owner: Option<&str>,
) -> Result<Response, ApiError> {
    answer(
        state.store.settle_hold(id, settle, owner).await,
        StatusCode::OK,
    )
}

/// `{hold, event}` with `status` for a new operation, 200 with `Idempotent-Replayed: true`
/// for a retry, which changed nothing.
pub fn answer(
    applied: Result<Applied, StoreError>,
    status: StatusCode,
) -> Result<Response, ApiError> {
    let (event, replayed) = match applied? {
        Applied::New(event) => (event, false),
        Applied::Replayed(event) => (event, true),
    };
    let hold = event
        .hold
        .as_deref()
        .cloned()
        .ok_or_else(|| StoreError::Corrupt("a hold operation without its hold".to_owned()))?;
    let body = Json(HoldResponse { hold, event });
    Ok(if replayed {
        (
            StatusCode::OK,
            [(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"))],
            body,
        )
            .into_response()
    } else {
        (status, body).into_response()
    })
}
