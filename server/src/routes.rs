//! The single place where every route and layer is assembled.

use app::{App, shell, wire::ErrorCode};
use axum::{
    Router,
    extract::{Request, State},
    handler::Handler,
    http::{HeaderValue, Method, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use leptos_axum::{LeptosRoutes, generate_route_list};
use tower_http::{
    cors::{AllowOrigin, CorsLayer},
    trace::TraceLayer,
};
use tracing::Span;

use crate::{
    AppState, api,
    error::{self, ApiError},
    health, metrics, pages, realtime, security,
};

/// The whole application: API, health, the Leptos pages and static files.
pub fn router(state: AppState) -> Router {
    // Pages get the session by route; unmatched paths (static files, the not-found page)
    // only when they ask for HTML.
    let not_found = leptos_axum::file_and_error_handler::<AppState, _>(shell).layer(
        middleware::from_fn_with_state(state.clone(), pages::with_not_found_context),
    );
    let site = Router::new()
        .leptos_routes(&state, generate_route_list(App), {
            let options = state.leptos.clone();
            move || shell(options.clone())
        })
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            pages::with_page_context,
        ))
        .fallback(not_found)
        .layer(middleware::from_fn(security::page_headers));
    // Applied to the API and realtime routes together so a wrong method on any of them,
    // `/api/credits/sse` included, answers an `ApiError` rather than an empty 405.
    let api_routes = Router::new()
        .merge(realtime::router())
        .merge(api::router(state.config.dev_login))
        .method_not_allowed_fallback(error::api_method_not_allowed);
    let router = Router::new()
        .merge(health::router())
        .merge(metrics::router())
        .merge(api_routes)
        .merge(site)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_while_stopping,
        ))
        .layer(cors(&state.config.allowed_origins))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state.clone());
    security::every_response(router, &state.config.public_url)
}

/// CORS for the origins in `CORS_ORIGINS`; with none listed, only same-origin pages may call
/// the API from a browser (no CORS headers at all).
fn cors(origins: &[String]) -> CorsLayer {
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|origin| HeaderValue::from_str(origin).ok())
        .collect();
    if origins.is_empty() {
        return CorsLayer::new();
    }
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .allow_credentials(true)
}

/// Once shutdown has begun, requests still arriving on open keep-alive connections get 503
/// and `Connection: close`, so clients go to another instance.
async fn refuse_while_stopping(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if !state.shutdown.is_begun() {
        return next.run(request).await;
    }
    let mut response =
        ApiError::new(ErrorCode::Unavailable, "the server is shutting down").into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Logs method and path only: query strings may carry tokens and never reach the logs.
fn request_span<B>(request: &axum::http::Request<B>) -> Span {
    tracing::info_span!("request", method = %request.method(), path = %request.uri().path())
}
