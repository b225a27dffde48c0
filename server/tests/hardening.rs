//! SPEC §10 against the built `server` binary: stalled and idle connections are cut in time,
//! browser headers and session cookies follow the public URL, the cookie WebSocket checks
//! `Origin` against it, and control characters never make an idempotency key.

mod common;

use std::time::Duration;

use app::wire::paths;
use common::{SERVICE_KEY, process::ServerProcess, user_token};
use futures::StreamExt;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, timeout, timeout_at},
};
use tokio_tungstenite::tungstenite::{
    Message,
    client::IntoClientRequest,
    http::{HeaderName, HeaderValue},
};

/// What browsers are told to use in the https tests.
const PUBLIC_URL: &str = "https://credits.example";

/// A server process with the test secret and service key, its ledger and data folder in a
/// temporary folder of its own, plus `extra` settings.
fn start(extra: &[(&str, &str)]) -> (TempDir, ServerProcess) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = format!("sqlite://{}/db.sqlite", dir.path().display());
    let data = dir.path().join("data").display().to_string();
    let mut vars = vec![
        ("JWT_SECRET", common::SECRET),
        ("SUPABASE_SERVICE_ROLE_KEY", SERVICE_KEY),
        ("DATABASE_URL", database.as_str()),
        ("LIVECREDITS_DATA_DIR", data.as_str()),
    ];
    vars.extend_from_slice(extra);
    let server = ServerProcess::start(dir.path(), &vars);
    (dir, server)
}

/// A server in dev mode (no secret configured: it generates one in its data folder).
fn start_dev(extra: &[(&str, &str)]) -> (TempDir, ServerProcess) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = format!("sqlite://{}/db.sqlite", dir.path().display());
    let data = dir.path().join("data").display().to_string();
    let mut vars = vec![
        ("LIVECREDITS_DEV_LOGIN", "1"),
        ("DATABASE_URL", database.as_str()),
        ("LIVECREDITS_DATA_DIR", data.as_str()),
    ];
    vars.extend_from_slice(extra);
    let server = ServerProcess::start(dir.path(), &vars);
    (dir, server)
}

fn url(server: &ServerProcess, path: &str) -> String {
    format!("http://{}{path}", server.addr)
}

/// Waits until the server closes `stream`, reading and discarding whatever it sends; the
/// time since `since` at which it did, or `None` if it is still open at `give_up`.
async fn closed_after(
    stream: &mut TcpStream,
    since: Instant,
    give_up: Instant,
) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    loop {
        match timeout_at(give_up, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Some(since.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
}

/// Connects and never says a word; returns when the server closed the connection.
async fn silent(mut stream: TcpStream, since: Instant) -> Option<Duration> {
    closed_after(&mut stream, since, since + Duration::from_secs(20)).await
}

/// Sends a request head one byte a second, never finishing it; returns when the server
/// closed the connection.
async fn drip(mut stream: TcpStream, since: Instant) -> Option<Duration> {
    let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Drip: ".iter().copied();
    let give_up = since + Duration::from_secs(20);
    for byte in head.chain(std::iter::repeat(b'a')) {
        if stream.write_all(&[byte]).await.is_err() {
            return Some(since.elapsed());
        }
        let second = (Instant::now() + Duration::from_secs(1)).min(give_up);
        if let Some(closed) = closed_after(&mut stream, since, second).await {
            return Some(closed);
        }
        if Instant::now() >= give_up {
            return None;
        }
    }
    unreachable!("the drip never ends")
}

/// With every connection slot held by clients that never finish a request head (half
/// silent, half dripping a byte a second), a real client is answered within 15 s of them
/// connecting, but not before a slot is freed; every stalled connection is cut by 12 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_cannot_starve_real_clients() {
    const SLOTS: usize = 20;
    let (_dir, server) = start(&[("LIVECREDITS_MAX_CONNECTIONS", "20")]);
    let connected = Instant::now();
    let mut attackers = Vec::new();
    for i in 0..SLOTS {
        let stream = TcpStream::connect(&server.addr).await.expect("connects");
        attackers.push(if i % 2 == 0 {
            tokio::spawn(silent(stream, connected))
        } else {
            tokio::spawn(drip(stream, connected))
        });
    }

    let answer = timeout_at(
        connected + Duration::from_secs(15),
        reqwest::get(url(&server, paths::HEALTHZ)),
    )
    .await;
    let answered = connected.elapsed();
    let response = answer
        .expect("the real client is answered within 15 s")
        .expect("a response");
    assert_eq!(response.status(), 200);
    assert!(
        answered > Duration::from_secs(5),
        "answered after {answered:?}: the slots were never full"
    );

    for (i, attacker) in attackers.into_iter().enumerate() {
        let closed = attacker.await.expect("attacker task");
        let kind = if i % 2 == 0 { "silent" } else { "dripping" };
        let closed = closed.unwrap_or_else(|| panic!("a {kind} connection was never closed"));
        assert!(
            closed <= Duration::from_secs(12),
            "a {kind} connection was closed only after {closed:?}"
        );
    }
}

/// The head of a raw HTTP/1.1 response on `stream`, reading its body by `content-length`.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("reads");
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .expect("a content-length")
            .parse()
            .expect("a number");
        if body.len() >= length {
            return head.to_owned();
        }
    }
}

/// A keep-alive connection with no request in flight is closed by the server within 60 s
/// of its last response (after the 10 s head deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let (_dir, server) = start(&[]);
    let mut stream = TcpStream::connect(&server.addr).await.expect("connects");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("writes");
    let head = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(!head.contains("connection: close"), "kept alive: {head}");

    let answered = Instant::now();
    let closed = closed_after(&mut stream, answered, answered + Duration::from_secs(60))
        .await
        .expect("an idle keep-alive connection is closed within 60 s");
    assert!(
        closed > Duration::from_secs(5),
        "closed after only {closed:?}"
    );
}

/// A client that sends requests but never reads the answers is cut once the server's
/// writes have made no progress for 10 s: its own blocked write then fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_are_cut() {
    let (_dir, server) = start(&[]);
    let mut stream = TcpStream::connect(&server.addr).await.expect("connects");
    let requests = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(256);
    let started = Instant::now();
    // Pipelined requests fill the server's send buffer with answers nobody reads, then
    // the server stops reading and our writes block too, until it gives up on us.
    let mut last_progress = started;
    let cut = timeout(Duration::from_secs(40), async {
        loop {
            if let Err(err) = stream.write_all(&requests).await {
                return err;
            }
            last_progress = Instant::now();
        }
    })
    .await
    .expect("the server never cut a client that does not read");
    let stalled_for = last_progress.elapsed();
    assert!(
        started.elapsed() > Duration::from_secs(5),
        "cut after only {:?}: {cut}",
        started.elapsed()
    );
    assert!(
        stalled_for <= Duration::from_secs(15),
        "cut {stalled_for:?} after the last progress"
    );
}

/// The `Content-Security-Policy` header's `name` directive, if present.
fn directive<'a>(policy: &'a str, name: &str) -> Option<&'a str> {
    policy
        .split(';')
        .map(str::trim)
        .find(|d| d.split_whitespace().next() == Some(name))
}

/// One server-rendered page: its policy nonce, after checking the page's own scripts carry
/// it.
async fn page_nonce(http: &reqwest::Client, server: &ServerProcess) -> String {
    let response = http
        .get(url(server, "/"))
        .header("accept", "text/html")
        .send()
        .await
        .expect("page");
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let html = response.text().await.expect("HTML");
    let header = |name: &str| {
        headers
            .get(name)
            .unwrap_or_else(|| panic!("{name} on the page"))
            .to_str()
            .expect("ASCII")
            .to_owned()
    };
    assert!(header("content-type").starts_with("text/html"));
    assert_eq!(header("x-content-type-options"), "nosniff");
    assert_eq!(header("referrer-policy"), "same-origin");
    let policy = header("content-security-policy");
    assert_eq!(
        directive(&policy, "frame-ancestors"),
        Some("frame-ancestors 'none'"),
        "{policy}"
    );
    let scripts = directive(&policy, "script-src").expect("a script-src directive");
    assert!(!scripts.contains("'unsafe-inline'"), "{policy}");
    let nonce = scripts
        .split_whitespace()
        .find_map(|source| source.strip_prefix("'nonce-")?.strip_suffix('\''))
        .unwrap_or_else(|| panic!("a nonce in {policy}"))
        .to_owned();
    assert!(nonce.len() >= 16, "a nonce worth the name: {nonce}");

    // Every script the page runs itself carries the nonce (JSON data blocks do not run).
    let executable: Vec<&str> = html
        .split("<script")
        .skip(1)
        .map(|tag| tag.split_once('>').expect("a complete tag").0)
        .filter(|attrs| !attrs.contains("application/json"))
        .collect();
    assert!(!executable.is_empty(), "the page has scripts: {html}");
    for attrs in executable {
        assert!(
            attrs.contains(&format!("nonce=\"{nonce}\"")),
            "<script{attrs}> lacks the policy's nonce {nonce}"
        );
    }
    nonce
}

/// Pages send a CSP that admits their own scripts by a nonce fresh for each response (never
/// `'unsafe-inline'`) and forbids framing, plus `Referrer-Policy`; every response, API errors
/// included, is `nosniff`; HSTS only when the public URL is https.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_security_headers() {
    let (_dir, server) = start(&[]);
    let http = reqwest::Client::new();
    let first = page_nonce(&http, &server).await;
    let second = page_nonce(&http, &server).await;
    assert_ne!(first, second, "a fresh nonce for every page");

    for (path, status) in [(paths::HEALTHZ, 200), (paths::BALANCE, 401), ("/", 200)] {
        let response = http.get(url(&server, path)).send().await.expect("answer");
        assert_eq!(response.status(), status, "{path}");
        let headers = response.headers();
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert!(
            !headers.contains_key("strict-transport-security"),
            "no HSTS over http: {path}"
        );
    }

    let (_dir, https) = start(&[("LIVECREDITS_PUBLIC_URL", PUBLIC_URL)]);
    for path in [paths::HEALTHZ, paths::BALANCE, "/"] {
        let response = http
            .get(url(&https, path))
            .header("accept", "text/html")
            .send()
            .await
            .expect("answer");
        let hsts = response
            .headers()
            .get("strict-transport-security")
            .unwrap_or_else(|| panic!("HSTS on {path}"))
            .to_str()
            .expect("ASCII");
        let max_age: u64 = hsts
            .strip_prefix("max-age=")
            .and_then(|rest| rest.split(';').next())
            .and_then(|age| age.parse().ok())
            .unwrap_or_else(|| panic!("max-age in {hsts:?}"));
        assert!(max_age >= 86_400 * 180, "{hsts}");
    }
}

/// The `Set-Cookie` header of a dev sign-in as `alice`.
async fn dev_login_cookie(server: &ServerProcess) -> String {
    let response = reqwest::Client::new()
        .post(url(server, paths::DEV_LOGIN))
        .json(&json!({"user_id": "alice"}))
        .send()
        .await
        .expect("dev login");
    assert_eq!(response.status(), 200);
    response.headers()["set-cookie"]
        .to_str()
        .expect("ASCII")
        .to_owned()
}

/// The session cookie is HttpOnly and SameSite=Lax, and `Secure` exactly when the public
/// URL is https.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cookie_is_secure_behind_https() {
    let attributes = |cookie: &str| -> Vec<String> {
        cookie
            .split(';')
            .skip(1)
            .map(|a| a.trim().to_ascii_lowercase())
            .collect()
    };
    let (_dir, http) = start_dev(&[]);
    let cookie = dev_login_cookie(&http).await;
    assert!(cookie.starts_with("livecredits_session="), "{cookie}");
    let plain = attributes(&cookie);
    for expected in ["httponly", "samesite=lax"] {
        assert!(plain.iter().any(|a| a == expected), "{expected}: {cookie}");
    }
    assert!(!plain.iter().any(|a| a == "secure"), "not Secure: {cookie}");

    let (_dir, https) = start_dev(&[("LIVECREDITS_PUBLIC_URL", PUBLIC_URL)]);
    let cookie = dev_login_cookie(&https).await;
    let secure = attributes(&cookie);
    for expected in ["httponly", "samesite=lax", "secure"] {
        assert!(secure.iter().any(|a| a == expected), "{expected}: {cookie}");
    }
}

/// Opens `/ws` on `server` with `headers`; the first frame's JSON, or the close code.
async fn ws_first(server: &ServerProcess, headers: &[(&str, &str)]) -> Result<Value, Option<u16>> {
    let mut request = format!("ws://{}{}", server.addr, paths::WS)
        .into_client_request()
        .expect("request");
    for (name, value) in headers {
        request.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("WebSocket handshake");
    loop {
        let frame = timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame in time");
        match frame {
            Some(Ok(Message::Text(text))) => {
                return Ok(serde_json::from_str(&text).expect("JSON frame"));
            }
            Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| f.code.into())),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err(None),
        }
    }
}

/// Behind an https public URL, a cookie WebSocket from the public origin is served, but
/// one whose `Origin` merely matches the `Host` it reached is closed with 4003.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_websocket_origin_follows_the_public_url() {
    let (_dir, server) = start(&[("LIVECREDITS_PUBLIC_URL", PUBLIC_URL)]);
    let cookie = format!("livecredits_session={}", user_token("alice"));
    let snapshot = ws_first(&server, &[("cookie", &cookie), ("origin", PUBLIC_URL)])
        .await
        .expect("the public origin is served");
    assert_eq!(snapshot["type"], "balance");
    assert_eq!(snapshot["user_id"], "alice");

    let own_host = format!("http://{}", server.addr);
    let refused = ws_first(&server, &[("cookie", &cookie), ("origin", &own_host)]).await;
    assert_eq!(
        refused.err(),
        Some(Some(app::wire::close::FORBIDDEN_ORIGIN)),
        "{own_host} is not where browsers reach us"
    );
}

/// Idempotency keys with a control character are `422 invalid_field` naming the key, and
/// change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_idempotency_keys_are_refused() {
    let (_dir, server) = start(&[]);
    let http = reqwest::Client::new();
    for key in ["a\u{0}b", "x\ny", "\u{7f}", "tab\there", "\u{1f}"] {
        let response = http
            .post(url(&server, paths::CHANGES))
            .bearer_auth(SERVICE_KEY)
            .json(
                &json!({"user_id": "alice", "amount": 5, "type": "grant", "idempotency_key": key}),
            )
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), 422, "{key:?}");
        let body: Value = response.json().await.expect("ApiError");
        assert_eq!(body["error"], "invalid_field", "{key:?}: {body}");
        let message = body["message"].as_str().expect("a message");
        assert!(message.contains("idempotency_key"), "{key:?}: {message}");
    }
    let balance = common::balance_over_http(&http, &server.addr, "alice").await;
    assert_eq!(
        (balance["balance"].as_i64(), balance["version"].as_i64()),
        (Some(0), Some(0))
    );
}
