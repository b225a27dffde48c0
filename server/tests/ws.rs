//! `/ws` against a real server with a real WebSocket client: snapshot first, exactly-once
//! fan-out per user, ordering under bursts, ping/pong and bad frames, close codes.

mod common;

use std::time::Duration;

use app::wire::{close, paths};
use common::{
    TestDb, config,
    live::{TestServer, close_code, eventually, next_json, send_text, ws_connect, ws_connect_with},
    now_plus, sign, user_token,
};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;

async fn server(overrides: &[(&str, &str)]) -> (TestDb, TestServer) {
    let db = TestDb::sqlite();
    let server = TestServer::start(config(&db, overrides)).await;
    (db, server)
}

/// The first frame is the snapshot; a change reaches every connection of its user exactly
/// once and no connection of another user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_each_change_once_per_connection() {
    let (_db, server) = server(&[]).await;
    server.change("alice", 100).await;
    let (alice, bob) = (user_token("alice"), user_token("bob"));
    let mut a1 = ws_connect(&server, &alice).await;
    let mut a2 = ws_connect(&server, &alice).await;
    let mut b = ws_connect(&server, &bob).await;
    for ws in [&mut a1, &mut a2] {
        let snapshot = next_json(ws).await;
        assert_eq!(snapshot["type"], "balance");
        assert_eq!(
            (snapshot["balance"].as_i64(), snapshot["version"].as_i64()),
            (Some(100), Some(1))
        );
        assert_eq!(snapshot["change"], json!(null));
    }
    assert_eq!(next_json(&mut b).await["balance"], 0);

    server.change("alice", 5).await;
    for ws in [&mut a1, &mut a2] {
        let event = next_json(ws).await;
        assert_eq!(
            (event["balance"].as_i64(), event["version"].as_i64()),
            (Some(105), Some(2))
        );
        assert_eq!(event["change"]["amount"], 5);
    }
    // Exactly once: the next frame on each is the pong to our ping, not a repeat.
    for ws in [&mut a1, &mut a2, &mut b] {
        send_text(ws, r#"{"type":"ping"}"#).await;
        assert_eq!(next_json(ws).await, json!({"type": "pong"}));
    }
}

/// 200 rapid changes arrive in strictly increasing versions ending at the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_arrive_in_order() {
    let (_db, server) = server(&[]).await;
    let mut ws = ws_connect(&server, &user_token("carol")).await;
    assert_eq!(next_json(&mut ws).await["version"], 0);
    let writer = {
        let http = server.http.clone();
        let url = server.url(paths::CHANGES);
        tokio::spawn(async move {
            for _ in 0..200 {
                let response = http
                    .post(&url)
                    .bearer_auth(common::SERVICE_KEY)
                    .json(&json!({"user_id": "carol", "amount": 1, "type": "grant"}))
                    .send()
                    .await
                    .expect("change");
                assert_eq!(response.status(), 201);
            }
        })
    };
    let mut last = 0;
    while last < 200 {
        let event = next_json(&mut ws).await;
        let version = event["version"].as_i64().expect("version");
        assert!(version > last, "version {version} after {last}");
        assert_eq!(
            event["balance"].as_i64(),
            Some(version),
            "balance matches version"
        );
        last = version;
    }
    writer.await.expect("writer");
}

/// `ping` gets `pong`; malformed frames get error frames, then a 1008 close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_bad_frames() {
    let (_db, server) = server(&[]).await;
    let mut ws = ws_connect(&server, &user_token("dave")).await;
    next_json(&mut ws).await;
    send_text(&mut ws, r#"{"type":"ping"}"#).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "pong"}));
    for bad in ["not json", r#"{"type":"subscribe"}"#, "[]"] {
        send_text(&mut ws, bad).await;
        let error = next_json(&mut ws).await;
        assert_eq!(
            (error["type"].as_str(), error["error"].as_str()),
            (Some("error"), Some("bad_json"))
        );
    }
    send_text(&mut ws, "again").await;
    assert_eq!(close_code(&mut ws).await, Some(close::POLICY));
}

/// A frame over 4 KiB closes the connection with 1009.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_closes_1009() {
    let (_db, server) = server(&[]).await;
    let mut ws = ws_connect(&server, &user_token("erin")).await;
    next_json(&mut ws).await;
    send_text(&mut ws, &"x".repeat(5000)).await;
    assert_eq!(close_code(&mut ws).await, Some(close::TOO_BIG));
}

/// A token that expires during the connection ends it with 4001 at `exp`: not before it,
/// and within a second after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_closes_4001() {
    let (_db, server) = server(&[]).await;
    let exp = now_plus(2);
    let token = sign(
        json!({"sub": "frank", "exp": exp}),
        Algorithm::HS256,
        &EncodingKey::from_secret(common::SECRET.as_bytes()),
    );
    let mut ws = ws_connect(&server, &token).await;
    next_json(&mut ws).await;
    assert_eq!(close_code(&mut ws).await, Some(close::TOKEN_EXPIRED));
    let after_exp = chrono::Utc::now().timestamp_millis() - exp * 1000;
    assert!(
        (-50..=1000).contains(&after_exp),
        "closed {after_exp} ms after exp"
    );
}

/// With the session cookie, another site's Origin is closed with 4003; the app's own origin
/// and configured origins are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_auth_checks_origin() {
    let (_db, server) = server(&[("CORS_ORIGINS", "https://app.example")]).await;
    let cookie = format!("livecredits_session={}", user_token("gina"));
    let own = format!("http://{}", server.addr);
    for (origin, expect_served) in [
        (own.as_str(), true),
        ("https://app.example", true),
        ("https://evil.example", false),
    ] {
        let mut ws = ws_connect_with(
            &server,
            paths::WS,
            &[("cookie", &cookie), ("origin", origin)],
        )
        .await;
        if expect_served {
            assert_eq!(next_json(&mut ws).await["user_id"], "gina", "{origin}");
        } else {
            assert_eq!(
                close_code(&mut ws).await,
                Some(close::FORBIDDEN_ORIGIN),
                "{origin}"
            );
        }
    }
}

/// A bad token at the handshake is a 401 `ApiError`, not an upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_is_401_at_handshake() {
    let (_db, server) = server(&[]).await;
    let response = server
        .http
        .get(server.url(&format!("{}?token=garbage", paths::WS)))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 401);
    let body: serde_json::Value = response.json().await.expect("ApiError");
    assert_eq!(body["error"], "unauthorized");
}

/// The 33rd live connection of a user is closed with 4029; the other 32 keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_per_user() {
    let (_db, server) = server(&[]).await;
    let token = user_token("hank");
    let mut open = Vec::new();
    for _ in 0..32 {
        let mut ws = ws_connect(&server, &token).await;
        next_json(&mut ws).await;
        open.push(ws);
    }
    let mut refused = ws_connect(&server, &token).await;
    assert_eq!(
        close_code(&mut refused).await,
        Some(close::TOO_MANY_CONNECTIONS)
    );
    server.change("hank", 7).await;
    for ws in &mut open {
        assert_eq!(next_json(ws).await["balance"], 7);
    }
}

/// A peer that stops answering protocol pings is dropped after the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_is_dropped() {
    let db = TestDb::sqlite();
    let mut config = config(&db, &[]);
    config.realtime.ping_interval = Duration::from_millis(100);
    config.realtime.idle_timeout = Duration::from_millis(300);
    let server = TestServer::start(config).await;
    let mut ws = ws_connect(&server, &user_token("ivy")).await;
    next_json(&mut ws).await;
    // Not reading means not answering pings; the server gives up on us.
    let dropped = eventually(Duration::from_secs(3), || {
        server.state.hub.user_count() == 0
    })
    .await;
    assert!(dropped, "the hub still holds the silent peer");
    drop(ws);
}

/// Stopping the server closes live WebSockets with 1012 and `run` returns in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_1012() {
    let (_db, mut server) = server(&[]).await;
    let mut ws = ws_connect(&server, &user_token("jack")).await;
    next_json(&mut ws).await;
    server.signal_stop();
    assert_eq!(close_code(&mut ws).await, Some(close::RESTARTING));
    server.stop().await;
}

/// After 1,000 connect/disconnect cycles the hub holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_forgets_closed_connections() {
    let (_db, server) = server(&[]).await;
    for i in 0..1_000 {
        let mut ws = ws_connect(&server, &user_token(&format!("user-{}", i % 50))).await;
        next_json(&mut ws).await;
        ws.close(None).await.expect("close");
    }
    assert!(
        eventually(Duration::from_secs(5), || server.state.hub.user_count()
            == 0)
        .await
    );
    assert_eq!(server.state.metrics.open_connections(), 0);
}

/// `/metrics` counts open connections, published and delivered events, the delivery delay
/// and refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_delivery() {
    let db = TestDb::sqlite();
    let mut config = config(&db, &[]);
    config.realtime.limits.live_per_user = 1;
    let server = TestServer::start(config).await;
    let token = user_token("kim");
    let mut ws = ws_connect(&server, &token).await;
    next_json(&mut ws).await;
    let mut refused = ws_connect(&server, &token).await;
    assert_eq!(
        close_code(&mut refused).await,
        Some(close::TOO_MANY_CONNECTIONS)
    );
    server.change("kim", 3).await;
    next_json(&mut ws).await;

    let text = server
        .http
        .get(server.url(paths::METRICS))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for line in [
        r#"livecredits_connections{transport="websocket"} 1"#,
        "livecredits_events_published_total 1",
        r#"livecredits_events_delivered_total{transport="websocket"} 1"#,
        "livecredits_delivery_delay_seconds_count 1",
        r#"livecredits_refusals_total{reason="too_many_connections"} 1"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
}

/// Frames must be JSON objects: `["ping"]`, which serde alone reads as a ping, gets an error
/// frame and no pong; `{"type":"ping"}` still gets its pong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_object_frames_are_errors() {
    let (_db, server) = server(&[]).await;
    let mut ws = ws_connect(&server, &user_token("lee")).await;
    next_json(&mut ws).await;
    for bad in [r#"["ping"]"#, r#""ping""#, "null"] {
        send_text(&mut ws, bad).await;
        let error = next_json(&mut ws).await;
        assert_eq!(
            (error["type"].as_str(), error["error"].as_str()),
            (Some("error"), Some("bad_json")),
            "{bad}"
        );
    }
    send_text(&mut ws, r#" {"type":"ping"}"#).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "pong"}));
}

/// An HS256 token for `sub` that expires at `exp` (Unix seconds), under the test secret.
fn token_until(sub: &str, exp: i64) -> String {
    sign(
        json!({"sub": sub, "exp": exp, "role": "authenticated"}),
        Algorithm::HS256,
        &EncodingKey::from_secret(common::SECRET.as_bytes()),
    )
}

/// Milliseconds from Unix-seconds `exp` to now (negative before it).
fn ms_after(exp: i64) -> i64 {
    chrono::Utc::now().timestamp_millis() - exp * 1000
}

/// The next frame other than an `auth_expiring` warning, which short-lived tokens may race.
async fn next_json_unwarned(ws: &mut common::live::Ws) -> serde_json::Value {
    loop {
        let frame = next_json(ws).await;
        if frame["type"] != "auth_expiring" {
            return frame;
        }
    }
}

/// The `expires_at` of a frame as Unix seconds.
fn expires_at(frame: &serde_json::Value) -> i64 {
    let at = frame["expires_at"].as_str().expect("expires_at");
    chrono::DateTime::parse_from_rfc3339(at)
        .expect("RFC 3339")
        .timestamp()
}

/// A same-user `auth` frame is answered `auth_ok` with the new expiry, and the connection
/// outlives the old token: no 4001 at its `exp`, and a later change still arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_band_refresh_extends_the_connection() {
    let (_db, server) = server(&[]).await;
    let old_exp = now_plus(2);
    let mut ws = ws_connect(&server, &token_until("mia", old_exp)).await;
    next_json(&mut ws).await;
    let new_exp = now_plus(3600);
    let refresh = json!({"type": "auth", "token": token_until("mia", new_exp)});
    send_text(&mut ws, &refresh.to_string()).await;
    let ok = next_json_unwarned(&mut ws).await;
    assert_eq!(ok["type"], "auth_ok");
    assert_eq!(expires_at(&ok), new_exp);

    tokio::time::sleep(Duration::from_millis(
        u64::try_from(1500 - ms_after(old_exp)).unwrap_or(0),
    ))
    .await;
    server.change("mia", 9).await;
    let event = next_json_unwarned(&mut ws).await;
    assert_eq!(
        (event["balance"].as_i64(), event["version"].as_i64()),
        (Some(9), Some(1))
    );
    send_text(&mut ws, r#"{"type":"ping"}"#).await;
    assert_eq!(next_json_unwarned(&mut ws).await, json!({"type": "pong"}));
}

/// Another user's token, or a service credential, gets a `forbidden` error frame, then 4003.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_band_token_of_another_principal_closes_4003() {
    let (_db, server) = server(&[]).await;
    for other in [user_token("ned"), common::SERVICE_KEY.to_owned()] {
        let mut ws = ws_connect(&server, &user_token("nia")).await;
        next_json(&mut ws).await;
        send_text(
            &mut ws,
            &json!({"type": "auth", "token": other}).to_string(),
        )
        .await;
        let error = next_json(&mut ws).await;
        assert_eq!(
            (error["type"].as_str(), error["error"].as_str()),
            (Some("error"), Some("forbidden"))
        );
        assert_eq!(close_code(&mut ws).await, Some(close::FORBIDDEN_CREDENTIAL));
    }
}

/// Invalid tokens get `unauthorized` error frames without counting as bad frames; the old
/// credential still ends the connection with 4001 at its `exp`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_in_band_token_keeps_the_old_credential() {
    let (_db, server) = server(&[]).await;
    let exp = now_plus(3);
    let mut ws = ws_connect(&server, &token_until("olga", exp)).await;
    next_json(&mut ws).await;
    let forged = sign(
        json!({"sub": "olga", "exp": now_plus(3600)}),
        Algorithm::HS256,
        &EncodingKey::from_secret(b"not the secret"),
    );
    let expired = token_until("olga", now_plus(-60));
    for bad in [forged.as_str(), expired.as_str(), "garbage", "a.b.c"] {
        send_text(&mut ws, &json!({"type": "auth", "token": bad}).to_string()).await;
        let error = next_json_unwarned(&mut ws).await;
        assert_eq!(
            (error["type"].as_str(), error["error"].as_str()),
            (Some("error"), Some("unauthorized")),
            "{bad}"
        );
    }
    send_text(&mut ws, r#"{"type":"ping"}"#).await;
    assert_eq!(next_json_unwarned(&mut ws).await, json!({"type": "pong"}));
    assert_eq!(close_code(&mut ws).await, Some(close::TOKEN_EXPIRED));
    let after_exp = ms_after(exp);
    assert!(
        (-50..=1000).contains(&after_exp),
        "closed {after_exp} ms after exp"
    );
}

/// A short-lived credential is warned with `auth_expiring` at half its lifetime, before
/// `exp`, and the close still comes at `exp` with 4001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_expiring_comes_before_expiry() {
    let (_db, server) = server(&[]).await;
    let exp = now_plus(3);
    let mut ws = ws_connect(&server, &token_until("pia", exp)).await;
    next_json(&mut ws).await;
    let half_life = ms_after(exp) / 2;
    let warning = next_json(&mut ws).await;
    assert_eq!(warning["type"], "auth_expiring");
    assert_eq!(expires_at(&warning), exp);
    let warned = ms_after(exp);
    assert!(
        (half_life - 300..=half_life + 300).contains(&warned),
        "warned {warned} ms after exp, half-life at {half_life}"
    );
    assert_eq!(close_code(&mut ws).await, Some(close::TOKEN_EXPIRED));
    let after_exp = ms_after(exp);
    assert!(
        (-50..=1000).contains(&after_exp),
        "closed {after_exp} ms after exp"
    );
}
