//! Dev mode only (`LIVECREDITS_DEV_LOGIN=1`): sign in as any user id, and change one's own
//! balance from the debug page. Never mounted otherwise.

use app::wire::{
    CaptureRequest, DEFAULT_HOLD_TTL_S, DevCreditRequest, DevHoldRequest, DevLoginRequest,
    DevLoginResponse, paths,
};
use axum::{
    Json, Router,
    extract::{Path, State},
    http::StatusCode,
    response::Response,
    routing::post,
};
use axum_extra::extract::CookieJar;

use super::{changes::apply, holds};
use crate::{
    AppState,
    auth::{self, AuthUser},
    error::{ApiError, AppJson, OptionalJson},
    store::{NewChange, NewHold, Settle, validate_user_id},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route(paths::DEV_LOGIN, post(login))
        .route(paths::DEV_CREDITS, post(credits))
        .route(paths::DEV_HOLDS, post(place_hold))
        .route(paths::DEV_HOLD_CAPTURE, post(capture_hold))
        .route(paths::DEV_HOLD_RELEASE, post(release_hold))
}

async fn login(
    State(state): State<AppState>,
    jar: CookieJar,
    AppJson(request): AppJson<DevLoginRequest>,
) -> Result<(CookieJar, Json<DevLoginResponse>), ApiError> {
    validate_user_id(&request.user_id)?;
    let (token, expires_at) = state
        .auth
        .mint_user_token(&request.user_id, state.config.dev_session_ttl)?;
    let cookie = auth::session_cookie(
        token.clone(),
        expires_at,
        state.config.public_url.is_https(),
    );
    let body = DevLoginResponse {
        token,
        user_id: request.user_id,
        expires_at,
    };
    Ok((jar.add(cookie), Json(body)))
}

async fn credits(
    State(state): State<AppState>,
    caller: AuthUser,
    AppJson(request): AppJson<DevCreditRequest>,
) -> Result<Response, ApiError> {
    let change = NewChange {
        user_id: caller.user.user_id,
        amount: request.amount,
        kind: request.kind,
        metadata: request.metadata.unwrap_or_default(),
        idempotency_key: None,
    };
    apply(&state, &change).await
}

async fn place_hold(
    State(state): State<AppState>,
    caller: AuthUser,
    AppJson(request): AppJson<DevHoldRequest>,
) -> Result<Response, ApiError> {
    let hold = NewHold {
        user_id: caller.user.user_id,
        amount: request.amount,
        ttl_s: request.ttl_s.unwrap_or(DEFAULT_HOLD_TTL_S),
        metadata: app::wire::Metadata::new(),
        idempotency_key: None,
    };
    holds::answer(state.store.place_hold(&hold).await, StatusCode::CREATED)
}

async fn capture_hold(
    State(state): State<AppState>,
    caller: AuthUser,
    Path(id): Path<String>,
    OptionalJson(request): OptionalJson<CaptureRequest>,
) -> Result<Response, ApiError> {
    let settle = Settle::Capture(request.amount);
    holds::settle(&state, &id, settle, Some(&caller.user.user_id)).await
}

async fn release_hold(
    State(state): State<AppState>,
    caller: AuthUser,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    holds::settle(&state, &id, Settle::Release, Some(&caller.user.user_id)).await
}
