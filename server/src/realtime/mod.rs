//! Live delivery (SPEC §5): the per-instance [`hub`], each connection's in-order
//! [`subscription`], and three thin transports over them — [`ws`], [`sse`] and long-polling
//! in [`poll`]. Transports open a subscription with its snapshot through the hub, send the
//! snapshot, then encode each newer event; they never touch the bus or each other.

pub mod hub;
mod poll;
mod sse;
pub mod subscription;
mod ws;

use std::time::Duration;

use app::wire::BalanceEvent;
use axum::{Router, extract::ws::Utf8Bytes, http::HeaderMap};

use crate::{
    AppState,
    config::{PublicUrl, normalize_origin},
};

/// A committed change as the hub fans it out: the event and its JSON, encoded once for
/// every connection that sends it.
#[derive(Debug)]
pub struct Update {
    pub event: BalanceEvent,
    pub json: Utf8Bytes,
}

impl Update {
    /// Encodes `event` once.
    pub fn new(event: BalanceEvent) -> Self {
        let json = serde_json::to_string(&event).expect("a BalanceEvent always serialises");
        Self {
            event,
            json: json.into(),
        }
    }
}

/// Timings and limits of live connections; the defaults are SPEC §5's.
#[derive(Clone, Copy, Debug)]
pub struct RealtimeConfig {
    /// WebSocket protocol ping interval.
    pub ping_interval: Duration,
    /// A WebSocket peer silent this long is closed.
    pub idle_timeout: Duration,
    /// SSE comment heartbeat interval.
    pub sse_heartbeat: Duration,
    /// Per-user limits.
    pub limits: hub::Limits,
}

impl Default for RealtimeConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(45),
            sse_heartbeat: Duration::from_secs(15),
            limits: hub::Limits {
                live_per_user: 32,
                polls_per_user: 8,
            },
        }
    }
}

/// `/ws`, `/api/credits/sse` and `/api/credits/balance/poll`.
pub fn router() -> Router<AppState> {
    Router::new()
        .merge(ws::router())
        .merge(sse::router())
        .merge(poll::router())
}

/// Whether a cookie-authenticated browser request comes from a page allowed to use the
/// session: the public URL's origin or one listed in `CORS_ORIGINS`, compared by scheme, host
/// and port. Without an https public URL, a page of the request's own host also passes, so
/// `localhost` and `127.0.0.1` both work in development.
fn origin_allowed(headers: &HeaderMap, public_url: &PublicUrl, allowed: &[String]) -> bool {
    let Some(origin) = headers.get("origin").and_then(|v| v.to_str().ok()) else {
        // Non-browser clients send no Origin; a browser's WebSocket always does.
        return true;
    };
    let Some(origin) = normalize_origin(origin) else {
        return false;
    };
    if origin == public_url.origin() || allowed.contains(&origin) {
        return true;
    }
    !public_url.is_https()
        && headers
            .get("host")
            .and_then(|v| v.to_str().ok())
            .and_then(|host| normalize_origin(&format!("http://{host}")))
            .is_some_and(|own| own == origin)
}

/// The tokio instant at which the wall-clock time `at` arrives (now, if it has passed); used
/// to end live connections when their token expires.
fn instant_of(at: chrono::DateTime<chrono::Utc>) -> tokio::time::Instant {
    let remaining = (at - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::Instant::now() + remaining
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("host", host.parse().unwrap());
        if let Some(origin) = origin {
            headers.insert("origin", origin.parse().unwrap());
        }
        headers
    }

    fn public(url: &str) -> PublicUrl {
        let config = crate::Config::from_lookup(|name| match name {
            "JWT_SECRET" => Some("0123456789abcdef0123456789abcdef".into()),
            "LIVECREDITS_PUBLIC_URL" => Some(url.into()),
            _ => None,
        })
        .expect("valid");
        config.public_url
    }

    /// Over http: the public origin, the request's own host and listed origins pass; any
    /// other site or port is refused.
    #[test]
    fn origin_check_over_http() {
        let url = public("http://127.0.0.1:3000");
        let allowed = vec!["https://app.example".to_owned()];
        let ok = |origin, host| origin_allowed(&headers(origin, host), &url, &allowed);
        assert!(ok(Some("http://127.0.0.1:3000"), "127.0.0.1:3000"));
        assert!(ok(Some("http://localhost:3000"), "localhost:3000"));
        assert!(ok(Some("https://app.example"), "api.example"));
        assert!(ok(Some("https://APP.example:443"), "api.example"));
        assert!(!ok(Some("https://evil.example"), "127.0.0.1:3000"));
        assert!(!ok(Some("http://127.0.0.1:3001"), "127.0.0.1:3000"));
        assert!(!ok(Some("null"), "127.0.0.1:3000"));
        assert!(ok(None, "127.0.0.1:3000"));
    }

    /// Over https, scheme, host and port must match the public URL or a listed origin; the
    /// Host header, which a proxy may rewrite, vouches for nothing.
    #[test]
    fn origin_check_over_https() {
        let url = public("https://credits.example");
        let ok = |origin, host| origin_allowed(&headers(origin, host), &url, &[]);
        assert!(ok(Some("https://credits.example"), "10.0.0.5:3000"));
        assert!(!ok(Some("http://credits.example"), "credits.example"));
        assert!(!ok(Some("https://credits.example:8443"), "credits.example"));
        assert!(!ok(Some("http://10.0.0.5:3000"), "10.0.0.5:3000"));
    }
}
