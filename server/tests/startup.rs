//! The `server` binary as an operator meets it: bad settings stop it with one clear line,
//! good ones serve until SIGTERM, which closes live connections and ends it cleanly.

mod common;

use std::time::Duration;

use app::wire::paths;
use common::process::{ServerProcess, command, output_within};
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
    for (path, status) in [(paths::HEALTHZ, "ok"), (paths::READYZ, "ready")] {
        let body: serde_json::Value = reqwest::get(format!("http://{addr}{path}"))
            .await
            .expect("answers")
            .json()
            .await
            .expect("JSON");
        assert_eq!(body["status"], status, "{path}");
    }

    let url = format!(
        "ws://{addr}{}?token={}",
        paths::WS,
        common::user_token("alice")
    );
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

/// `/metrics` reports the allocator's live heap beside its resident pages, the pair that tells
/// a leak (both grow) from pages the allocator keeps (only resident grows), and the part of
/// those pages that is the allocator's own bookkeeping.
#[tokio::test]
async fn metrics_report_the_heap() {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = format!("sqlite://{}/db.sqlite", dir.path().display());
    let server = ServerProcess::start(
        dir.path(),
        &[("JWT_SECRET", common::SECRET), ("DATABASE_URL", &database)],
    );
    let text = reqwest::get(format!("http://{}{}", server.addr, paths::METRICS))
        .await
        .expect("answers")
        .text()
        .await
        .expect("text");
    let bytes = |name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    let allocated = bytes("livecredits_heap_allocated_bytes");
    let resident = bytes("livecredits_heap_resident_bytes");
    let metadata = bytes("livecredits_heap_metadata_bytes");
    assert!(
        allocated > 100_000,
        "a running server has a heap: {allocated}"
    );
    assert!(
        resident >= allocated,
        "resident {resident} < allocated {allocated}"
    );
    assert!(
        metadata > 0 && metadata < resident,
        "metadata {metadata} is a part of resident {resident}"
    );
    server.terminate();
}

/// Longest a refused start-up may take: an unreachable database is given up after 2 s.
const REFUSAL: Duration = Duration::from_secs(15);

/// Secrets shorter than 32 bytes stop start-up with one stderr line naming the variable.
#[test]
fn short_secrets_stop_start_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let short = "change-me-please";
    let cases = [
        ("JWT_SECRET", vec![("JWT_SECRET", short)]),
        ("SUPABASE_JWT_SECRET", vec![("SUPABASE_JWT_SECRET", short)]),
        (
            "SUPABASE_SERVICE_ROLE_KEY",
            vec![
                ("JWT_SECRET", common::SECRET),
                ("SUPABASE_SERVICE_ROLE_KEY", short),
            ],
        ),
    ];
    for (var, mut vars) in cases {
        // Should the check be missing, the server must not take anyone's usual port.
        vars.push(("LEPTOS_SITE_ADDR", "127.0.0.1:0"));
        let output = output_within(&mut command(dir.path(), &vars), REFUSAL);
        assert!(!output.status.success(), "a short {var} must fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line for {var}: {stderr}");
        assert!(lines[0].contains(&format!("{var}: too short")), "{stderr}");
        assert!(
            !stderr.contains(short),
            "the secret itself is not shown: {stderr}"
        );
    }
}

/// Dev sign-in on an address other machines can reach stops start-up with one stderr line
/// naming `LIVECREDITS_DEV_LOGIN`.
#[test]
fn dev_login_refuses_public_addresses() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = output_within(
        &mut command(
            dir.path(),
            &[
                ("LIVECREDITS_DEV_LOGIN", "1"),
                ("LEPTOS_SITE_ADDR", "0.0.0.0:0"),
            ],
        ),
        REFUSAL,
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("LIVECREDITS_DEV_LOGIN: "), "{stderr}");
}

/// Passwords in URLs never reach the server's output, at any log level: not in the line for
/// a malformed setting, nor when the database or Redis cannot be reached.
#[test]
fn url_passwords_never_reach_the_output() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases = [
        ("DATABASE_URL", "postgres://u:hunter2@127.0.0.1:1/x"),
        ("DATABASE_URL", "postgres:/u:hunter2@127.0.0.1:1/x"),
        (
            "DATABASE_URL",
            "postgres://u:hunter2@127.0.0.1:1/x?sslmode=bogus",
        ),
        ("REDIS_URL", "http://u:hunter2@127.0.0.1:1"),
        ("SUPABASE_URL", "ftp://u:hunter2@x.supabase.co"),
        (
            "LIVECREDITS_PUBLIC_URL",
            "https://u:hunter2@credits.example",
        ),
        ("CORS_ORIGINS", "https://u:hunter2@app.example"),
    ];
    // Each case waits on its own: an unreachable database is given up after 2 s.
    std::thread::scope(|scope| {
        for (var, value) in cases {
            let dir = dir.path();
            scope.spawn(move || {
                let output = output_within(
                    &mut command(
                        dir,
                        &[
                            ("JWT_SECRET", common::SECRET),
                            ("LEPTOS_SITE_ADDR", "127.0.0.1:0"),
                            (var, value),
                            ("RUST_LOG", "trace"),
                        ],
                    ),
                    REFUSAL,
                );
                assert!(!output.status.success(), "{var}={value} must fail");
                let stdout = String::from_utf8_lossy(&output.stdout);
                let stderr = String::from_utf8_lossy(&output.stderr);
                assert!(stderr.contains(&format!("{var}: ")), "{var}: {stderr}");
                assert!(
                    !stdout.contains("hunter2") && !stderr.contains("hunter2"),
                    "{var}: the password was printed:\n{stdout}\n{stderr}"
                );
            });
        }

        // An unreachable Redis does not stop start-up (delivery is degraded, and retried):
        // the warning and the retries' logs leave the password out too.
        scope.spawn(|| {
            let database = format!("sqlite://{}/db.sqlite", dir.path().display());
            let vars = [
                ("JWT_SECRET", common::SECRET),
                ("DATABASE_URL", database.as_str()),
                ("REDIS_URL", "redis://:hunter2@127.0.0.1:1"),
                ("RUST_LOG", "trace"),
            ];
            let output = match ServerProcess::try_start(dir.path(), &vars) {
                Ok(server) => {
                    std::thread::sleep(Duration::from_secs(2));
                    server.terminate();
                    server.wait(Duration::from_secs(10)).1
                }
                Err(output) => output,
            };
            assert!(output.contains("Redis"), "Redis is reported: {output}");
            assert!(
                !output.contains("hunter2"),
                "the password was printed:\n{output}"
            );
        });
    });
}

/// The mode bits of `path`.
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Dev mode warns at start-up, and keeps its data folder (0700), SQLite ledger and dev
/// secret (0600) for the server's own user alone.
#[test]
fn dev_mode_warns_and_keeps_files_owner_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let database = format!("sqlite://{}/db.sqlite", data.display());
    let data_dir = data.display().to_string();
    let server = ServerProcess::start(
        dir.path(),
        &[
            ("LIVECREDITS_DEV_LOGIN", "1"),
            ("DATABASE_URL", &database),
            ("LIVECREDITS_DATA_DIR", &data_dir),
        ],
    );
    server.terminate();
    let (status, output) = server.wait(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}: {output}");
    let warning = output
        .lines()
        .find(|line| line.contains("LIVECREDITS_DEV_LOGIN is on"))
        .unwrap_or_else(|| panic!("a dev sign-in warning: {output}"));
    assert!(warning.contains("WARN"), "{warning}");

    assert_eq!(mode(&data), 0o700, "data folder");
    assert_eq!(mode(&data.join("db.sqlite")), 0o600, "SQLite ledger");
    assert_eq!(mode(&data.join("dev-jwt-secret")), 0o600, "dev secret");
    for companion in ["db.sqlite-wal", "db.sqlite-shm"] {
        let path = data.join(companion);
        if path.exists() {
            assert_eq!(mode(&path), 0o600, "{companion}");
        }
    }
}
