//! `/api/credits/sse` against a real server with a streaming HTTP client: headers, snapshot
//! and retry, `Last-Event-ID`, heartbeats, `auth_expired`, limits and shutdown.

mod common;

use std::time::Duration;

use common::{
    TestDb, config,
    live::{SseStream, TestServer},
    now_plus, sign, user_token,
};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;

async fn server() -> (TestDb, TestServer) {
    let db = TestDb::sqlite();
    let server = TestServer::start(config(&db, &[])).await;
    (db, server)
}

/// Headers per SPEC; `retry: 3000`; the snapshot first with `id:` = version; then changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_changes() {
    let (_db, server) = server().await;
    server.change("alice", 40).await;
    let mut sse = SseStream::open(&server, &user_token("alice"), None).await;
    let headers = sse.response.headers().clone();
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");

    let retry = sse.next_event().await.expect("retry frame");
    assert_eq!(retry.retry, Some(3000));
    let snapshot = sse.next_event().await.expect("snapshot");
    assert_eq!(
        (snapshot.event.as_str(), snapshot.id.as_deref()),
        ("balance", Some("1"))
    );
    let body = snapshot.json();
    assert_eq!(
        (body["type"].as_str(), body["balance"].as_i64()),
        (Some("balance"), Some(40))
    );

    server.change("alice", 2).await;
    server.change("bob", 9).await;
    server.change("alice", 3).await;
    let first = sse.next_event().await.expect("event");
    assert_eq!(
        (first.id.as_deref(), first.json()["balance"].as_i64()),
        (Some("2"), Some(42))
    );
    let second = sse.next_event().await.expect("event");
    assert_eq!(
        (second.id.as_deref(), second.json()["balance"].as_i64()),
        (Some("3"), Some(45))
    );
}

/// `Last-Event-ID` equal to the current version repeats no snapshot; an older one gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_is_honoured() {
    let (_db, server) = server().await;
    server.change("carol", 10).await;
    server.change("carol", 10).await;
    let token = user_token("carol");

    let mut current = SseStream::open(&server, &token, Some(2)).await;
    assert!(current.next_event().await.expect("retry").retry.is_some());
    server.change("carol", 1).await;
    let next = current.next_event().await.expect("event");
    assert_eq!(
        next.id.as_deref(),
        Some("3"),
        "no repeated snapshot before the change"
    );

    let mut behind = SseStream::open(&server, &token, Some(1)).await;
    let snapshot = behind.next_balance().await;
    assert_eq!(
        (snapshot["version"].as_i64(), snapshot["change"].clone()),
        (Some(3), json!(null))
    );
}

/// A comment heartbeat keeps the stream alive (the interval shortened for the test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_comments() {
    let db = TestDb::sqlite();
    let mut config = config(&db, &[]);
    config.realtime.sse_heartbeat = Duration::from_millis(100);
    let server = TestServer::start(config).await;
    let mut sse = SseStream::open(&server, &user_token("dave"), None).await;
    sse.next_balance().await;
    let reader = tokio::time::timeout(Duration::from_millis(700), sse.next_event()).await;
    assert!(reader.is_err(), "no event without a change: {reader:?}");
    assert!(sse.comments >= 3, "heartbeats seen: {}", sse.comments);
}

/// An expiring token ends the stream with `auth_expired` within a second of `exp`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_sends_auth_expired_then_ends() {
    let (_db, server) = server().await;
    let token = sign(
        json!({"sub": "erin", "exp": now_plus(2)}),
        Algorithm::HS256,
        &EncodingKey::from_secret(common::SECRET.as_bytes()),
    );
    let mut sse = SseStream::open(&server, &token, None).await;
    sse.next_balance().await;
    let started = std::time::Instant::now();
    let expired = sse.next_event().await.expect("auth_expired");
    assert_eq!(expired.event, "auth_expired");
    assert_eq!(expired.json(), json!({"error": "token_expired"}));
    assert!(sse.next_event().await.is_none(), "the stream ends");
    assert!(started.elapsed() < Duration::from_secs(4));
}

/// The 33rd live connection is refused with 429 `too_many_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_is_429() {
    let (_db, server) = server().await;
    let token = user_token("frank");
    let mut open = Vec::new();
    for _ in 0..32 {
        open.push(SseStream::open(&server, &token, None).await);
    }
    let refused = server
        .http
        .get(server.url("/api/credits/sse"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status(), 429);
    let body: serde_json::Value = refused.json().await.expect("ApiError");
    assert_eq!(body["error"], "too_many_connections");
    server.change("frank", 1).await;
    assert_eq!(open[31].next_balance().await["balance"], 0);
    assert_eq!(open[31].next_balance().await["balance"], 1);
}

/// Stopping the server ends open streams so clients reconnect elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_streams() {
    let (_db, mut server) = server().await;
    let mut sse = SseStream::open(&server, &user_token("gina"), None).await;
    sse.next_balance().await;
    server.signal_stop();
    assert!(sse.next_event().await.is_none());
    server.stop().await;
}
