//! The `credits` command line against a real server process: every subcommand, and one clear
//! line with a distinct exit code for bad arguments, refused credentials and no server.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Output, Stdio},
};

use common::{SECRET, SERVICE_KEY, process::ServerProcess};
use serde_json::Value;

fn credits(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_credits"));
    command.env_clear().args(args).stdin(Stdio::null());
    command
}

fn run(args: &[&str]) -> Output {
    credits(args).output().expect("credits runs")
}

fn stderr_line(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    stderr
}

fn start_server() -> (tempfile::TempDir, ServerProcess) {
    let dir = tempfile::tempdir().expect("dir");
    let database = format!("sqlite://{}/db.sqlite", dir.path().display());
    let server = ServerProcess::start(
        dir.path(),
        &[
            ("JWT_SECRET", SECRET),
            ("SUPABASE_SERVICE_ROLE_KEY", SERVICE_KEY),
            ("DATABASE_URL", &database),
        ],
    );
    (dir, server)
}

/// `token` mints a user token the server accepts; `simulate` applies and replays changes.
#[test]
fn token_and_simulate() {
    let (_dir, server) = start_server();
    let url = format!("http://{}", server.addr);
    let minted = run(&["token", "alice", "--secret", SECRET, "--ttl", "10m"]);
    assert!(minted.status.success());
    let token = String::from_utf8(minted.stdout)
        .expect("UTF-8")
        .trim()
        .to_owned();
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(&token).expect("a JWT");
    assert_eq!(claims["sub"], "alice");

    let applied = run(&[
        "simulate",
        "alice",
        "-40",
        "spend",
        "--url",
        &url,
        "--service-token",
        SERVICE_KEY,
    ]);
    assert_eq!(
        applied.status.code(),
        Some(1),
        "insufficient credits is refused"
    );
    assert!(stderr_line(&applied).contains("insufficient"));

    let args = [
        "simulate",
        "alice",
        "500",
        "grant",
        "--url",
        &url,
        "--secret",
        SECRET,
        "--json",
        "--metadata",
        r#"{"order":"A-1"}"#,
        "--idempotency-key",
        "k-1",
    ];
    for replayed in [false, true] {
        let output = run(&args);
        assert!(output.status.success(), "{output:?}");
        let answer: Value = serde_json::from_slice(&output.stdout).expect("JSON line");
        assert_eq!(answer["event"]["balance"], 500);
        assert_eq!(answer["replayed"], replayed);
    }

    let service = run(&["token", "x", "--service", "--secret", SECRET]);
    let service_token = String::from_utf8(service.stdout)
        .expect("UTF-8")
        .trim()
        .to_owned();
    let via_jwt = run(&[
        "simulate",
        "alice",
        "1",
        "grant",
        "--url",
        &url,
        "--service-token",
        &service_token,
    ]);
    assert!(String::from_utf8_lossy(&via_jwt.stdout).contains("alice is now at 501"));
}

/// `hold`, `capture` and `release` drive the hold API; a retry says it was replayed and a
/// closed hold is one line on stderr.
#[test]
fn hold_capture_release() {
    let (_dir, server) = start_server();
    let url = format!("http://{}", server.addr);
    let service = ["--url", url.as_str(), "--service-token", SERVICE_KEY];
    let granted = run(&[&["simulate", "bob", "100", "grant"][..], &service].concat());
    assert!(granted.status.success(), "{granted:?}");

    let hold = |args: &[&str]| {
        let output = run(&[args, &service, &["--json"]].concat());
        assert!(output.status.success(), "{args:?}: {output:?}");
        serde_json::from_slice::<Value>(&output.stdout).expect("JSON line")
    };
    let place = [
        "hold",
        "bob",
        "30",
        "--ttl",
        "2m",
        "--idempotency-key",
        "job-1",
    ];
    let placed = hold(&place);
    assert_eq!(
        (&placed["event"]["available"], &placed["hold"]["status"]),
        (&Value::from(70), &Value::from("held"))
    );
    let again = hold(&place);
    assert_eq!(
        (&again["hold"], &again["replayed"]),
        (&placed["hold"], &Value::from(true))
    );
    let id = placed["hold"]["id"].as_str().expect("id").to_owned();
    let captured = hold(&["capture", &id, "12"]);
    assert_eq!(
        (
            &captured["event"]["balance"],
            &captured["event"]["available"]
        ),
        (&Value::from(88), &Value::from(88))
    );

    let text = run(&[&["capture", &id][..], &service].concat());
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("12 captured of 30"),
        "{text:?}"
    );
    let second = hold(&["hold", "bob", "10"]);
    let second_id = second["hold"]["id"].as_str().expect("id").to_owned();
    assert_eq!(hold(&["release", &second_id])["hold"]["status"], "released");
    let closed = run(&[&["release", &id][..], &service].concat());
    assert_eq!(closed.status.code(), Some(1));
    assert!(stderr_line(&closed).contains("captured"));
}

/// `ws`, `sse` and `poll` print the snapshot and then each change with its delay.
#[test]
fn watchers_print_updates() {
    let (_dir, server) = start_server();
    let url = format!("http://{}", server.addr);
    let token = common::user_token("bob");
    for (command, extra) in [("ws", None), ("sse", None), ("poll", Some("--wait=5"))] {
        let mut args = vec![command, token.as_str(), "--url", url.as_str(), "--json"];
        args.extend(extra);
        let mut child = credits(&args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("watcher");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let snapshot: Value =
            serde_json::from_str(&lines.next().expect("line").expect("read")).expect("JSON");
        assert_eq!(snapshot["change"], Value::Null, "{command}");
        let before = snapshot["version"].as_i64().expect("version");
        let applied = run(&[
            "simulate",
            "bob",
            "3",
            "grant",
            "--url",
            &url,
            "--service-token",
            SERVICE_KEY,
        ]);
        assert!(applied.status.success());
        let update: Value =
            serde_json::from_str(&lines.next().expect("line").expect("read")).expect("JSON");
        assert_eq!(update["version"], before + 1, "{command}");
        if command != "poll" {
            assert!(
                update["delay_ms"].as_f64().expect("delay") < 1_000.0,
                "{command}"
            );
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// `ws --mint` refreshes its token in place before each expires: with 3-second tokens it
/// stays on its first connection for four lifetimes and still prints the next change.
#[test]
fn ws_mint_refreshes_in_place() {
    let (_dir, server) = start_server();
    let url = format!("http://{}", server.addr);
    let args = [
        "ws", "--mint", "carol", "--ttl", "3s", "--secret", SECRET, "--url", &url, "--json",
    ];
    let mut child = credits(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("watcher");
    let stdout = child.stdout.take().expect("stdout");
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let Ok(value) = serde_json::from_str::<Value>(&line) else {
                return;
            };
            if lines.send(value).is_err() {
                return;
            }
        }
    });
    let next = || received.recv_timeout(std::time::Duration::from_secs(5));
    let snapshot = next().expect("the snapshot");
    assert_eq!(snapshot["version"], 0, "{snapshot}");
    let mut refreshed = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(12) {
        let line = next().expect("a refresh before the token expires");
        assert!(line["refreshed_until"].is_string(), "{line}");
        refreshed += 1;
    }
    assert!(refreshed >= 4, "{refreshed} refreshes in 12 s");
    assert!(child.try_wait().expect("status").is_none(), "still running");

    let applied = run(&[
        "simulate",
        "carol",
        "7",
        "grant",
        "--url",
        &url,
        "--service-token",
        SERVICE_KEY,
    ]);
    assert!(applied.status.success(), "{applied:?}");
    let update = loop {
        let line = next().expect("the change");
        if line["refreshed_until"].is_null() {
            break line;
        }
    };
    assert_eq!(
        (&update["version"], &update["balance"]),
        (&Value::from(1), &Value::from(7))
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Refused tokens exit 3, an unreachable server exits 4, bad arguments exit 2 — each with
/// one line on stderr.
#[test]
fn failures_are_one_line_with_distinct_codes() {
    let (_dir, server) = start_server();
    let url = format!("http://{}", server.addr);
    for command in ["ws", "sse", "poll"] {
        let refused = run(&[command, "not-a-token", "--url", &url]);
        assert_eq!(refused.status.code(), Some(3), "{command}");
        assert!(
            stderr_line(&refused).contains("authentication failed"),
            "{command}"
        );
        let unreachable = run(&[command, "t", "--url", "http://127.0.0.1:9"]);
        assert_eq!(unreachable.status.code(), Some(4), "{command}");
        assert!(
            stderr_line(&unreachable).contains("cannot reach"),
            "{command}"
        );
    }
    for bad in [
        vec!["simulate", "alice", "lots", "grant"],
        vec![
            "simulate",
            "alice",
            "5",
            "grant",
            "--metadata",
            "[1]",
            "--service-token",
            "k",
        ],
        vec!["token", "alice"],
        vec!["frobnicate"],
        vec![
            "bench",
            "poll",
            "--url",
            "http://10.1.2.3:3000",
            "--secret",
            "s",
        ],
    ] {
        let output = run(&bad);
        assert_eq!(output.status.code(), Some(2), "{bad:?}");
        stderr_line(&output);
    }
    let help = run(&["bench", "fanout", "--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--per-user"));
}
