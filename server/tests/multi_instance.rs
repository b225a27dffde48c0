//! Two real server processes sharing one PostgreSQL database and one Redis (or a Redis
//! Cluster): changes made through either reach every client on both, each instance listens
//! only to the channels of the users it serves, and outages and failovers heal by themselves.

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

/// How long the test instances keep a user's channel after their last connection.
const LINGER_S: u64 = 2;

/// Two instances on one database and one Redis channel prefix of this test's own.
struct Pair {
    a: ServerProcess,
    b: ServerProcess,
    http: reqwest::Client,
    prefix: String,
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
            ("REDIS_CHANNEL_PREFIX", prefix.clone()),
            ("LIVECREDITS_CHANNEL_LINGER_S", LINGER_S.to_string()),
        ];
        let dirs = [
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        ];
        Self {
            a: start_instance(&vars, &dirs[0]),
            b: start_instance(&vars, &dirs[1]),
            http: reqwest::Client::new(),
            prefix,
            vars,
            dirs,
        }
    }

    /// The Redis channel of `user`'s events (SPEC §6.1).
    fn channel(&self, user: &str) -> String {
        format!("{}:balance:{user}", self.prefix)
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
    fn cli(&self, args: &[&str]) -> String {
        let mut login = vec!["--user", "admin", "--pass", "admin", "--no-auth-warning"];
        login.extend_from_slice(args);
        redis_cli(self.port, &login)
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
        // Only Redis may bring A the change, not a late subscription's re-read.
        let channel = pair.channel(user);
        within(
            Duration::from_secs(5),
            "A listens to the user's channel",
            || subscribers(&redis.cli(&["PUBSUB", "NUMSUB", &channel])) == 1,
        )
        .await;

        let run = |commands: &[&[&str]]| {
            commands.iter().for_each(|args| {
                redis.cli(args);
            })
        };
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

/// One `redis-cli` command against the server on `port`; an error reply fails the test.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    let reply = String::from_utf8_lossy(&output.stdout).into_owned();
    let error = ["ERR", "NOAUTH", "NOPERM", "WRONGTYPE"]
        .iter()
        .any(|code| reply.starts_with(code));
    assert!(
        output.status.success() && !error,
        "redis-cli {args:?}: {reply}"
    );
    reply
}

/// The number `PUBSUB NUMSUB` or `PUBSUB SHARDNUMSUB` answers for one channel.
fn subscribers(reply: &str) -> u64 {
    reply
        .lines()
        .nth(1)
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or_else(|| panic!("not a NUMSUB reply: {reply:?}"))
}

/// Waits up to `limit` for `check` to hold.
async fn within(limit: Duration, what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `name value` of `metric` in an instance's `/metrics` text.
fn metric(text: &str, metric: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(metric)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {metric} in /metrics"))
}

/// SPEC §6.1: an instance subscribes to a user's channel while that user has a connection
/// on it, and only then; the channel goes after the linger. Another instance's changes for
/// users it does not serve never reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_listens_only_to_the_channels_of_its_users() {
    let redis = OwnRedis::start(free_port());
    let db = TestDb::postgres().await;
    let pair = Pair::start(&db, &format!("redis://127.0.0.1:{}", redis.port));
    pair.both_become("ready", Duration::from_secs(10)).await;
    let numsub = |user: &str| subscribers(&redis.cli(&["PUBSUB", "NUMSUB", &pair.channel(user)]));

    let mut on_b = ws(&pair.b, "ivy").await;
    next_event(&mut on_b, Duration::from_secs(5))
        .await
        .expect("snapshot");
    assert_eq!(numsub("ivy"), 1, "B listens, A does not");
    let mut on_a = ws(&pair.a, "ivy").await;
    next_event(&mut on_a, Duration::from_secs(5))
        .await
        .expect("snapshot");
    assert_eq!(numsub("ivy"), 2);
    assert_eq!(numsub("jack"), 0, "nobody is connected as jack");

    pair.change(&pair.a, "ivy", 3).await;
    let event = next_event(&mut on_b, Duration::from_secs(5))
        .await
        .expect("across");
    assert_eq!(event["balance"], 3);
    let received = metric(
        &pair.metrics(&pair.a).await,
        "livecredits_bus_messages_received_total",
    );
    for _ in 0..5 {
        pair.change(&pair.b, "jack", 1).await;
    }
    pair.change(&pair.b, "ivy", 1).await;
    next_event(&mut on_a, Duration::from_secs(5))
        .await
        .expect("ivy's change");
    next_event(&mut on_a, Duration::from_secs(5))
        .await
        .expect("ivy's change");
    let a_metrics = pair.metrics(&pair.a).await;
    assert_eq!(
        metric(&a_metrics, "livecredits_bus_messages_received_total") - received,
        1.0,
        "A received ivy's change, none of jack's"
    );
    assert_eq!(metric(&a_metrics, "livecredits_bus_channels"), 1.0);

    drop(on_a);
    drop(on_b);
    let closed = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(numsub("ivy"), 2, "kept during the linger");
    within(
        Duration::from_secs(LINGER_S + 3),
        "both unsubscribe",
        || numsub("ivy") == 0,
    )
    .await;
    assert!(
        closed.elapsed() >= Duration::from_secs(LINGER_S),
        "not before the linger"
    );
}

/// A Redis Cluster of this test's own (`scripts/redis-cluster.sh`): three masters, and a
/// replica each when asked.
struct OwnCluster {
    dir: tempfile::TempDir,
    first_port: u16,
}

impl OwnCluster {
    fn start(replicas: bool) -> Self {
        static STARTED: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        // Six ports per cluster, two clusters per process. Each node's bus listens on its
        // port + 10000, which stays below the ephemeral range (32768 up) so no client
        // socket can hold it.
        let slot = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let first_port =
            12_000 + u16::try_from(std::process::id() % 800).expect("small") * 12 + slot * 6;
        let dir = tempfile::tempdir().expect("dir");
        let started = Command::new("scripts/redis-cluster.sh")
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .arg("start")
            .arg(dir.path())
            .arg(first_port.to_string())
            .arg(if replicas { "1" } else { "0" })
            .output()
            .expect("scripts/redis-cluster.sh");
        assert!(
            started.status.success(),
            "the cluster did not start: {}",
            String::from_utf8_lossy(&started.stderr)
        );
        Self { dir, first_port }
    }

    fn masters(&self) -> [u16; 3] {
        [0, 1, 2].map(|i| self.first_port + i)
    }

    fn url(&self) -> String {
        let [seed, second, third] = self.masters();
        format!("redis-cluster://127.0.0.1:{seed}?node=127.0.0.1:{second}&node=127.0.0.1:{third}")
    }

    /// The master on which `channel` has a subscriber, and how many it has there.
    fn shard_subscribers(&self, channel: &str) -> Vec<(u16, u64)> {
        self.masters()
            .into_iter()
            .map(|port| {
                (
                    port,
                    subscribers(&redis_cli(port, &["PUBSUB", "SHARDNUMSUB", channel])),
                )
            })
            .collect()
    }

    fn total_subscribers(&self, channel: &str) -> u64 {
        self.shard_subscribers(channel).iter().map(|(_, n)| n).sum()
    }

    /// The master owning `slot`, as the node on `via` sees it.
    fn owner_of(&self, slot: u16, via: u16) -> u16 {
        // `redis-cli` prints CLUSTER SLOTS flat: start, end, then the master's ip and port.
        let reply = redis_cli(via, &["CLUSTER", "SLOTS"]);
        let lines: Vec<&str> = reply.lines().map(str::trim).collect();
        lines
            .windows(4)
            .find_map(|w| {
                let (start, end) = (w[0].parse::<u16>().ok()?, w[1].parse::<u16>().ok()?);
                let owns = w[2] == "127.0.0.1" && (start..=end).contains(&slot);
                owns.then(|| w[3].parse().ok()).flatten()
            })
            .expect("slot owner")
    }

    fn cluster_ok(&self, port: u16) -> bool {
        Command::new("redis-cli")
            .args(["-p", &port.to_string(), "CLUSTER", "INFO"])
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok"))
    }

    fn kill(&self, port: u16) {
        let pid = std::fs::read_to_string(self.dir.path().join(format!("redis-{port}.pid")))
            .expect("pid file");
        let status = Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = Command::new("scripts/redis-cluster.sh")
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

/// A user per master of the cluster: the first whose channel hashes to that master's slots.
fn users_on_every_shard(pair: &Pair, cluster: &OwnCluster) -> Vec<(String, u16)> {
    let mut found: Vec<(String, u16)> = Vec::new();
    for i in 0.. {
        let user = format!("spread-{i}");
        let slot = fred::util::redis_keyslot(pair.channel(&user).as_bytes());
        let owner = cluster.owner_of(slot, cluster.first_port);
        if found.iter().all(|(_, port)| *port != owner) {
            found.push((user, owner));
        }
        if found.len() == 3 {
            break;
        }
    }
    found
}

/// SPEC §6.1 with a Redis Cluster: two instances deliver across for users on every shard,
/// each channel is subscribed (sharded) on its own master by the instance serving the user
/// only, and dropped after the linger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_delivers_across_instances_on_every_shard() {
    let cluster = OwnCluster::start(false);
    let db = TestDb::postgres().await;
    let pair = Pair::start(&db, &cluster.url());
    pair.both_become("ready", Duration::from_secs(15)).await;

    for (user, master) in users_on_every_shard(&pair, &cluster) {
        let mut on_b = ws(&pair.b, &user).await;
        next_event(&mut on_b, Duration::from_secs(5))
            .await
            .expect("snapshot");
        let counts = cluster.shard_subscribers(&pair.channel(&user));
        assert!(
            counts
                .iter()
                .all(|&(port, n)| n == u64::from(port == master)),
            "{user}: one subscriber (B), on master {master}: {counts:?}"
        );
        pair.change(&pair.a, &user, 5).await;
        let event = next_event(&mut on_b, Duration::from_secs(5))
            .await
            .expect("across");
        assert_eq!(
            (event["balance"].as_i64(), event["version"].as_i64()),
            (Some(5), Some(1))
        );
        drop(on_b);
        within(
            Duration::from_secs(LINGER_S + 3),
            "unsubscribed after the linger",
            || cluster.total_subscribers(&pair.channel(&user)) == 0,
        )
        .await;
    }
}

/// Killing the master of a user's shard: a change made during the failover reaches the
/// other instance's client within 10 s of the cluster being back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_heals() {
    let cluster = OwnCluster::start(true);
    let db = TestDb::postgres().await;
    let pair = Pair::start(&db, &cluster.url());
    pair.both_become("ready", Duration::from_secs(15)).await;
    let user = "lena";
    let slot = fred::util::redis_keyslot(pair.channel(user).as_bytes());
    let master = cluster.owner_of(slot, cluster.first_port);
    let mut on_b = ws(&pair.b, user).await;
    next_event(&mut on_b, Duration::from_secs(5))
        .await
        .expect("snapshot");

    cluster.kill(master);
    pair.change(&pair.a, user, 11).await;
    let survivor = cluster
        .masters()
        .into_iter()
        .find(|&port| port != master)
        .expect("port");
    within(Duration::from_secs(30), "a replica takes over", || {
        cluster.cluster_ok(survivor) && cluster.owner_of(slot, survivor) != master
    })
    .await;
    let back = Instant::now();
    let event = next_event(&mut on_b, Duration::from_secs(10))
        .await
        .expect("healed within 10 s of the cluster being back");
    assert_eq!(
        (event["balance"].as_i64(), event["version"].as_i64()),
        (Some(11), Some(1))
    );
    assert!(back.elapsed() <= Duration::from_secs(10));
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port()
}
