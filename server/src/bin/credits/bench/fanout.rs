//! Fan-out: change→client delay and delivery under a steady rate of changes.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use app::wire::{BalanceEvent, WsServerMsg, paths};
use futures::StreamExt;
use serde_json::json;
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_tungstenite::tungstenite::Message;

use super::{Spread, host_of, open_ws, summary};
use crate::{Failure, ServiceAuth, watch::Output};

/// What each fan-out connection saw.
#[derive(Default)]
struct Seen {
    delays_ms: Vec<f64>,
    events: usize,
    out_of_order: usize,
}

pub struct Fanout<'a> {
    /// Where the clients connect: user `u`'s on `instances[u % len]`.
    pub instances: &'a [String],
    /// Where changes are applied.
    pub posts: &'a [String],
    pub users: usize,
    pub per_user: usize,
    pub rate: u32,
    pub duration: Duration,
}

impl Fanout<'_> {
    /// Where user `u`'s `n`-th change is applied: rotating over the posting instances, but
    /// never through the instance its clients are on while another one exists, so that every
    /// change is measured across the bus when there are several instances.
    fn post_url(&self, user: usize, n: usize) -> &str {
        let home = &self.instances[user % self.instances.len()];
        (0..self.posts.len())
            .map(|i| &self.posts[(n + i) % self.posts.len()])
            .find(|post| *post != home)
            .unwrap_or(home)
    }

    pub async fn run(
        &self,
        targets: &[SocketAddr],
        spread: &Spread,
        service: &ServiceAuth,
        out: Output,
    ) -> Result<(), Failure> {
        let (users, per_user, duration) = (self.users, self.per_user, self.duration);
        let service_token = service.token()?;
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
            let home = user % targets.len();
            let (target, host) = (targets[home], host_of(&self.instances[home]).to_owned());
            let (gate, stop, ready) = (gate.clone(), stop.clone(), ready.clone());
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
        while ready.load(Ordering::Relaxed) < total && opening.elapsed() < Duration::from_secs(120)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let connected = ready.load(Ordering::Relaxed);

        let http = reqwest::Client::new();
        let committed = Arc::new(AtomicU64::new(0));
        let post_latency = Arc::new(Mutex::new(Vec::new()));
        let mut posts = JoinSet::new();
        let mut ticker =
            tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(self.rate.max(1))));
        let load_started = Instant::now();
        let mut n = 0usize;
        while load_started.elapsed() < duration {
            ticker.tick().await;
            let user = n % users;
            let request = json!({ "user_id": user_id(user), "amount": 1, "type": "bench" });
            let url = format!("{}{}", self.post_url(user, n), paths::CHANGES);
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
        let expected =
            committed.load(Ordering::Relaxed) as usize * per_user * connected / total.max(1);
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
}
