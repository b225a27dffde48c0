//! Request load: polling throughput, and committed changes per second with a final check.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use app::wire::{BalanceEvent, BalanceSnapshot, ChangeRequest, HoldRequest, HoldResponse};
use serde_json::json;
use tokio::task::JoinSet;

use super::summary;
use crate::{Failure, Secret, ServiceAuth, watch::Output};

pub async fn poll(
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

pub(super) async fn balance_of(
    http: &reqwest::Client,
    url: &str,
    token: &str,
) -> Result<BalanceSnapshot, Failure> {
    let request = http
        .get(format!("{url}/api/credits/balance"))
        .bearer_auth(token);
    crate::watch::send(url, request)
        .await?
        .json()
        .await
        .map_err(|err| Failure::other(format!("unexpected balance answer: {err}")))
}

pub async fn changes(
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
    let endpoint = reqwest::Url::parse(&format!("{url}/api/credits/changes"))
        .map_err(|err| Failure::usage(format!("--url: {err}")))?;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..clients.max(1) {
        let (http, next, token, endpoint) = (
            http.clone(),
            next.clone(),
            service_token.clone(),
            endpoint.clone(),
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
                let request = ChangeRequest {
                    user_id: format!("{prefix}-{user}"),
                    amount,
                    kind: "bench".to_owned(),
                    metadata: None,
                    idempotency_key: None,
                };
                match http
                    .post(endpoint.clone())
                    .bearer_auth(&token)
                    .json(&request)
                    .send()
                    .await
                {
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
    let mismatched = mismatched(&http, url, &tokens, &expected).await?;
    out.line(
        &format!(
            "changes: {committed} committed in {seconds:.2} s = {:.0}/s with {clients} clients ({failures} failed); final balances {}",
            committed as f64 / seconds,
            verdict(mismatched),
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

/// Credits each user of the holds benchmark starts with.
const HOLDS_GRANT: i64 = 1_000_000;

pub async fn holds(
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
        let grant = ChangeRequest {
            user_id: user_id(u),
            amount: HOLDS_GRANT,
            kind: "grant".to_owned(),
            metadata: None,
            idempotency_key: None,
        };
        let request = http
            .post(format!("{url}/api/credits/changes"))
            .bearer_auth(&service_token)
            .json(&grant);
        let balance = crate::watch::send(url, request)
            .await?
            .json::<BalanceEvent>()
            .await
            .map_err(|err| Failure::other(format!("unexpected change answer: {err}")))?
            .balance;
        expected.insert(u, balance);
        tokens.push(
            service
                .secret
                .user_token(&user_id(u), Duration::from_secs(3600))?,
        );
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
            let mut captured: HashMap<usize, i64> = HashMap::new();
            let mut failures = 0usize;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                let (user, amount) = (n % users, 1 + (n % 7) as i64);
                let request = HoldRequest {
                    user_id: format!("{prefix}-{user}"),
                    amount,
                    ttl_s: Some(60),
                    metadata: None,
                    idempotency_key: None,
                };
                let placed = http
                    .post(format!("{url}/api/credits/holds"))
                    .bearer_auth(&token)
                    .json(&request)
                    .send()
                    .await;
                let Ok(placed) = placed else {
                    failures += 1;
                    continue;
                };
                let Ok(HoldResponse { hold, .. }) = placed.json().await else {
                    failures += 1;
                    continue;
                };
                let capture = http
                    .post(format!("{url}/api/credits/holds/{}/capture", hold.id))
                    .bearer_auth(&token)
                    .send()
                    .await;
                match capture {
                    Ok(response) if response.status() == reqwest::StatusCode::OK => {
                        *captured.entry(user).or_default() += amount;
                    }
                    _ => failures += 1,
                }
            }
            (captured, failures)
        });
    }
    let mut failures = 0;
    while let Some(Ok((captured, failed))) = tasks.join_next().await {
        failures += failed;
        for (user, amount) in captured {
            *expected.entry(user).or_default() -= amount;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let done = total - failures;
    let mismatched = mismatched(&http, url, &tokens, &expected).await?;
    out.line(
        &format!(
            "holds: {done} placed and captured in {seconds:.2} s = {:.0}/s ({:.0} operations/s) with {clients} clients ({failures} failed); final balances {}",
            done as f64 / seconds,
            2.0 * done as f64 / seconds,
            verdict(mismatched),
        ),
        &json!({
            "bench": "holds", "placed_and_captured": done, "failed": failures, "seconds": seconds,
            "holds_per_second": done as f64 / seconds,
            "operations_per_second": 2.0 * done as f64 / seconds, "clients": clients,
            "balances_mismatched": mismatched,
        }),
    );
    if mismatched > 0 {
        return Err(Failure::other(
            "final balances do not equal the grants less the captures",
        ));
    }
    Ok(())
}

/// How many users' balances differ from `expected`, or are still holding credits.
async fn mismatched(
    http: &reqwest::Client,
    url: &str,
    tokens: &[String],
    expected: &HashMap<usize, i64>,
) -> Result<usize, Failure> {
    let mut mismatched = 0;
    for (u, token) in tokens.iter().enumerate() {
        let snapshot = balance_of(http, url, token).await?;
        if snapshot.balance != expected[&u] || snapshot.held != 0 {
            mismatched += 1;
        }
    }
    Ok(mismatched)
}

fn verdict(mismatched: usize) -> String {
    if mismatched == 0 {
        "all equal their sums".to_owned()
    } else {
        format!("WRONG for {mismatched} users")
    }
}
