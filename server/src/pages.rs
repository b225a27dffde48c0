//! What the server adds to every page it renders: the [`PageContext`] (dev mode, and the
//! signed-in user with their balance), read from the session cookie, so the first paint
//! shows the balance before any JavaScript runs.

use app::wire::{PageContext, SessionInfo};
use axum::{
    extract::{Request, State},
    http::{HeaderMap, Method, header},
    middleware::Next,
    response::Response,
};
use axum_extra::extract::CookieJar;

use crate::{
    AppState,
    auth::{Identity, SESSION_COOKIE},
};

/// Middleware for the page routes: puts the request's `PageContext` in its extensions,
/// where the Leptos app reads it while rendering. Every request for a page route gets it,
/// whatever its `Accept` says, so `curl` (`*/*`) sees the page a browser sees.
pub async fn with_page_context(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let context = page_context(&state, request.headers()).await;
    request.extensions_mut().insert(context);
    next.run(request).await
}

/// Middleware for paths no route matches: a static file (`/pkg/…`) or the not-found page.
/// The path cannot tell which, so only a request for HTML gets the `PageContext`, and static
/// files skip the cookie check and the database read.
pub async fn with_not_found_context(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    if wants_html(request.method(), request.headers()) {
        let context = page_context(&state, request.headers()).await;
        request.extensions_mut().insert(context);
    }
    next.run(request).await
}

fn wants_html(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::GET
        && headers
            .get(header::ACCEPT)
            .and_then(|accept| accept.to_str().ok())
            .is_some_and(|accept| accept.contains("text/html"))
}

async fn page_context(state: &AppState, headers: &HeaderMap) -> PageContext {
    let jar = CookieJar::from_headers(headers);
    let token = jar
        .get(SESSION_COOKIE)
        .map(|cookie| cookie.value().to_owned());
    let session = match token {
        Some(token) => session(state, &token).await,
        None => None,
    };
    PageContext {
        dev_login: state.config.dev_login,
        session,
        climb_interval_ms: state.config.climb_interval_ms,
    }
}

/// The user behind a session token and their balance; `None` for an invalid token.
pub async fn session(state: &AppState, token: &str) -> Option<SessionInfo> {
    let Ok(Identity::User(user)) = state.auth.identify(token).await else {
        return None;
    };
    // Without the ledger the page still renders, and the live connection fills it in.
    let balance = state.store.snapshot(&user.user_id).await.ok();
    Some(SessionInfo {
        user_id: user.user_id,
        expires_at: user.expires_at,
        balance,
    })
}
