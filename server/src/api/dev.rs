//! Dev mode only (`LIVECREDITS_DEV_LOGIN=1`): sign in as any user id, and change one's own
//! balance from the debug page. Never mounted otherwise.

use app::wire::{DevCreditRequest, DevLoginRequest, DevLoginResponse};
use axum::{Json, Router, extract::State, response::Response, routing::post};
use axum_extra::extract::{
    CookieJar,
    cookie::{Cookie, SameSite},
};
use chrono::Duration;

use super::changes::apply;
use crate::{
    AppState,
    auth::{AuthUser, SESSION_COOKIE},
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
    let cookie = Cookie::build((SESSION_COOKIE, token.clone()))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Lax)
        .max_age(time_span(SESSION_TTL))
        .build();
    let body = DevLoginResponse {
        token,
        user_id: request.user_id,
        expires_at,
    };
    Ok((jar.add(cookie), Json(body)))
}

fn time_span(duration: Duration) -> time::Duration {
    time::Duration::seconds(duration.num_seconds())
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
