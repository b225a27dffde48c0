//! Two real server processes sharing one PostgreSQL database and one Redis: changes made
//! through either reach every client on both, and a Redis outage heals by itself.

mod common;

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use app::wire::paths;
use common::{SERVICE_KEY, TestDb, process::ServerProcess, user_token};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The `/metrics` line of an instance holding exactly one long-poll.
const HELD_POLL: &str = r#"livecredits_connections{transport="poll"} 1"#;

fn redis_url() -> String {
    std::env::var("LIVECREDITS_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Two instances on one database and one Redis channel prefix of this test's own.
struct Pair {
    a: ServerProcess,
    b: ServerProcess,
    http: reqwest::Client,
    vars: Vec<(&'static str, String)>,
    dirs: [tempfile::TempDir; 2],
}

impl Pair {
    fn start(db: &TestDb, redis: &str) -> Self {
        let database = match &db.url {
            server::config::DatabaseUrl::Postgres(url) => url.clone(),
            server::config::DatabaseUrl::Sqlite(_) => unreachable!("PostgreSQL"),
        };
        let prefix = format!("test-{}", uuid::Uuid::now_v7().simple());
        let vars = vec![
            ("JWT_SECRET", common::SECRET.to_owned()),
            ("SUPABASE_SERVICE_ROLE_KEY", SERVICE_KEY.to_owned()),
            ("DATABASE_URL", database),
            ("REDIS_URL", redis.to_owned()),
            ("REDIS_CHANNEL_PREFIX", prefix),
        ];
        let dirs = [
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        ];
        Self {
            a: start_instance(&vars, &dirs[0]),
            b: start_instance(&vars, &dirs[1]),
            http: reqwest::Client::new(),
            vars,
            dirs,
        }
    }

    /// Starts one more instance with the same settings; returns once it says it listens.
    fn start_another(&self) -> ServerProcess {
        start_instance(&self.vars, &self.dirs[1])
    }

    async fn change(&self, via: &ServerProcess, user: &str, amount: i64) -> Value {
        let response = self
            .http
            .post(format!("http://{}{}", via.addr, paths::CHANGES))
            .bearer_auth(SERVICE_KEY)
            .json(&json!({"user_id": user, "amount": amount, "type": "grant"}))
            .send()
            .await
            .expect("change");
        assert_eq!(response.status(), 201);
        response.json().await.expect("event")
    }

    async fn readiness(&self, instance: &ServerProcess) -> String {
        let body: Value = self
            .http
            .get(format!("http://{}{}", instance.addr, paths::READYZ))
            .send()
            .await
            .expect("readyz")
            .json()
            .await
            .expect("JSON");
        body["status"].as_str().unwrap_or_default().to_owned()
    }

    /// `instance`'s `/metrics` text.
    async fn metrics(&self, instance: &ServerProcess) -> String {
        self.http
            .get(format!("http://{}{}", instance.addr, paths::METRICS))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// Waits until both instances report `status`.
    async fn both_become(&self, status: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let (a, b) = (self.readiness(&self.a).await, self.readiness(&self.b).await);
            if a == status && b == status {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "readiness {a}/{b}, expected {status}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn start_instance(vars: &[(&str, String)], dir: &tempfile::TempDir) -> ServerProcess {
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    ServerProcess::start(dir.path(), &vars)
}

async fn ws(instance: &ServerProcess, user: &str) -> Ws {
    let url = format!(
        "ws://{}{}?token={}",
        instance.addr,
        paths::WS,
        user_token(user)
    );
    tokio_tungstenite::connect_async(url)
        .await
        .expect("WebSocket")
        .0
}

/// The next balance event within `limit`.
async fn next_event(ws: &mut Ws, limit: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .ok()??
            .ok()?;
        if let Message::Text(text) = frame {
            return serde_json::from_str(&text).ok();
        }
    }
}

async fn versions_until(ws: &mut Ws, last: i64) -> Vec<i64> {
    let mut seen = Vec::new();
    while seen.last() != Some(&last) {
        let event = next_event(ws, Duration::from_secs(5))
            .await
            .expect("event in time");
        seen.push(event["version"].as_i64().expect("version"));
    }
    seen
}

/// A change through A reaches WebSocket, SSE and long-poll clients on B within a second,
/// and clients of one user on A and B see every change once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_clients_on_the_other_instance() {
    let db = TestDb::postgres().await;
    let pair = Pair::start(&db, &redis_url());
    pair.both_become("ready", Duration::from_secs(10)).await;

    let mut on_b = ws(&pair.b, "alice").await;
    let mut on_a = ws(&pair.a, "alice").await;
    assert_eq!(
        next_event(&mut on_b, Duration::from_secs(5))
            .await
            .expect("snapshot")["version"],
        0
    );
    next_event(&mut on_a, Duration::from_secs(5))
        .await
        .expect("snapshot");
    let mut sse = pair
        .http
        .get(format!("http://{}{}", pair.b.addr, paths::SSE))
        .bearer_auth(user_token("alice"))
        .send()
        .await
        .expect("SSE");

    let sent = Instant::now();
    pair.change(&pair.a, "alice", 10).await;
    let event = next_event(&mut on_b, Duration::from_secs(1))
        .await
        .expect("within 1 s on B");
    assert_eq!(
        (event["balance"].as_i64(), event["version"].as_i64()),
        (Some(10), Some(1))
    );
    let mut sse_text = String::new();
    while !sse_text.contains("\"version\":1") {
        let chunk = tokio::time::timeout(Duration::from_secs(1), sse.chunk())
            .await
            .expect("SSE within 1 s")
            .expect("readable")
            .expect("open");
        sse_text.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
    }
    assert!(sent.elapsed() < Duration::from_secs(2));

    let poll = {
        let http = pair.http.clone();
        let url = format!("http://{}{}?version=1&wait=10", pair.b.addr, paths::POLL);
        tokio::spawn(async move {
            let response = http
                .get(url)
                .bearer_auth(user_token("alice"))
                .send()
                .await
                .expect("poll");
            let answered = Instant::now();
            (answered, response.json::<Value>().await.expect("JSON"))
        })
    };
    // B holds the poll: it counts it as open, and 200 ms later has still not answered.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pair.metrics(&pair.b).await.lines().any(|l| l == HELD_POLL) {
        assert!(Instant::now() < deadline, "B never held the poll");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !poll.is_finished(),
        "the poll was answered before any change"
    );
    let changed = Instant::now();
    pair.change(&pair.a, "alice", 1).await;
    let (answered, woke) = tokio::time::timeout(Duration::from_secs(1), poll)
        .await
        .expect("poll wakes")
        .expect("poller");
    assert!(answered >= changed, "answered only after the change");
    assert_eq!(woke["version"], 2);

    for i in 0..20 {
        let via = if i % 2 == 0 { &pair.a } else { &pair.b };
        pair.change(via, "alice", 1).await;
    }
    let expected: Vec<i64> = (1..=22).collect();
    assert_eq!(versions_until(&mut on_a, 22).await, expected);
    // B already read version 1 above.
    assert_eq!(versions_until(&mut on_b, 22).await, expected[1..]);
}

/// 2 × 200 concurrent changes through both instances give the exact total, and clients on
/// both end on the final version with versions only increasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_through_both_instances() {
    let db = TestDb::postgres().await;
    let pair = Pair::start(&db, &redis_url());
    pair.both_become("ready", Duration::from_secs(10)).await;
    let mut on_a = ws(&pair.a, "bob").await;
    let mut on_b = ws(&pair.b, "bob").await;

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..400_i64 {
        let http = pair.http.clone();
        let addr = if i % 2 == 0 {
            pair.a.addr.clone()
        } else {
            pair.b.addr.clone()
        };
        tasks.spawn(async move {
            let response = http
                .post(format!("http://{addr}{}", paths::CHANGES))
                .bearer_auth(SERVICE_KEY)
                .json(&json!({"user_id": "bob", "amount": i + 1, "type": "grant"}))
                .send()
                .await
                .expect("change");
            assert_eq!(response.status(), 201);
        });
    }
    tasks.join_all().await;

    for ws in [&mut on_a, &mut on_b] {
        let versions = versions_until(ws, 400).await;
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "versions only increase"
        );
    }
    let balance = common::balance_over_http(&pair.http, &pair.b.addr, "bob").await;
    assert_eq!(balance["balance"], (1..=400).sum::<i64>());
    assert_eq!(balance["version"], 400);
}

/// A Redis server owned by this test, on a port of its own.
struct OwnRedis {
    port: u16,
    child: Child,
}

impl OwnRedis {
    fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                // `cli` signs in as this user, so it works whatever a test does to `default`.
                "--user",
                "admin",
                "on",
                ">admin",
                "+@all",
                "~*",
                "&*",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (make test installs it)");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { port, child }
    }

    /// Runs one `redis-cli` command against this server; an error reply fails the test.
    fn cli(&self, args: &[&str]) {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(["--user", "admin", "--pass", "admin", "--no-auth-warning"])
            .args(args)
            .output()
            .expect("redis-cli");
        let reply = String::from_utf8_lossy(&output.stdout);
        let error = ["ERR", "NOAUTH", "NOPERM", "WRONGTYPE"]
            .iter()
            .any(|code| reply.starts_with(code));
        assert!(
            output.status.success() && !error,
            "redis-cli {args:?}: {reply}"
        );
    }

    fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With Redis down, changes still commit and reach the instance's own clients and both
/// instances report `degraded`; when Redis returns, the other instance's clients get the
/// balance they missed within 10 s and receive new changes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_degrades_then_heals() {
    let port = free_port();
    let redis = OwnRedis::start(port);
    let db = TestDb::postgres().await;
    let pair = Pair::start(&db, &format!("redis://127.0.0.1:{port}"));
    pair.both_become("ready", Duration::from_secs(10)).await;
    let mut on_a = ws(&pair.a, "carol").await;
    let mut on_b = ws(&pair.b, "carol").await;
    next_event(&mut on_a, Duration::from_secs(5))
        .await
        .expect("snapshot");
    next_event(&mut on_b, Duration::from_secs(5))
        .await
        .expect("snapshot");

    let port = redis.stop();
    pair.both_become("degraded", Duration::from_secs(5)).await;
    let event = pair.change(&pair.a, "carol", 25).await;
    assert_eq!(
        event["balance"], 25,
        "the change commits while Redis is down"
    );
    let local = next_event(&mut on_a, Duration::from_secs(1))
        .await
        .expect("A's client");
    assert_eq!(local["balance"], 25);

    let redis = OwnRedis::start(port);
    let healed = next_event(&mut on_b, Duration::from_secs(10))
        .await
        .expect("B heals within 10 s");
    assert_eq!(
        (healed["balance"].as_i64(), healed["version"].as_i64()),
        (Some(25), Some(1))
    );
    pair.both_become("ready", Duration::from_secs(5)).await;
    pair.change(&pair.a, "carol", 5).await;
    let after = next_event(&mut on_b, Duration::from_secs(1))
        .await
        .expect("new changes flow again");
    assert_eq!(after["balance"], 30);
    drop(redis);
}

/// With Redis unreachable at start-up the instance still starts and serves, reports
/// `degraded` with the reason, and becomes ready once Redis answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_degraded_without_redis() {
    let port = free_port();
    let dir = tempfile::tempdir().expect("dir");
    let database = format!("sqlite://{}/db.sqlite", dir.path().display());
    let redis = format!("redis://127.0.0.1:{port}");
    let server = ServerProcess::start(
        dir.path(),
        &[
            ("JWT_SECRET", common::SECRET),
            ("DATABASE_URL", &database),
            ("REDIS_URL", &redis),
        ],
    );
    let http = reqwest::Client::new();
    let readiness = || async {
        http.get(format!("http://{}{}", server.addr, paths::READYZ))
            .send()
            .await
            .expect("readyz")
            .json::<Value>()
            .await
            .expect("JSON")
    };
    let degraded = readiness().await;
    assert_eq!(
        degraded,
        json!({"status": "degraded", "reasons": ["redis"]})
    );
    let balance = http
        .get(format!("http://{}{}", server.addr, paths::BALANCE))
        .bearer_auth(user_token("dora"))
        .send()
        .await
        .expect("balance");
    assert_eq!(balance.status(), 200, "serves while degraded");
    // Redis comes up only after the instance has been retrying for a while.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let _redis = OwnRedis::start(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while readiness().await["status"] != "ready" {
        assert!(
            Instant::now() < deadline,
            "not ready 10 s after Redis came up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.terminate();
    let (_, logs) = server.wait(Duration::from_secs(10));
    // The start-up warning itself: the subscriber's retry warnings also say "Redis
    // unreachable", so those words alone would pass without it.
    assert!(
        logs.contains("Redis unreachable at start-up: serving degraded"),
        "a start-up log line says why: {logs}"
    );
}

/// A change made through an instance within 50 ms of it announcing that it listens reaches
/// a client of that user on the other instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_right_after_start_up_reaches_the_other_instance() {
    let db = TestDb::postgres().await;
    let pair = Pair::start(&db, &redis_url());
    pair.both_become("ready", Duration::from_secs(10)).await;
    let mut on_a = ws(&pair.a, "frank").await;
    next_event(&mut on_a, Duration::from_secs(5))
        .await
        .expect("snapshot");

    let starting = pair.start_another();
    let listening = Instant::now();
    let change = pair.change(&starting, "frank", 9);
    assert!(listening.elapsed() < Duration::from_millis(50));
    change.await;
    let event = next_event(&mut on_a, Duration::from_secs(5))
        .await
        .expect("the change reaches A");
    assert_eq!(
        (event["balance"].as_i64(), event["version"].as_i64()),
        (Some(9), Some(1))
    );
}

/// A change whose publish timed out (Redis paused writes) and was then refused reaches the
/// other instance's client within 10 s of Redis accepting publishes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_publish_heals_when_redis_answers() {
    // The refusal makes the PUBLISH held by the pause fail when it finally runs, instead of
    // arriving late and healing the client by itself.
    let fault = Fault {
        before_change: &[&["CLIENT", "PAUSE", "30000", "WRITE"]],
        b_during: "ready",
        after_change: &[
            &["ACL", "SETUSER", "default", "-publish"],
            &["CLIENT", "UNPAUSE"],
        ],
        repair: &[&["ACL", "SETUSER", "default", "+publish"]],
    };
    fault.heals("gina").await;
}

/// A change made while the publishing connections were down and the subscribers stayed up
/// reaches the other instance's client within 10 s of Redis taking connections again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_skipped_while_the_publisher_was_down_heals() {
    // Connections already signed in survive `off`; new ones are refused, so the publishers
    // (the `normal` clients; subscribers are `pubsub`) stay down once killed.
    let fault = Fault {
        before_change: &[
            &["ACL", "SETUSER", "default", "off"],
            &["CLIENT", "KILL", "TYPE", "normal"],
        ],
        // Until fred notices, a publish would wait in its buffer and be sent on reconnection.
        b_during: "degraded",
        after_change: &[],
        repair: &[&["ACL", "SETUSER", "default", "on"]],
    };
    fault.heals("hugo").await;
}

/// `redis-cli` commands that make publishing fail around a change, and those that repair it.
struct Fault {
    before_change: &'static [&'static [&'static str]],
    /// B's readiness once `before_change` took effect; the change waits for it.
    b_during: &'static str,
    after_change: &'static [&'static [&'static str]],
    repair: &'static [&'static [&'static str]],
}

impl Fault {
    /// Makes a change through B under this fault, checks that A's client does not get it,
    /// then repairs Redis and expects the change on A within 10 s.
    async fn heals(&self, user: &str) {
        let redis = OwnRedis::start(free_port());
        let db = TestDb::postgres().await;
        let pair = Pair::start(&db, &format!("redis://127.0.0.1:{}", redis.port));
        pair.both_become("ready", Duration::from_secs(10)).await;
        let mut on_a = ws(&pair.a, user).await;
        next_event(&mut on_a, Duration::from_secs(5))
            .await
            .expect("snapshot");

        let run = |commands: &[&[&str]]| commands.iter().for_each(|args| redis.cli(args));
        run(self.before_change);
        let deadline = Instant::now() + Duration::from_secs(5);
        while pair.readiness(&pair.b).await != self.b_during {
            assert!(
                Instant::now() < deadline,
                "B never became {}",
                self.b_during
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pair.change(&pair.b, user, 7).await;
        // Longer than B's publish timeout (500 ms).
        tokio::time::sleep(Duration::from_secs(1)).await;
        run(self.after_change);
        assert!(
            next_event(&mut on_a, Duration::from_millis(500))
                .await
                .is_none(),
            "the fault kept the change from A"
        );
        run(self.repair);
        let healed = next_event(&mut on_a, Duration::from_secs(10))
            .await
            .expect("A heals within 10 s of Redis answering");
        assert_eq!(
            (healed["balance"].as_i64(), healed["version"].as_i64()),
            (Some(7), Some(1))
        );
    }
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port()
}
