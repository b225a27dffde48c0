//! `GET /api/credits/balance/poll`: the snapshot with a suggested polling interval, or, with
//! `version` and `wait`, a long-poll that answers the moment that version is superseded.

use std::time::Duration;

use app::wire::{BalanceSnapshot, PollResponse, paths};
use axum::{Json, Router, extract::State, routing::get};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::hub::Transport;
use crate::{
    AppState,
    auth::AuthUser,
    error::{ApiError, AppQuery},
};

/// Longest hold of a long-poll, in seconds (SPEC §5).
const MAX_WAIT_SECS: u64 = 30;
/// Bounds of the suggested interval (SPEC §5).
const MIN_INTERVAL_MS: f64 = 1_000.0;
const MAX_INTERVAL_MS: f64 = 60_000.0;

pub fn router() -> Router<AppState> {
    Router::new().route(paths::POLL, get(poll))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PollQuery {
    version: Option<u64>,
    wait: Option<u64>,
    /// Accepted so browsers can authenticate by query string; read by `AuthUser`.
    #[serde(rename = "token")]
    _token: Option<String>,
}

async fn poll(
    State(state): State<AppState>,
    caller: AuthUser,
    AppQuery(query): AppQuery<PollQuery>,
) -> Result<Json<PollResponse>, ApiError> {
    let wait = query.wait.unwrap_or(0);
    if wait > MAX_WAIT_SECS {
        return Err(ApiError::invalid("wait", "must be at most 30 seconds"));
    }
    let user_id = &caller.user.user_id;
    let snapshot = match query.version {
        Some(version) if wait > 0 => {
            hold(&state, user_id, version, Duration::from_secs(wait)).await?
        }
        _ => state.store.snapshot(user_id).await?,
    };
    let load = state.metrics.open_connections() as f64 / state.max_connections as f64;
    Ok(Json(PollResponse {
        poll_interval_ms: poll_interval_ms(snapshot.updated_at, Utc::now(), load),
        snapshot,
    }))
}

/// Holds until the user's balance moves past `version`, `wait` passes or the server stops.
async fn hold(
    state: &AppState,
    user_id: &str,
    version: u64,
    wait: Duration,
) -> Result<BalanceSnapshot, ApiError> {
    let (mut subscription, snapshot) = state
        .hub
        .open(&state.store, user_id, Transport::Poll)
        .await?;
    if u64::try_from(snapshot.version) != Ok(version) {
        return Ok(snapshot);
    }
    // `next` also returns `None` when the server shuts down: answer with the snapshot.
    let woken_by = tokio::select! {
        update = subscription.next() => update,
        () = tokio::time::sleep(wait) => None,
    };
    match woken_by {
        Some(update) => {
            let committed = update.event.change.as_ref().map(|c| c.created_at);
            state.metrics.delivered(Transport::Poll, committed);
            Ok(update.event.to_snapshot())
        }
        None => Ok(state.store.snapshot(user_id).await?),
    }
}

/// The suggested interval before the next poll, within 1–60 s:
/// - a balance that changed in the last 30 s is *active*: 1 s, so a burst of changes shows;
/// - one that changed in the last 10 minutes: 5 s;
/// - otherwise *idle*: 15 s;
///
/// then stretched by load, × (1 + 3 × `load`), where `load` is the share of this instance's
/// connection capacity in use, so a busy instance sheds polling traffic (up to 4×).
pub fn poll_interval_ms(updated_at: Option<DateTime<Utc>>, now: DateTime<Utc>, load: f64) -> u32 {
    let since_change = updated_at.map(|at| now - at);
    let base = match since_change {
        Some(age) if age <= chrono::Duration::seconds(30) => 1_000.0,
        Some(age) if age <= chrono::Duration::minutes(10) => 5_000.0,
        _ => 15_000.0,
    };
    let stretched = base * (1.0 + 3.0 * load.clamp(0.0, 1.0));
    stretched.clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Active balances poll fast, idle ones slowly, and load stretches both within bounds.
    #[test]
    fn interval_policy() {
        let now = Utc::now();
        let ago = |secs| Some(now - chrono::Duration::seconds(secs));
        assert_eq!(poll_interval_ms(ago(5), now, 0.0), 1_000);
        assert_eq!(poll_interval_ms(ago(120), now, 0.0), 5_000);
        assert_eq!(poll_interval_ms(ago(3_600), now, 0.0), 15_000);
        assert_eq!(poll_interval_ms(None, now, 0.0), 15_000);
        assert_eq!(poll_interval_ms(ago(5), now, 0.5), 2_500);
        assert_eq!(poll_interval_ms(None, now, 1.0), 60_000);
        assert_eq!(poll_interval_ms(None, now, 7.0), 60_000);
    }
}
