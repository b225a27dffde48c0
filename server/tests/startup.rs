//! The `server` binary as an operator meets it: bad settings stop it with one clear line,
//! good ones serve until SIGTERM, which ends it cleanly.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// The built binary with a clean environment, run in an empty folder so no `.env` is read.
fn server(dir: &tempfile::TempDir, vars: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_server"));
    command
        .env_clear()
        .current_dir(dir.path())
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

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
        let output = server(&dir, &[("JWT_SECRET", "s"), (var, value)])
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
    let output = server(&dir, &[]).output().expect("server runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("JWT_SECRET: required"));
}

/// A valid configuration serves `/healthz`, and SIGTERM ends the process with status 0.
#[tokio::test]
async fn serves_until_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = format!("sqlite://{}/db.sqlite", dir.path().display());
    let mut child = server(
        &dir,
        &[
            ("JWT_SECRET", "s"),
            ("LEPTOS_SITE_ADDR", "127.0.0.1:0"),
            ("DATABASE_URL", &database),
            ("RUST_LOG", "info"),
            ("NO_COLOR", "1"),
        ],
    )
    .spawn()
    .expect("server starts");

    let stdout = child.stdout.take().expect("piped stdout");
    let addr = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            let (_, rest) = line.split_once("listening on http://")?;
            rest.split_whitespace().next().map(str::to_owned)
        })
        .expect("the server announces its address");

    let health: serde_json::Value = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .expect("healthz answers")
        .json()
        .await
        .expect("JSON");
    assert_eq!(health["status"], "ok");

    let pid = child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(killed.expect("kill runs").success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waits") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running 10 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
}
