//! `credits bench`: capacity, fan-out, polling and change-throughput benchmarks against
//! running instances. Loopback targets only; every run is bounded in count and time.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use app::wire::paths;
use clap::{Args, Subcommand};
use serde_json::json;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

mod capacity;
mod fanout;
mod load;
mod soak;

use super::{Failure, Secret, ServiceAuth, watch::Output};

/// Longest any benchmark phase may run.
const MAX_DURATION: Duration = Duration::from_secs(15 * 60);
/// Longest soak.
const MAX_SOAK: Duration = Duration::from_secs(3 * 3600);
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
        /// Connections per user, as when every tab of a browser held its own.
        #[arg(long, default_value_t = 1)]
        per_user: usize,
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
        /// Instances the clients connect to, each user's on one of them (default: --url).
        #[arg(long, value_delimiter = ',')]
        instance: Vec<String>,
        /// Instances to apply changes through (default: --instance). Each change goes
        /// through one other than its user's clients' wherever there is one, so that it
        /// crosses the bus.
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
    Changes(load::Load),
    /// K concurrent clients each place a hold and capture it, N times over U users:
    /// holds placed and captured per second, then every balance is checked against the
    /// captures.
    Holds(load::Load),
    /// U users × C WebSocket connections spread over the instances, R changes/s and P % of
    /// the connections reopened each second for D, while faults are injected from outside
    /// (scripts/soak.sh): then nothing acknowledged may be lost, no open connection stale,
    /// and the servers' RSS and open files must be back near where they started.
    Soak {
        #[arg(long, default_value_t = 2000)]
        users: usize,
        #[arg(long, default_value_t = 5)]
        per_user: usize,
        #[arg(long, default_value_t = 500)]
        rate: u32,
        /// Percent of the connections closed and reopened each second.
        #[arg(long, default_value_t = 5.0)]
        churn: f64,
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Instances to connect to and apply changes through (default: --url).
        #[arg(long, value_delimiter = ',')]
        instance: Vec<String>,
        /// The servers' process ids, to read their RSS and open files.
        #[arg(long, value_delimiter = ',')]
        server_pid: Vec<u32>,
        #[command(flatten)]
        spread: Spread,
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
        let files = server::net::raise_open_files_limit();
        let lag = LoopLag::start();
        match self {
            Self::Capacity {
                transport,
                connections,
                per_user,
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
                check(per_user > 0, "--per-user must be at least 1")?;
                capacity::run(
                    url,
                    target,
                    &transport,
                    connections,
                    per_user,
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
                instance,
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
                let instances = or_url(instance, url);
                let posts = if post_url.is_empty() {
                    instances.clone()
                } else {
                    post_url
                };
                let targets = loopback_targets(&instances).await?;
                loopback_targets(&posts).await?;
                let fanout = fanout::Fanout {
                    instances: &instances,
                    posts: &posts,
                    users,
                    per_user,
                    rate,
                    duration,
                };
                fanout.run(&targets, &spread, &service, out).await?;
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
                load::poll(url, pollers, duration, &secret, out).await?;
            }
            Self::Changes(load) => load::changes(url, &load, out).await?,
            Self::Holds(load) => load::holds(url, &load, out).await?,
            Self::Soak {
                users,
                per_user,
                rate,
                churn,
                duration,
                instance,
                server_pid,
                spread,
                service,
            } => {
                check(
                    users > 0 && users * per_user <= MAX_CONNECTIONS.min(files as usize),
                    "too many connections for one process",
                )?;
                check(duration <= MAX_SOAK, "--duration is limited to 3 hours")?;
                check((0.0..=100.0).contains(&churn), "--churn is a percentage")?;
                let instances = or_url(instance, url);
                let targets = loopback_targets(&instances).await?;
                let soak = soak::Soak {
                    instances: &instances,
                    users,
                    per_user,
                    rate,
                    churn,
                    duration,
                    server_pids: &server_pid,
                };
                soak.run(&targets, &spread, &service, out).await?;
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

/// The instances named, or `--url` alone.
fn or_url(instances: Vec<String>, url: &str) -> Vec<String> {
    if instances.is_empty() {
        vec![url.to_owned()]
    } else {
        instances
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

async fn loopback_targets(urls: &[String]) -> Result<Vec<SocketAddr>, Failure> {
    let mut targets = Vec::with_capacity(urls.len());
    for url in urls {
        targets.push(loopback_target(url).await?);
    }
    Ok(targets)
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
    let request = format!("ws://{host}{}?token={token}", paths::WS);
    let (socket, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .map_err(|e| e.to_string())?;
    Ok(socket)
}

fn host_of(url: &str) -> &str {
    url.split_once("://")
        .map_or(url, |(_, rest)| rest.split('/').next().unwrap_or(rest))
}
