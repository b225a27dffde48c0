//! The single place where every route and layer is assembled.

use app::{App, shell};
use axum::{Router, http::Request};
use leptos_axum::{LeptosRoutes, generate_route_list};
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::{AppState, api, health};

/// The whole application: API, health, the Leptos pages and static files.
pub fn router(state: AppState) -> Router {
    let pages = generate_route_list(App);
    Router::new()
        .merge(health::router())
        .merge(api::router(state.config.dev_login))
        .leptos_routes(&state, pages, {
            let options = state.leptos.clone();
            move || shell(options.clone())
        })
        .fallback(leptos_axum::file_and_error_handler::<AppState, _>(shell))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state)
}

/// Logs method and path only: query strings may carry tokens and never reach the logs.
fn request_span<B>(request: &Request<B>) -> Span {
    tracing::info_span!("request", method = %request.method(), path = %request.uri().path())
}
