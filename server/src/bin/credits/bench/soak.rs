//! Soak: steady changes and connection churn over several instances for a long run, while
//! `scripts/soak.sh` restarts Redis and cuts PostgreSQL. It ends by checking that nothing
//! answered 201 was lost, no open connection was left stale, and that the servers gave back
//! the memory and files the connections took.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use app::wire::{BalanceEvent, ChangeRequest, WsServerMsg, paths};
use futures::StreamExt;
use serde_json::json;
use tokio::{
    sync::{Notify, Semaphore},
    task::JoinSet,
};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::{Spread, host_of, load::balance_of, open_ws, rss_kib};
use crate::{Failure, ServiceAuth, watch::Output};

/// How long a change is retried with its key before its outcome counts as unknown.
const RETRY_FOR: Duration = Duration::from_secs(120);
/// Changes waiting for an answer at most; beyond it the rate drops until the backlog clears.
const MAX_IN_FLIGHT: usize = 5_000;
/// After the last change: time for every connection to catch up (SPEC §10 heals in 10 s).
const SETTLE: Duration = Duration::from_secs(12);
/// After the last connection closed: time for the servers to release what it held. Closing
/// 10,000 connections takes a few seconds and jemalloc then returns freed pages over its
/// 10 s decay; at 15 s the servers' RSS was still falling by megabytes a second.
const RELEASE: Duration = Duration::from_secs(30);

pub struct Soak<'a> {
    pub instances: &'a [String],
    pub users: usize,
    pub per_user: usize,
    pub rate: u32,
    /// Percent of the connections closed and reopened each second.
    pub churn: f64,
    pub duration: Duration,
    pub server_pids: &'a [u32],
}

/// One client connection, reopened whenever it drops or is churned.
struct Slot {
    user: usize,
    /// The version and balance last seen on the open connection; `None` while closed.
    last: Mutex<Option<(i64, i64)>>,
    kick: Notify,
}

#[derive(Default)]
struct Counters {
    open: AtomicUsize,
    opened: AtomicU64,
    failed_opens: AtomicU64,
    events: AtomicU64,
    out_of_order: AtomicU64,
    acked: AtomicU64,
    retries: AtomicU64,
    refused: AtomicU64,
    unknown: AtomicU64,
}

impl Soak<'_> {
    pub async fn run(
        &self,
        targets: &[SocketAddr],
        spread: &Spread,
        service: &ServiceAuth,
        out: Output,
    ) -> Result<(), Failure> {
        let http = reqwest::Client::new();
        let service_token = service.token()?;
        let user_id = |u: usize| format!("{}-{u}", spread.prefix);
        let lifetime = self.duration + Duration::from_secs(3600);
        let mut tokens = Vec::with_capacity(self.users);
        let mut start_balance = Vec::with_capacity(self.users);
        for u in 0..self.users {
            let token = service.secret.user_token(&user_id(u), lifetime)?;
            start_balance.push(balance_of(&http, &self.instances[0], &token).await?.balance);
            tokens.push(token);
        }
        let before = self.resources(&http).await;

        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let gate = Arc::new(Semaphore::new(spread.concurrency.max(1)));
        let total = self.users * self.per_user;
        let mut slots = Vec::with_capacity(total);
        let mut clients = JoinSet::new();
        for i in 0..total {
            let slot = Arc::new(Slot {
                user: i % self.users,
                last: Mutex::new(None),
                kick: Notify::new(),
            });
            slots.push(slot.clone());
            let instance = i % targets.len();
            let link = Link {
                target: targets[instance],
                source: spread.sources[i % spread.sources.len()],
                host: host_of(&self.instances[instance]).to_owned(),
                token: tokens[slot.user].clone(),
            };
            let (gate, counters, stop) = (gate.clone(), counters.clone(), stop.clone());
            clients.spawn(link.hold(slot, gate, counters, stop));
        }
        let opening = Instant::now();
        while counters.open.load(Ordering::Relaxed) < total
            && opening.elapsed() < Duration::from_secs(120)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let connected = counters.open.load(Ordering::Relaxed);

        let acked: Arc<Vec<AtomicI64>> =
            Arc::new((0..self.users).map(|_| AtomicI64::new(0)).collect());
        let endpoints: Arc<Vec<String>> = Arc::new(
            self.instances
                .iter()
                .map(|url| format!("{url}{}", paths::CHANGES))
                .collect(),
        );
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let run_id = chrono::Utc::now().timestamp_millis();
        let mut changes = JoinSet::new();
        // Late ticks burst to catch up, so the rate holds; `in_flight` bounds the burst.
        let mut tick =
            tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(self.rate.max(1))));
        let churn_per_second = ((total as f64) * self.churn / 100.0).round() as usize;
        let mut next_churn = Instant::now() + Duration::from_secs(1);
        let mut next_report = Instant::now() + Duration::from_secs(60);
        let (mut churned, mut n) = (0usize, 0usize);
        let started = Instant::now();
        while started.elapsed() < self.duration {
            tick.tick().await;
            let permit = in_flight
                .clone()
                .acquire_owned()
                .await
                .expect("never closed");
            let change = Change {
                user: n % self.users,
                request: ChangeRequest {
                    user_id: user_id(n % self.users),
                    amount: 1 + (n % 5) as i64,
                    kind: "soak".to_owned(),
                    metadata: None,
                    idempotency_key: Some(format!("soak-{run_id}-{n}")),
                },
            };
            let (http, endpoints, token, acked, tally) = (
                http.clone(),
                endpoints.clone(),
                service_token.clone(),
                acked.clone(),
                counters.clone(),
            );
            changes.spawn(async move {
                change
                    .apply(&http, &endpoints, n, &token, &acked, &tally)
                    .await;
                drop(permit);
            });
            while changes.try_join_next().is_some() {}
            n += 1;
            if Instant::now() >= next_churn {
                next_churn += Duration::from_secs(1);
                for k in 0..churn_per_second {
                    slots[(churned + k) % total].kick.notify_one();
                }
                churned += churn_per_second;
            }
            if Instant::now() >= next_report {
                next_report += Duration::from_secs(60);
                out.line(
                    &counters.progress(started.elapsed()),
                    &json!({ "soak_progress_s": started.elapsed().as_secs() }),
                );
            }
        }
        let loaded_for = started.elapsed();
        while changes.join_next().await.is_some() {}
        let peak = self.resources(&http).await;
        tokio::time::sleep(SETTLE).await;

        let (mut lost, mut stale, mut checked) = (0usize, 0usize, 0usize);
        for u in 0..self.users {
            let now =
                balance_of(&http, &self.instances[u % self.instances.len()], &tokens[u]).await?;
            if now.balance != start_balance[u] + acked[u].load(Ordering::Relaxed) {
                lost += 1;
            }
            for slot in slots.iter().skip(u).step_by(self.users) {
                if let Some((version, balance)) = *slot.last.lock().expect("slot") {
                    checked += 1;
                    if version != now.version || balance != now.balance {
                        stale += 1;
                    }
                }
            }
        }
        stop.cancel();
        while clients.join_next().await.is_some() {}
        tokio::time::sleep(RELEASE).await;
        let after = self.resources(&http).await;

        let c = &counters;
        let unknown = c.unknown.load(Ordering::Relaxed);
        let out_of_order = c.out_of_order.load(Ordering::Relaxed);
        let growth: Vec<_> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| {
                json!({
                    "rss_kib": [b.0, a.0], "rss_growth_pct": growth(b.0, a.0),
                    "heap_kib": [b.1, a.1], "heap_growth_pct": growth(b.1, a.1),
                    "open_files": [b.2, a.2], "open_files_growth_pct": growth(b.2, a.2),
                })
            })
            .collect();
        out.line(
            &format!(
                "soak: {connected}/{total} connected, {} opens ({} failed), {:.0} changes/s for {:?}: {} acknowledged, {} retried, {} refused, {unknown} unknown; lost {lost} users, stale {stale}/{checked} connections, out of order {out_of_order}; servers (RSS KiB, live heap KiB, open files) before {before:?}, peak {peak:?}, after {after:?}",
                c.opened.load(Ordering::Relaxed), c.failed_opens.load(Ordering::Relaxed),
                n as f64 / loaded_for.as_secs_f64(), self.duration,
                c.acked.load(Ordering::Relaxed), c.retries.load(Ordering::Relaxed),
                c.refused.load(Ordering::Relaxed),
            ),
            &json!({
                "bench": "soak", "connections": total, "connected": connected,
                "opens": c.opened.load(Ordering::Relaxed), "failed_opens": c.failed_opens.load(Ordering::Relaxed),
                "changes": n, "acknowledged": c.acked.load(Ordering::Relaxed),
                "retried": c.retries.load(Ordering::Relaxed), "refused": c.refused.load(Ordering::Relaxed),
                "unknown": unknown, "lost_users": lost, "stale": stale, "checked": checked,
                "out_of_order": out_of_order, "events": c.events.load(Ordering::Relaxed),
                "servers": growth, "peak": peak,
            }),
        );
        if lost + stale + unknown as usize + out_of_order as usize > 0 {
            return Err(Failure::other(
                "the soak lost, left stale or reordered changes",
            ));
        }
        Ok(())
    }

    /// RSS (KiB), live heap (KiB, from the instance's metrics) and open files of each server.
    async fn resources(&self, http: &reqwest::Client) -> Vec<(u64, u64, u64)> {
        let mut resources = Vec::with_capacity(self.server_pids.len());
        for (&pid, instance) in self.server_pids.iter().zip(self.instances) {
            let files = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
            let heap = heap_bytes(http, instance).await.unwrap_or(0) / 1024;
            resources.push((rss_kib(pid).unwrap_or(0), heap, files as u64));
        }
        resources
    }
}

/// The instance's `livecredits_heap_allocated_bytes`.
async fn heap_bytes(http: &reqwest::Client, instance: &str) -> Option<u64> {
    let text = http
        .get(format!("{instance}{}", paths::METRICS))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let line = text
        .lines()
        .find(|line| line.starts_with("livecredits_heap_allocated_bytes "))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn growth(before: u64, after: u64) -> f64 {
    (after as f64 - before as f64) * 100.0 / (before.max(1) as f64)
}

impl Counters {
    fn progress(&self, elapsed: Duration) -> String {
        format!(
            "soak {:>4} s: {} open, {} opens ({} failed), {} acknowledged, {} retried, {} events",
            elapsed.as_secs(),
            self.open.load(Ordering::Relaxed),
            self.opened.load(Ordering::Relaxed),
            self.failed_opens.load(Ordering::Relaxed),
            self.acked.load(Ordering::Relaxed),
            self.retries.load(Ordering::Relaxed),
            self.events.load(Ordering::Relaxed),
        )
    }
}

/// Where one slot connects.
struct Link {
    target: SocketAddr,
    source: IpAddr,
    host: String,
    token: String,
}

impl Link {
    /// Keeps the slot's connection open until `stop`, reopening it after a drop or a kick.
    async fn hold(
        self,
        slot: Arc<Slot>,
        gate: Arc<Semaphore>,
        counters: Arc<Counters>,
        stop: CancellationToken,
    ) {
        let mut backoff = Backoff::default();
        while !stop.is_cancelled() {
            let opened = {
                let _permit = gate.acquire().await.expect("never closed");
                open_ws(self.target, self.source, &self.host, &self.token).await
            };
            let Ok(mut socket) = opened else {
                counters.failed_opens.fetch_add(1, Ordering::Relaxed);
                backoff.wait().await;
                continue;
            };
            counters.opened.fetch_add(1, Ordering::Relaxed);
            counters.open.fetch_add(1, Ordering::Relaxed);
            let (mut snapshot, mut kicked) = (false, false);
            loop {
                let frame = tokio::select! {
                    () = stop.cancelled() => break,
                    () = slot.kick.notified() => {
                        kicked = true;
                        break;
                    }
                    frame = socket.next() => frame,
                };
                let Some(Ok(frame)) = frame else { break };
                let Message::Text(text) = frame else { continue };
                let Ok(WsServerMsg::Balance(event)) = serde_json::from_str(&text) else {
                    continue;
                };
                snapshot = true;
                backoff = Backoff::default();
                counters.events.fetch_add(1, Ordering::Relaxed);
                slot.see(&event, &counters);
            }
            *slot.last.lock().expect("slot") = None;
            counters.open.fetch_sub(1, Ordering::Relaxed);
            let _ = socket.close(None).await;
            // Closed before its snapshot (the server refused it, e.g. 1013 while the
            // database is away): a failed open, retried after a pause as a browser would.
            if !snapshot && !kicked && !stop.is_cancelled() {
                counters.failed_opens.fetch_add(1, Ordering::Relaxed);
                backoff.wait().await;
            }
        }
    }
}

/// Capped exponential backoff with jitter, as the browser client reconnects: clients that
/// failed together do not come back together.
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(100))
    }
}

impl Backoff {
    async fn wait(&mut self) {
        let jitter = rand::random_range(0..=self.0.as_millis() as u64 / 2);
        tokio::time::sleep(self.0 + Duration::from_millis(jitter)).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
    }
}

impl Slot {
    fn see(&self, event: &BalanceEvent, counters: &Counters) {
        let mut last = self.last.lock().expect("slot");
        if let Some((version, _)) = *last
            && event.version <= version
        {
            counters.out_of_order.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some((event.version, event.balance));
    }
}

/// One change, re-sent with its key until it is answered.
struct Change {
    user: usize,
    request: ChangeRequest,
}

impl Change {
    async fn apply(
        &self,
        http: &reqwest::Client,
        endpoints: &[String],
        n: usize,
        token: &str,
        acked: &[AtomicI64],
        counters: &Counters,
    ) {
        let started = Instant::now();
        let mut backoff = Backoff::default();
        for attempt in 0.. {
            let endpoint = &endpoints[(n + attempt) % endpoints.len()];
            let answer = http
                .post(endpoint)
                .bearer_auth(token)
                .timeout(Duration::from_secs(10))
                .json(&self.request)
                .send()
                .await;
            match answer.map(|response| response.status()) {
                Ok(status) if status.is_success() => {
                    acked[self.user].fetch_add(self.request.amount, Ordering::Relaxed);
                    counters.acked.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(status)
                    if status.is_client_error()
                        && status != reqwest::StatusCode::TOO_MANY_REQUESTS =>
                {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                _ if started.elapsed() > RETRY_FOR => {
                    counters.unknown.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                _ => {
                    counters.retries.fetch_add(1, Ordering::Relaxed);
                    backoff.wait().await;
                }
            }
        }
    }
}
