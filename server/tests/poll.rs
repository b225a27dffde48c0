//! `/api/credits/balance/poll` against a real server: snapshots with a suggested interval,
//! long-polls that wake on a change or time out, validation and limits.

mod common;

use std::time::{Duration, Instant};

use app::wire::paths;
use common::{TestDb, config, live::TestServer, user_token};
use serde_json::Value;

async fn server() -> (TestDb, TestServer) {
    let db = TestDb::sqlite();
    let server = TestServer::start(config(&db, &[])).await;
    (db, server)
}

async fn poll(server: &TestServer, user: &str, query: &str) -> (u16, Value) {
    let response = server
        .http
        .get(server.url(&format!("{}{query}", paths::POLL)))
        .bearer_auth(user_token(user))
        .send()
        .await
        .expect("poll");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}

/// A plain poll answers the snapshot and an interval within SPEC's bounds, longer when idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_with_interval() {
    let (_db, server) = server().await;
    let (status, idle) = poll(&server, "alice", "").await;
    assert_eq!(status, 200);
    assert_eq!(
        (idle["balance"].as_i64(), idle["version"].as_i64()),
        (Some(0), Some(0))
    );
    let idle_ms = idle["poll_interval_ms"].as_u64().expect("interval");
    server.change("alice", 5).await;
    let (_, active) = poll(&server, "alice", "").await;
    let active_ms = active["poll_interval_ms"].as_u64().expect("interval");
    assert!((1_000..=60_000).contains(&idle_ms) && (1_000..=60_000).contains(&active_ms));
    assert!(
        active_ms < idle_ms,
        "active {active_ms} ms, idle {idle_ms} ms"
    );
}

/// A long-poll on the current version wakes within milliseconds of a change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wakes_on_change() {
    let (_db, server) = server().await;
    server.change("bob", 1).await;
    let waiting = {
        let http = server.http.clone();
        let url = server.url(&format!("{}?version=1&wait=20", paths::POLL));
        tokio::spawn(async move {
            let response = http
                .get(url)
                .bearer_auth(user_token("bob"))
                .send()
                .await
                .expect("poll");
            let answered = Instant::now();
            (answered, response.json::<Value>().await.expect("JSON"))
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "held while nothing changes");
    let changed = Instant::now();
    server.change("bob", 2).await;
    let (answered, body) = waiting.await.expect("poller");
    assert_eq!(
        (body["balance"].as_i64(), body["version"].as_i64()),
        (Some(3), Some(2))
    );
    assert!(answered.duration_since(changed) < Duration::from_millis(500));
}

/// A long-poll with nothing changing returns the same version when `wait` runs out; an
/// outdated `version` is answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_timeout_and_outdated_version() {
    let (_db, server) = server().await;
    server.change("carol", 4).await;
    let started = Instant::now();
    let (_, body) = poll(&server, "carol", "?version=1&wait=1").await;
    let held = started.elapsed();
    assert_eq!(body["version"], 1);
    assert!(
        held >= Duration::from_millis(900) && held < Duration::from_secs(3),
        "{held:?}"
    );

    let started = Instant::now();
    let (_, body) = poll(&server, "carol", "?version=0&wait=20").await;
    assert_eq!(body["version"], 1);
    assert!(started.elapsed() < Duration::from_millis(500));
}

/// Non-integer, negative or too long `version`/`wait` are 422 `invalid_field`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_parameters() {
    let (_db, server) = server().await;
    for query in [
        "?version=abc",
        "?version=-1",
        "?wait=1.5",
        "?wait=-2",
        "?wait=31",
        "?user=bob",
    ] {
        let (status, body) = poll(&server, "dave", query).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (422, Some("invalid_field")),
            "{query}"
        );
    }
}

/// The 9th concurrent long-poll of a user is 429; the others still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_limit() {
    let (_db, server) = server().await;
    let mut held = Vec::new();
    for _ in 0..8 {
        let http = server.http.clone();
        let url = server.url(&format!("{}?version=0&wait=10", paths::POLL));
        held.push(tokio::spawn(async move {
            http.get(url)
                .bearer_auth(user_token("erin"))
                .send()
                .await
                .expect("poll")
                .status()
        }));
    }
    let eight_waiting = common::live::eventually(Duration::from_secs(3), || {
        server.state.metrics.open_connections() == 8
    })
    .await;
    assert!(eight_waiting);
    let (status, body) = poll(&server, "erin", "?version=0&wait=10").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_connections"))
    );
    server.change("erin", 1).await;
    for poller in held {
        assert_eq!(poller.await.expect("poller"), 200);
    }
}

/// Stopping the server answers held long-polls at once with the current snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_held_polls() {
    let (_db, mut server) = server().await;
    let http = server.http.clone();
    let url = server.url(&format!("{}?version=0&wait=25", paths::POLL));
    let waiting = tokio::spawn(async move {
        let response = http
            .get(url)
            .bearer_auth(user_token("fay"))
            .send()
            .await
            .expect("poll");
        (
            response.status(),
            response.json::<Value>().await.expect("JSON"),
        )
    });
    assert!(
        common::live::eventually(Duration::from_secs(3), || server
            .state
            .metrics
            .open_connections()
            == 1)
        .await
    );
    let started = Instant::now();
    server.signal_stop();
    let (status, body) = waiting.await.expect("poller");
    assert_eq!((status.as_u16(), body["version"].as_i64()), (200, Some(0)));
    assert!(started.elapsed() < Duration::from_secs(2));
    server.stop().await;
}
