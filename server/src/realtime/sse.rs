//! `GET /api/credits/sse`: `event: balance` frames with `id:` = version, first the snapshot
//! (unless `Last-Event-ID` already is the current version), then one per change; a comment
//! heartbeat; `auth_expired` before the stream ends when the token expires.

use std::{convert::Infallible, time::Duration};

use app::wire::{BalanceEvent, close, paths};
use axum::{
    Router,
    extract::State,
    http::{HeaderMap, HeaderName, HeaderValue, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use futures::Stream;
use tokio::time::sleep_until;

use super::{Update, hub::Transport, instant_of, subscription::Subscription};
use crate::{AppState, auth::AuthUser, error::ApiError};

/// How long a browser waits before reconnecting a dropped stream.
const RETRY: Duration = Duration::from_secs(3);

pub fn router() -> Router<AppState> {
    Router::new().route(paths::SSE, get(stream))
}

async fn stream(
    State(state): State<AppState>,
    caller: AuthUser,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user = caller.user;
    let (subscription, snapshot) = state
        .hub
        .open(&state.store, &user.user_id, Transport::Sse)
        .await?;
    let resumed_at = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok());
    let first = (resumed_at != Some(snapshot.version))
        .then(|| balance_frame(&Update::new(BalanceEvent::snapshot(snapshot))));

    let events = frames(state.clone(), subscription, first, user.expires_at);
    let sse = Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(state.realtime.sse_heartbeat)
            .text("heartbeat"),
    );
    Ok((
        [
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        sse,
    )
        .into_response())
}

fn balance_frame(update: &Update) -> Event {
    Event::default()
        .event("balance")
        .id(update.event.version.to_string())
        .data(update.json.as_str())
}

/// What ends the wait for the next frame.
enum Next {
    /// A change, or `None` once the hub closes for shutdown.
    Update(Option<std::sync::Arc<Update>>),
    Expired,
}

fn frames(
    state: AppState,
    mut subscription: Subscription,
    first: Option<Event>,
    expires_at: chrono::DateTime<chrono::Utc>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream::stream! {
        yield Ok(Event::default().retry(RETRY));
        if let Some(first) = first {
            yield Ok(first);
        }
        let expiry = sleep_until(instant_of(expires_at));
        tokio::pin!(expiry);
        loop {
            let next = tokio::select! {
                update = subscription.next() => Next::Update(update),
                () = &mut expiry => Next::Expired,
            };
            match next {
                Next::Update(Some(update)) => {
                    yield Ok(balance_frame(&update));
                    state.metrics.delivered(Transport::Sse, update.event.change.as_ref().map(|c| c.created_at));
                }
                Next::Expired => {
                    yield Ok(Event::default().event(close::SSE_AUTH_EXPIRED).data(r#"{"error":"token_expired"}"#));
                    break;
                }
                Next::Update(None) => break,
            }
        }
    }
}
