//! Dev mode only (`LIVECREDITS_DEV_LOGIN=1`): sign in as any user id, and change one's own
//! balance from the debug page. Never mounted otherwise.

use app::wire::{DevCreditRequest, DevLoginRequest, DevLoginResponse};
use axum::{Json, Router, extract::State, response::Response, routing::post};
use axum_extra::extract::CookieJar;
use chrono::Duration;

use super::changes::apply;
use crate::{
    AppState,
    auth::{self, AuthUser},
    error::{ApiError, AppJson},
    store::{NewChange, validate_user_id},
};

/// How long a dev session lasts.
const SESSION_TTL: Duration = Duration::hours(24);

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/dev/login", post(login))
        .route("/api/dev/credits", post(credits))
}

async fn login(
    State(state): State<AppState>,
    jar: CookieJar,
    AppJson(request): AppJson<DevLoginRequest>,
) -> Result<(CookieJar, Json<DevLoginResponse>), ApiError> {
    validate_user_id(&request.user_id)?;
    let (token, expires_at) = state.auth.mint_user_token(&request.user_id, SESSION_TTL)?;
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
