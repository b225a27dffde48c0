//! Tokens sent in the query string (browsers' WebSocket and EventSource cannot send headers)
//! never reach the server's log, at any level, from any crate.

mod common;

use std::time::Duration;

use app::wire::paths;
use common::{SERVICE_KEY, process::ServerProcess, user_token};
use futures::StreamExt;

/// WebSocket, SSE and poll requests with query tokens, good and bad, leave no token in the
/// server's trace-level output, though the requests themselves are logged.
#[tokio::test]
async fn query_tokens_are_never_logged() {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = format!("sqlite://{}/db.sqlite", dir.path().display());
    let server = ServerProcess::start(
        dir.path(),
        &[
            ("JWT_SECRET", common::SECRET),
            ("SUPABASE_SERVICE_ROLE_KEY", SERVICE_KEY),
            ("DATABASE_URL", &database),
            ("RUST_LOG", "trace"),
        ],
    );
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    let token = user_token("alice");
    let bad = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.bm90LWEtcmVhbC1zaWduYXR1cmU";

    let url = format!("ws://{}{}?token={token}", server.addr, paths::WS);
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("WebSocket");
    ws.next().await.expect("snapshot").expect("frame");
    let response = http
        .post(format!("{base}{}", paths::CHANGES))
        .bearer_auth(SERVICE_KEY)
        .json(&serde_json::json!({"user_id": "alice", "amount": 1, "type": "grant"}))
        .send()
        .await
        .expect("change");
    assert_eq!(response.status(), 201);
    ws.next().await.expect("event").expect("frame");

    for path in [paths::WS, paths::SSE, paths::POLL, paths::BALANCE] {
        for query in [
            format!("token={token}"),
            format!("token={bad}"),
            format!("token={token}&wait=x"),
        ] {
            let response = tokio::time::timeout(
                Duration::from_secs(5),
                http.get(format!("{base}{path}?{query}")).send(),
            )
            .await
            .expect("answered in time")
            .expect("response");
            // An SSE stream stays open; its headers are enough.
            drop(response);
        }
    }
    drop(ws);
    server.terminate();
    let (status, logs) = server.wait(Duration::from_secs(10));
    assert!(status.success());

    assert!(logs.contains(paths::POLL), "requests are logged: {logs}");
    for secret in [token.as_str(), bad] {
        let signature = secret.rsplit('.').next().expect("three parts");
        let leaks: Vec<&str> = logs.lines().filter(|l| l.contains(signature)).collect();
        assert!(leaks.is_empty(), "a token reached the logs: {leaks:#?}");
    }
}
