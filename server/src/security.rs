//! Response headers for browsers (SPEC §10): `nosniff` on every response, HSTS when the
//! public URL is https, and on HTML pages a Content-Security-Policy whose scripts are
//! allowed by a nonce made for each response, with no framing and a same-origin referrer.

use axum::{
    Router,
    extract::Request,
    http::{HeaderValue, header},
    middleware::Next,
    response::Response,
};
use leptos::nonce::Nonce;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::config::PublicUrl;

/// How long browsers keep to https once told (one year, the usual preload minimum).
const HSTS: &str = "max-age=31536000";
/// Pages never tell other sites which page linked to them; API URLs may carry tokens.
const REFERRER_POLICY: &str = "same-origin";

/// `nosniff` on every response of `router`, and HSTS when browsers come over https.
pub fn every_response(router: Router, public_url: &PublicUrl) -> Router {
    let router = router.layer(SetResponseHeaderLayer::overriding(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    ));
    if !public_url.is_https() {
        return router;
    }
    router.layer(SetResponseHeaderLayer::overriding(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static(HSTS),
    ))
}

/// Middleware for the page routes: gives the render a fresh nonce (the shell puts it on the
/// scripts it writes) and sends the policy that admits exactly those scripts.
pub async fn page_headers(mut request: Request, next: Next) -> Response {
    let nonce = Nonce::new();
    request.extensions_mut().insert(nonce.clone());
    let mut response = next.run(request).await;
    if is_html(&response) {
        let headers = response.headers_mut();
        if let Ok(policy) = HeaderValue::from_str(&content_security_policy(&nonce)) {
            headers.insert(header::CONTENT_SECURITY_POLICY, policy);
        }
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static(REFERRER_POLICY),
        );
    }
    response
}

fn is_html(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/html"))
}

/// Same-origin everything; scripts only from the site or with this response's nonce, and
/// WebAssembly compiled from them; no plugins, no `<base>` tricks, no framing.
fn content_security_policy(nonce: &Nonce) -> String {
    format!(
        "default-src 'self'; script-src 'self' 'nonce-{nonce}' 'wasm-unsafe-eval'; \
         style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; \
         base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
}
