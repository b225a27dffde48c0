//! `/api/credits/sse` against a real server with a streaming HTTP client: headers, snapshot
//! and retry, `Last-Event-ID`, heartbeats, `auth_expired` and refreshing by reconnecting,
//! limits and shutdown.

mod common;

use std::time::Duration;

use app::wire::paths;
use common::{
    TestDb, config,
    live::{PATIENCE, SseStream, TestServer, eventually},
    now_plus, sign, user_token,
};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

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

/// An expiring token ends the stream with `auth_expired` at `exp`: not before it, and
/// within a second after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_sends_auth_expired_then_ends() {
    let (_db, server) = server().await;
    let exp = now_plus(2);
    let token = sign(
        json!({"sub": "erin", "exp": exp}),
        Algorithm::HS256,
        &EncodingKey::from_secret(common::SECRET.as_bytes()),
    );
    let mut sse = SseStream::open(&server, &token, None).await;
    sse.next_balance().await;
    let expired = sse.next_event().await.expect("auth_expired");
    let after_exp = chrono::Utc::now().timestamp_millis() - exp * 1000;
    assert_eq!(expired.event, "auth_expired");
    assert_eq!(expired.json(), json!({"error": "token_expired"}));
    assert!(
        (-50..=1000).contains(&after_exp),
        "auth_expired {after_exp} ms after exp"
    );
    assert!(sse.next_event().await.is_none(), "the stream ends");
}

/// SSE refreshes by reconnecting (SPEC §11): after `auth_expired`, a fresh token for the same
/// user with `Last-Event-ID` of the last event seen gets no repeated snapshot, only what
/// comes next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_by_reconnecting_repeats_no_snapshot() {
    let (_db, server) = server().await;
    server.change("gina", 5).await;
    let short = sign(
        json!({"sub": "gina", "exp": now_plus(1)}),
        Algorithm::HS256,
        &EncodingKey::from_secret(common::SECRET.as_bytes()),
    );
    let mut expiring = SseStream::open(&server, &short, None).await;
    let seen = expiring.next_balance().await["version"]
        .as_i64()
        .expect("version");
    let expired = expiring.next_event().await.expect("auth_expired");
    assert_eq!(expired.event, "auth_expired");

    let mut renewed = SseStream::open(&server, &user_token("gina"), Some(seen)).await;
    assert!(renewed.next_event().await.expect("retry").retry.is_some());
    server.change("gina", 2).await;
    let next = renewed.next_event().await.expect("event");
    assert_eq!(
        (next.id.as_deref(), next.json()["change"]["amount"].as_i64()),
        (Some("2"), Some(2)),
        "the change, with no snapshot of version {seen} before it"
    );
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
        .get(server.url(paths::SSE))
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

/// Sends `request` on a new connection and reads what comes back until `until` appears, the
/// server closes, or patience runs out.
async fn raw_exchange(server: &TestServer, request: &[u8], until: &str) -> (TcpStream, String) {
    let mut conn = TcpStream::connect(server.addr).await.expect("connect");
    conn.write_all(request).await.expect("send request");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, async {
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains(until) {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    (conn, String::from_utf8_lossy(&answer).into_owned())
}

/// A stream request opening a connection is served on a lean connection: a close-delimited
/// stream, and a client that goes away frees its subscription at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_connection_lives_as_long_as_its_client() {
    let (_db, server) = server().await;
    server.change("hana", 5).await;
    let request = format!(
        "GET {}?token={} HTTP/1.1\r\nHost: test\r\n\r\n",
        paths::SSE,
        user_token("hana")
    );
    let (mut conn, answer) = raw_exchange(&server, request.as_bytes(), r#""balance":5"#).await;
    let (head, stream) = answer.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    for expected in ["content-type: text/event-stream", "connection: close"] {
        assert!(
            head.lines().any(|line| line == expected),
            "{expected} in {head}"
        );
    }
    assert!(!head.contains("content-length") && !head.contains("transfer-encoding"));
    assert!(stream.starts_with("retry: 3000"), "{stream}");

    server.change("hana", 2).await;
    let mut more = [0u8; 1024];
    let n = tokio::time::timeout(PATIENCE, conn.read(&mut more))
        .await
        .expect("a frame in time")
        .expect("read");
    assert!(String::from_utf8_lossy(&more[..n]).contains(r#""balance":7"#));

    assert_eq!(server.state.hub.user_count(), 1);
    drop(conn);
    assert!(
        eventually(PATIENCE, || server.state.hub.user_count() == 0).await,
        "the subscription outlived its client"
    );
}

/// Stream requests the lean connection cannot serve get an HTTP error and a closed
/// connection; the router's own refusals keep their `ApiError` body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_stream_requests_get_an_http_error() {
    let (_db, server) = server().await;
    let many_headers: String = (0..70).map(|i| format!("x-h{i}: v\r\n")).collect();
    let sse = paths::SSE;
    let cases = [
        (
            format!("GET {sse} HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc"),
            "400",
        ),
        (format!("GET {sse} HTTP/1.1\r\nno colon\r\n\r\n"), "400"),
        (format!("GET {sse} HTTP/1.1\r\n{many_headers}\r\n"), "431"),
        (format!("GET {sse} HTTP/1.1\r\nHost: t\r\n\r\n"), "401"),
    ];
    for (request, status) in cases {
        let (_conn, answer) = raw_exchange(&server, request.as_bytes(), "\0").await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{request:?} → {answer}"
        );
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        if status == "401" {
            let body = answer.split_once("\r\n\r\n").expect("a head").1;
            let error: serde_json::Value = serde_json::from_str(body).expect("ApiError JSON");
            assert_eq!(error["error"], "unauthorized");
        }
    }
    assert_eq!(server.state.hub.user_count(), 0);
}

/// A keep-alive connection that asks for a stream after another request is served by hyper,
/// with the same stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_after_another_request_on_one_connection() {
    let (_db, server) = server().await;
    server.change("ivan", 4).await;
    let token = user_token("ivan");
    let (balance, sse) = (paths::BALANCE, paths::SSE);
    let request = format!(
        "GET {balance}?token={token} HTTP/1.1\r\nHost: t\r\n\r\n\
         GET {sse}?token={token} HTTP/1.1\r\nHost: t\r\n\r\n"
    );
    let (_conn, answer) = raw_exchange(&server, request.as_bytes(), "event: balance").await;
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
    assert!(answer.contains("transfer-encoding: chunked"), "{answer}");
    assert!(answer.contains(r#""balance":4"#), "{answer}");
}
