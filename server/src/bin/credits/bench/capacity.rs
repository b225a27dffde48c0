//! Idle-connection capacity: how many hold, how fast they open, server memory each.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use serde_json::json;
use tokio::{sync::Semaphore, task::JoinSet};

use super::{MAX_DURATION, Spread, check, host_of, open_ws, rss_kib};
use crate::{Failure, Secret, watch::Output};

#[allow(clippy::too_many_arguments)]
pub async fn run(
    url: &str,
    target: SocketAddr,
    transport: &str,
    connections: usize,
    per_user: usize,
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
            &format!("{}-{}", spread.prefix, i / per_user),
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
                    let mut stream = crate::watch::open_sse(&client, &url, &token).await.ok()?;
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
            "{transport}: opened {open_count}/{connections} ({per_user} per user) at {rate:.0}/s; held {} for {hold:?} ({dropped_during} dropped); server RSS {} → {} KiB = {} KiB per connection",
            open_count.saturating_sub(dropped_during),
            baseline.map_or("?".into(), |v| v.to_string()),
            loaded.map_or("?".into(), |v| v.to_string()),
            per_connection.map_or("?".into(), |v| format!("{v:.2}")),
        ),
        &json!({
            "bench": "capacity", "transport": transport, "requested": connections,
            "per_user": per_user, "opened": open_count, "dropped": dropped_during, "open_per_second": rate,
            "hold_seconds": hold.as_secs(), "rss_before_kib": baseline, "rss_after_kib": loaded,
            "rss_per_connection_kib": per_connection,
        }),
    );
    Ok(())
}
