//! The `server` binary as an operator meets it: bad settings stop it with one clear line,
//! good ones serve until SIGTERM, which closes live connections and ends it cleanly.

mod common;

use std::time::Duration;

use common::process::{ServerProcess, command};
use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;

/// Each invalid setting exits non-zero with exactly one stderr line naming the variable.
#[test]
fn invalid_settings_stop_start_up_with_one_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases = [
        ("DATABASE_URL", "nonsense://x"),
        ("LEPTOS_SITE_ADDR", "abc"),
        ("REDIS_URL", "localhost:6379"),
        ("LIVECREDITS_DEV_LOGIN", "perhaps"),
    ];
    for (var, value) in cases {
        let output = command(dir.path(), &[("JWT_SECRET", common::SECRET), (var, value)])
            .output()
            .expect("server runs");
        assert!(!output.status.success(), "{var}={value} must fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line for {var}: {stderr}");
        assert!(lines[0].contains(&format!(": {var}: ")), "{var}: {stderr}");
    }
}

/// Without any secret and outside dev or Supabase mode the server refuses to start.
#[test]
fn missing_secret_stops_start_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = command(dir.path(), &[]).output().expect("server runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("JWT_SECRET: required"));
}

/// A valid configuration serves `/healthz` and `/readyz`; SIGTERM closes WebSockets with
/// 1012 and ends the process with status 0 in time.
#[tokio::test]
async fn serves_until_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = format!("sqlite://{}/db.sqlite", dir.path().display());
    let server = ServerProcess::start(
        dir.path(),
        &[("JWT_SECRET", common::SECRET), ("DATABASE_URL", &database)],
    );
    let addr = server.addr.clone();
    for (path, status) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let body: serde_json::Value = reqwest::get(format!("http://{addr}{path}"))
            .await
            .expect("answers")
            .json()
            .await
            .expect("JSON");
        assert_eq!(body["status"], status, "{path}");
    }

    let url = format!("ws://{addr}/ws?token={}", common::user_token("alice"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("WebSocket");
    let snapshot = ws.next().await.expect("a frame").expect("valid");
    assert!(snapshot.is_text());

    server.terminate();
    let closed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("closed in time");
    let Some(Ok(Message::Close(Some(frame)))) = closed else {
        panic!("expected a close frame, got {closed:?}");
    };
    assert_eq!(u16::from(frame.code), app::wire::close::RESTARTING);
    let (status, output) = server.wait(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}: {output}");
}
