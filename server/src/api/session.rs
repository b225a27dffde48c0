//! Browser sessions: sign in with a JWT from the identity provider (the server keeps it in
//! the HttpOnly session cookie, out of reach of page scripts), and sign out.

use app::wire::{ErrorCode, SessionInfo, SessionRequest, paths};
use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use axum_extra::extract::CookieJar;

use crate::{
    AppState,
    auth::{self, Identity},
    error::{ApiError, AppJson},
    pages,
};

pub fn router() -> Router<AppState> {
    Router::new().route(paths::SESSION, post(sign_in).delete(sign_out))
}

async fn sign_in(
    State(state): State<AppState>,
    jar: CookieJar,
    AppJson(request): AppJson<SessionRequest>,
) -> Result<(CookieJar, Json<SessionInfo>), ApiError> {
    if let Identity::Service = state.auth.identify(&request.token).await? {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "a service credential is not a user",
        ));
    }
    let session = pages::session(&state, &request.token)
        .await
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "invalid token"))?;
    let cookie = auth::session_cookie(
        request.token,
        session.expires_at,
        state.config.public_url.is_https(),
    );
    Ok((jar.add(cookie), Json(session)))
}

async fn sign_out(jar: CookieJar) -> (CookieJar, StatusCode) {
    (
        jar.remove(auth::session_cookie_removal()),
        StatusCode::NO_CONTENT,
    )
}
