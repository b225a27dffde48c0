//! `credits bench`: capacity, fan-out, polling and change-throughput benchmarks against
//! running instances. Loopback targets only; every run is bounded in count and time.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use app::wire::{BalanceEvent, BalanceSnapshot, WsServerMsg};
use clap::{Args, Subcommand};
use futures::StreamExt;
use serde_json::json;
use tokio::{net::TcpSocket, sync::Semaphore, task::JoinSet};
use tokio_tungstenite::tungstenite::{Message, protocol::WebSocketConfig};

use super::{Failure, Secret, ServiceAuth, watch::Output};

/// Longest any benchmark phase may run.
const MAX_DURATION: Duration = Duration::from_secs(15 * 60);
/// Most connections one bench process opens (a process may open 20,000 files here).
const MAX_CONNECTIONS: usize = 19_800;

#[derive(Subcommand)]
pub enum Bench {
    /// Open N idle connections, hold them, report how many held, the opening rate and the
    /// server's RSS per connection.
    Capacity {
        /// `ws` or `sse`.
        #[arg(long, default_value = "ws")]
        transport: String,
        #[arg(long)]
        connections: usize,
        /// How long to hold them open.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        hold: Duration,
        /// The server's process id, to read its RSS.
        #[arg(long)]
        server_pid: Option<u32>,
        #[command(flatten)]
        spread: Spread,
        #[command(flatten)]
        secret: Secret,
    },
    /// U users × C WebSocket connections while R changes/s are applied for D: delivered vs
    /// expected, change→client delay, POST latency.
    Fanout {
        #[arg(long, default_value_t = 100)]
        users: usize,
        #[arg(long, default_value_t = 5)]
        per_user: usize,
        /// Changes per second.
        #[arg(long, default_value_t = 100)]
        rate: u32,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Instances to apply changes through (default: --url); clients spread over --url.
        #[arg(long, value_delimiter = ',')]
        post_url: Vec<String>,
        #[command(flatten)]
        spread: Spread,
        #[command(flatten)]
        service: ServiceAuth,
    },
    /// P pollers polling as fast as they can for D: requests/s and latency.
    Poll {
        #[arg(long, default_value_t = 64)]
        pollers: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[command(flatten)]
        secret: Secret,
    },
    /// K concurrent clients commit N changes over U users: changes/s, then every final
    /// balance is checked against the sum of its changes.
    Changes {
        #[arg(long, default_value_t = 32)]
        clients: usize,
        #[arg(long, default_value_t = 10_000)]
        total: usize,
        #[arg(long, default_value_t = 100)]
        users: usize,
        #[arg(long, default_value = "bench-changes")]
        prefix: String,
        #[command(flatten)]
        service: ServiceAuth,
    },
}

/// How connections are spread: source addresses and user ids.
#[derive(Args)]
pub struct Spread {
    /// Local source addresses (loopback has ~28,000 ports per address pair).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
    /// Prefix of the user ids, so parallel bench processes do not share users.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
}

impl Bench {
    pub async fn run(self, url: &str, out: Output) -> Result<(), Failure> {
        let target = loopback_target(url).await?;
        let files = server::listener::raise_open_files_limit();
        let lag = LoopLag::start();
        match self {
            Self::Capacity {
                transport,
                connections,
                hold,
                server_pid,
                spread,
                secret,
            } => {
                check(
                    connections <= MAX_CONNECTIONS.min(files as usize),
                    "--connections exceeds the open-files limit",
                )?;
                check(hold <= MAX_DURATION, "--hold is limited to 15 minutes")?;
                capacity(
                    url,
                    target,
                    &transport,
                    connections,
                    hold,
                    server_pid,
                    &spread,
                    &secret,
                    out,
                )
                .await?;
            }
            Self::Fanout {
                users,
                per_user,
                rate,
                duration,
                post_url,
                spread,
                service,
            } => {
                check(
                    users * per_user <= MAX_CONNECTIONS,
                    "too many connections for one process",
                )?;
                check(
                    duration <= MAX_DURATION,
                    "--duration is limited to 15 minutes",
                )?;
                let posts = if post_url.is_empty() {
                    vec![url.to_owned()]
                } else {
                    post_url
                };
                for post in &posts {
                    loopback_target(post).await?;
                }
                fanout(
                    url, target, users, per_user, rate, duration, &posts, &spread, &service, out,
                )
                .await?;
            }
            Self::Poll {
                pollers,
                duration,
                secret,
            } => {
                check(
                    duration <= MAX_DURATION,
                    "--duration is limited to 15 minutes",
                )?;
                poll(url, pollers, duration, &secret, out).await?;
            }
            Self::Changes {
                clients,
                total,
                users,
                prefix,
                service,
            } => {
                check(
                    total <= 1_000_000 && users > 0,
                    "--total is limited to 1,000,000",
                )?;
                changes(url, clients, total, users, &prefix, &service, out).await?;
            }
        }
        let (p99, max) = lag.report();
        out.line(
            &format!("client event-loop lag: p99 {p99:.2} ms, max {max:.2} ms"),
            &json!({ "client_loop_lag_ms": { "p99": p99, "max": max } }),
        );
        Ok(())
    }
}

fn check(ok: bool, message: &str) -> Result<(), Failure> {
    if ok {
        Ok(())
    } else {
        Err(Failure::usage(message))
    }
}

/// The socket address of `url`, refusing anything but loopback.
async fn loopback_target(url: &str) -> Result<SocketAddr, Failure> {
    let authority = url
        .split_once("://")
        .map(|(_, rest)| rest.split('/').next().unwrap_or(rest))
        .ok_or_else(|| Failure::usage(format!("{url} is not an http:// URL")))?;
    let addr = tokio::net::lookup_host(authority)
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| Failure::usage(format!("cannot resolve {authority}")))?;
    check(
        addr.ip().is_loopback(),
        "benchmarks only target loopback addresses",
    )?;
    Ok(addr)
}

/// Percentiles of a sample, in its unit.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn summary(mut sample: Vec<f64>) -> serde_json::Value {
    sample.sort_by(f64::total_cmp);
    json!({
        "count": sample.len(),
        "p50": percentile(&sample, 0.50),
        "p90": percentile(&sample, 0.90),
        "p99": percentile(&sample, 0.99),
        "max": sample.last().copied().unwrap_or(0.0),
    })
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Measures how late a 10 ms timer fires on the client's own runtime.
struct LoopLag {
    samples: Arc<Mutex<Vec<f64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LoopLag {
    fn start() -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&samples);
        let task = tokio::spawn(async move {
            loop {
                let started = Instant::now();
                tokio::time::sleep(Duration::from_millis(10)).await;
                let late = started.elapsed().as_secs_f64() * 1000.0 - 10.0;
                record.lock().expect("lag samples").push(late.max(0.0));
            }
        });
        Self { samples, task }
    }

    fn report(self) -> (f64, f64) {
        self.task.abort();
        let mut samples = self.samples.lock().expect("lag samples").clone();
        samples.sort_by(f64::total_cmp);
        (
            percentile(&samples, 0.99),
            samples.last().copied().unwrap_or(0.0),
        )
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A WebSocket from `source`, with small buffers so the client can hold many.
async fn open_ws(
    target: SocketAddr,
    source: IpAddr,
    host: &str,
    token: &str,
) -> Result<Socket, String> {
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| e.to_string())?;
    let stream = socket.connect(target).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let request = format!("ws://{host}/ws?token={token}");
    let (socket, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .map_err(|e| e.to_string())?;
    Ok(socket)
}

fn host_of(url: &str) -> &str {
    url.split_once("://")
        .map_or(url, |(_, rest)| rest.split('/').next().unwrap_or(rest))
}

#[allow(clippy::too_many_arguments)]
async fn capacity(
    url: &str,
    target: SocketAddr,
    transport: &str,
    connections: usize,
    hold: Duration,
    server_pid: Option<u32>,
    spread: &Spread,
    secret: &Secret,
    out: Output,
) -> Result<(), Failure> {
    check(
        matches!(transport, "ws" | "sse"),
        "--transport is ws or sse",
    )?;
    let baseline = server_pid.and_then(rss_kib);
    let opened = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(spread.concurrency.max(1)));
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + MAX_DURATION.min(hold + Duration::from_secs(120));
    let release = Arc::new(tokio::sync::Notify::new());
    let http: Vec<reqwest::Client> = spread
        .sources
        .iter()
        .map(|source| {
            reqwest::Client::builder()
                .local_address(*source)
                .build()
                .unwrap_or_default()
        })
        .collect();
    let mut tasks = JoinSet::new();
    for i in 0..connections {
        let token = secret.user_token(
            &format!("{}-{i}", spread.prefix),
            hold + Duration::from_secs(600),
        )?;
        let source = spread.sources[i % spread.sources.len()];
        let client = http[i % http.len()].clone();
        let (gate, opened, dropped, release) = (
            gate.clone(),
            opened.clone(),
            dropped.clone(),
            release.clone(),
        );
        let (host, url, sse) = (host_of(url).to_owned(), url.to_owned(), transport == "sse");
        tasks.spawn(async move {
            let permit = gate.acquire_owned().await.expect("gate open");
            let held = async {
                if sse {
                    let mut stream = super::watch::open_sse(&client, &url, &token).await.ok()?;
                    stream.next().await?;
                    drop(permit);
                    opened.fetch_add(1, Ordering::Relaxed);
                    tokio::select! { _ = async { while stream.next().await.is_some() {} } => None, () = release.notified() => Some(()) }
                } else {
                    let mut socket = open_ws(target, source, &host, &token).await.ok()?;
                    socket.next().await?.ok()?;
                    drop(permit);
                    opened.fetch_add(1, Ordering::Relaxed);
                    tokio::select! { _ = async { while let Some(Ok(_)) = socket.next().await {} } => None, () = release.notified() => Some(()) }
                }
            };
            if tokio::time::timeout_at(deadline, held).await.ok().flatten().is_none() {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        });
        if i % 1000 == 999 {
            tokio::task::yield_now().await;
        }
    }
    while opened.load(Ordering::Relaxed) + dropped.load(Ordering::Relaxed) < connections
        && started.elapsed() < Duration::from_secs(120)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open_secs = started.elapsed().as_secs_f64();
    let open_count = opened.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = server_pid.and_then(rss_kib);
    let per_connection = match (baseline, loaded) {
        (Some(before), Some(after)) if open_count > 0 => {
            Some((after.saturating_sub(before)) as f64 / open_count as f64)
        }
        _ => None,
    };
    tokio::time::sleep(hold).await;
    let dropped_during = dropped.load(Ordering::Relaxed);
    release.notify_waiters();
    tasks.shutdown().await;
    let rate = open_count as f64 / open_secs;
    out.line(
        &format!(
            "{transport}: opened {open_count}/{connections} at {rate:.0}/s; held {} for {hold:?} ({dropped_during} dropped); server RSS {} → {} KiB = {} KiB per connection",
            open_count.saturating_sub(dropped_during),
            baseline.map_or("?".into(), |v| v.to_string()),
            loaded.map_or("?".into(), |v| v.to_string()),
            per_connection.map_or("?".into(), |v| format!("{v:.2}")),
        ),
        &json!({
            "bench": "capacity", "transport": transport, "requested": connections,
            "opened": open_count, "dropped": dropped_during, "open_per_second": rate,
            "hold_seconds": hold.as_secs(), "rss_before_kib": baseline, "rss_after_kib": loaded,
            "rss_per_connection_kib": per_connection,
        }),
    );
    Ok(())
}

/// What each fan-out connection saw.
#[derive(Default)]
struct Seen {
    delays_ms: Vec<f64>,
    events: usize,
    out_of_order: usize,
}

#[allow(clippy::too_many_arguments)]
async fn fanout(
    url: &str,
    target: SocketAddr,
    users: usize,
    per_user: usize,
    rate: u32,
    duration: Duration,
    post_urls: &[String],
    spread: &Spread,
    service: &ServiceAuth,
    out: Output,
) -> Result<(), Failure> {
    let service_token = service.token()?;
    let host = host_of(url).to_owned();
    let gate = Arc::new(Semaphore::new(spread.concurrency.max(1)));
    let stop = Arc::new(tokio::sync::Notify::new());
    let ready = Arc::new(AtomicUsize::new(0));
    let mut clients = JoinSet::new();
    let user_id = |u: usize| format!("{}-{u}", spread.prefix);
    for i in 0..users * per_user {
        let user = i % users;
        let token = service
            .secret
            .user_token(&user_id(user), duration + Duration::from_secs(600))?;
        let source = spread.sources[i % spread.sources.len()];
        let (gate, stop, ready, host) = (gate.clone(), stop.clone(), ready.clone(), host.clone());
        clients.spawn(async move {
            let permit = gate.acquire_owned().await.expect("gate open");
            let mut socket = open_ws(target, source, &host, &token).await.ok()?;
            let mut last = match socket.next().await?.ok()? {
                Message::Text(text) => serde_json::from_str::<BalanceEvent>(&text).ok()?.version,
                _ => return None,
            };
            drop(permit);
            ready.fetch_add(1, Ordering::Relaxed);
            let mut seen = Seen::default();
            loop {
                let frame = tokio::select! { frame = socket.next() => frame, () = stop.notified() => break };
                let Some(Ok(Message::Text(text))) = frame else { if frame.is_none() { break } else { continue } };
                let Ok(WsServerMsg::Balance(event)) = serde_json::from_str(&text) else { continue };
                if let Some(change) = &event.change {
                    let delay = chrono::Utc::now() - change.created_at;
                    seen.delays_ms.push(delay.num_microseconds().unwrap_or(0) as f64 / 1000.0);
                }
                if event.version <= last {
                    seen.out_of_order += 1;
                }
                last = last.max(event.version);
                seen.events += 1;
            }
            Some(seen)
        });
    }
    let total = users * per_user;
    let opening = Instant::now();
    while ready.load(Ordering::Relaxed) < total && opening.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected = ready.load(Ordering::Relaxed);

    let http = reqwest::Client::new();
    let committed = Arc::new(AtomicU64::new(0));
    let post_latency = Arc::new(Mutex::new(Vec::new()));
    let mut posts = JoinSet::new();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    let load_started = Instant::now();
    let mut n = 0usize;
    while load_started.elapsed() < duration {
        ticker.tick().await;
        let request = json!({ "user_id": user_id(n % users), "amount": 1, "type": "bench" });
        let url = format!("{}/api/credits/changes", post_urls[n % post_urls.len()]);
        let (http, token, committed, latency) = (
            http.clone(),
            service_token.clone(),
            committed.clone(),
            post_latency.clone(),
        );
        posts.spawn(async move {
            let sent = Instant::now();
            if let Ok(response) = http
                .post(url)
                .bearer_auth(token)
                .json(&request)
                .send()
                .await
                && response.status() == reqwest::StatusCode::CREATED
            {
                committed.fetch_add(1, Ordering::Relaxed);
                latency
                    .lock()
                    .expect("latencies")
                    .push(sent.elapsed().as_secs_f64() * 1000.0);
            }
        });
        n += 1;
    }
    while posts.join_next().await.is_some() {}
    let achieved_rate =
        committed.load(Ordering::Relaxed) as f64 / load_started.elapsed().as_secs_f64();
    // Let the last events arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.notify_waiters();
    let mut delays = Vec::new();
    let (mut received, mut out_of_order) = (0usize, 0usize);
    while let Some(result) = clients.join_next().await {
        if let Ok(Some(seen)) = result {
            received += seen.events;
            out_of_order += seen.out_of_order;
            delays.extend(seen.delays_ms);
        }
    }
    let expected = committed.load(Ordering::Relaxed) as usize * per_user * connected / total.max(1);
    let delay = summary(delays);
    let post = summary(post_latency.lock().expect("latencies").clone());
    out.line(
        &format!(
            "fan-out: {connected} connections ({users} users × {per_user}), {achieved_rate:.0} changes/s for {duration:?}; delivered {received}/{expected}, out of order {out_of_order}; change→client p50 {:.2} p90 {:.2} p99 {:.2} max {:.2} ms; POST p50 {:.2} p99 {:.2} ms",
            delay["p50"].as_f64().unwrap_or(0.0), delay["p90"].as_f64().unwrap_or(0.0),
            delay["p99"].as_f64().unwrap_or(0.0), delay["max"].as_f64().unwrap_or(0.0),
            post["p50"].as_f64().unwrap_or(0.0), post["p99"].as_f64().unwrap_or(0.0),
        ),
        &json!({
            "bench": "fanout", "connections": connected, "users": users, "per_user": per_user,
            "changes_per_second": achieved_rate, "delivered": received, "expected": expected,
            "out_of_order": out_of_order, "delay_ms": delay, "post_ms": post,
        }),
    );
    Ok(())
}

async fn poll(
    url: &str,
    pollers: usize,
    duration: Duration,
    secret: &Secret,
    out: Output,
) -> Result<(), Failure> {
    let http = reqwest::Client::new();
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for i in 0..pollers {
        let token = secret.user_token(
            &format!("bench-poll-{i}"),
            duration + Duration::from_secs(600),
        )?;
        let (http, url) = (http.clone(), format!("{url}/api/credits/balance/poll"));
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0usize;
            while started.elapsed() < duration {
                let sent = Instant::now();
                match http.get(&url).bearer_auth(&token).send().await {
                    Ok(response) if response.status().is_success() => {
                        let _ = response.bytes().await;
                        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                    }
                    _ => failures += 1,
                }
            }
            (latencies, failures)
        });
    }
    let (mut latencies, mut failures) = (Vec::new(), 0);
    while let Some(Ok((sample, failed))) = tasks.join_next().await {
        latencies.extend(sample);
        failures += failed;
    }
    let per_second = latencies.len() as f64 / started.elapsed().as_secs_f64();
    let latency = summary(latencies);
    out.line(
        &format!(
            "polling: {pollers} pollers, {per_second:.0} requests/s answered ({failures} failed); latency p50 {:.2} p99 {:.2} ms",
            latency["p50"].as_f64().unwrap_or(0.0), latency["p99"].as_f64().unwrap_or(0.0),
        ),
        &json!({ "bench": "poll", "pollers": pollers, "requests_per_second": per_second, "failed": failures, "latency_ms": latency }),
    );
    Ok(())
}

async fn balance_of(
    http: &reqwest::Client,
    url: &str,
    token: &str,
) -> Result<BalanceSnapshot, Failure> {
    http.get(format!("{url}/api/credits/balance"))
        .bearer_auth(token)
        .send()
        .await
        .map_err(|err| Failure::unreachable(url, err))?
        .json()
        .await
        .map_err(|err| Failure::other(format!("unexpected balance answer: {err}")))
}

async fn changes(
    url: &str,
    clients: usize,
    total: usize,
    users: usize,
    prefix: &str,
    service: &ServiceAuth,
    out: Output,
) -> Result<(), Failure> {
    let http = reqwest::Client::new();
    let service_token = service.token()?;
    let user_id = |u: usize| format!("{prefix}-{u}");
    let mut tokens = Vec::with_capacity(users);
    let mut expected = HashMap::new();
    for u in 0..users {
        let token = service
            .secret
            .user_token(&user_id(u), Duration::from_secs(3600))?;
        expected.insert(u, balance_of(&http, url, &token).await?.balance);
        tokens.push(token);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..clients.max(1) {
        let (http, next, token, url) = (
            http.clone(),
            next.clone(),
            service_token.clone(),
            url.to_owned(),
        );
        let prefix = prefix.to_owned();
        tasks.spawn(async move {
            let mut applied: HashMap<usize, i64> = HashMap::new();
            let mut failures = 0usize;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                let (user, amount) = (n % users, 1 + (n % 7) as i64);
                let request = json!({ "user_id": format!("{prefix}-{user}"), "amount": amount, "type": "bench" });
                match http.post(format!("{url}/api/credits/changes")).bearer_auth(&token).json(&request).send().await {
                    Ok(response) if response.status() == reqwest::StatusCode::CREATED => {
                        *applied.entry(user).or_default() += amount;
                    }
                    _ => failures += 1,
                }
            }
            (applied, failures)
        });
    }
    let mut failures = 0;
    while let Some(Ok((applied, failed))) = tasks.join_next().await {
        failures += failed;
        for (user, amount) in applied {
            *expected.entry(user).or_default() += amount;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let committed = total - failures;
    let mut mismatched = 0;
    for (u, token) in tokens.iter().enumerate() {
        if balance_of(&http, url, token).await?.balance != expected[&u] {
            mismatched += 1;
        }
    }
    out.line(
        &format!(
            "changes: {committed} committed in {seconds:.2} s = {:.0}/s with {clients} clients ({failures} failed); final balances {}",
            committed as f64 / seconds,
            if mismatched == 0 { "all equal their sums".to_owned() } else { format!("WRONG for {mismatched} users") },
        ),
        &json!({
            "bench": "changes", "committed": committed, "failed": failures, "seconds": seconds,
            "changes_per_second": committed as f64 / seconds, "clients": clients,
            "balances_mismatched": mismatched,
        }),
    );
    if mismatched > 0 {
        return Err(Failure::other(
            "final balances do not equal the sums of their changes",
        ));
    }
    Ok(())
}
