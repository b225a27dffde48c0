//! Request load: polling throughput, and committed changes per second with a final check.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use app::wire::{BalanceEvent, BalanceSnapshot, ChangeRequest, HoldRequest, HoldResponse, paths};
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
        let (http, url) = (http.clone(), format!("{url}{}", paths::POLL));
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
        .get(format!("{url}{}", paths::BALANCE))
        .bearer_auth(token);
    crate::watch::send(url, request)
        .await?
        .json()
        .await
        .map_err(|err| Failure::other(format!("unexpected balance answer: {err}")))
}

/// How many changes or holds a load benchmark applies, by how many clients, over how many
/// users.
#[derive(clap::Args)]
pub struct Load {
    #[arg(long, default_value_t = 32)]
    clients: usize,
    #[arg(long, default_value_t = 10_000)]
    total: usize,
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Prefix of the user ids (default: bench-changes or bench-holds).
    #[arg(long)]
    prefix: Option<String>,
    #[command(flatten)]
    service: ServiceAuth,
}

impl Load {
    fn check(&self) -> Result<(), Failure> {
        super::check(
            self.total <= 1_000_000 && self.users > 0,
            "--total is limited to 1,000,000 and --users must be at least 1",
        )
    }
}

pub async fn changes(url: &str, load: &Load, out: Output) -> Result<(), Failure> {
    load.check()?;
    let Load {
        clients,
        total,
        users,
        ref service,
        ..
    } = *load;
    let prefix = load.prefix.as_deref().unwrap_or("bench-changes");
    let http = reqwest::Client::new();
    let service_token = service.token()?;
    let mut tokens = Vec::with_capacity(users);
    let mut expected = HashMap::new();
    for u in 0..users {
        let token = service
            .secret
            .user_token(&format!("{prefix}-{u}"), Duration::from_secs(3600))?;
        expected.insert(u, balance_of(&http, url, &token).await?.balance);
        tokens.push(token);
    }
    let endpoint = reqwest::Url::parse(&format!("{url}{}", paths::CHANGES))
        .map_err(|err| Failure::usage(format!("--url: {err}")))?;
    let (client, prefix) = (http.clone(), prefix.to_owned());
    let run = spread(clients, total, move |n| {
        let (user, amount) = (n % users, 1 + (n % 7) as i64);
        let request = ChangeRequest {
            user_id: format!("{prefix}-{user}"),
            amount,
            kind: "bench".to_owned(),
            metadata: None,
            idempotency_key: None,
        };
        let post = client
            .post(endpoint.clone())
            .bearer_auth(&service_token)
            .json(&request);
        async move {
            let response = post.send().await.ok()?;
            (response.status() == reqwest::StatusCode::CREATED).then_some((user, amount))
        }
    })
    .await;
    let mismatched = run.mismatched(&http, url, &tokens, expected).await?;
    let Run {
        done,
        failures,
        seconds,
        ..
    } = run;
    out.line(
        &format!(
            "changes: {done} committed in {seconds:.2} s = {:.0}/s with {clients} clients ({failures} failed); final balances {}",
            done as f64 / seconds,
            verdict(mismatched),
        ),
        &json!({
            "bench": "changes", "committed": done, "failed": failures, "seconds": seconds,
            "changes_per_second": done as f64 / seconds, "clients": clients,
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

pub async fn holds(url: &str, load: &Load, out: Output) -> Result<(), Failure> {
    load.check()?;
    let Load {
        clients,
        total,
        users,
        ref service,
        ..
    } = *load;
    let prefix = load.prefix.as_deref().unwrap_or("bench-holds");
    let http = reqwest::Client::new();
    let service_token = service.token()?;
    let mut tokens = Vec::with_capacity(users);
    let mut expected = HashMap::new();
    for u in 0..users {
        let user_id = format!("{prefix}-{u}");
        let grant = ChangeRequest {
            user_id: user_id.clone(),
            amount: HOLDS_GRANT,
            kind: "grant".to_owned(),
            metadata: None,
            idempotency_key: None,
        };
        let request = http
            .post(format!("{url}{}", paths::CHANGES))
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
                .user_token(&user_id, Duration::from_secs(3600))?,
        );
    }
    let (client, prefix, url_owned) = (http.clone(), prefix.to_owned(), url.to_owned());
    let run = spread(clients, total, move |n| {
        let (user, amount) = (n % users, 1 + (n % 7) as i64);
        let request = HoldRequest {
            user_id: format!("{prefix}-{user}"),
            amount,
            ttl_s: Some(60),
            metadata: None,
            idempotency_key: None,
        };
        let (client, token, url) = (client.clone(), service_token.clone(), url_owned.clone());
        async move {
            let placed = client
                .post(format!("{url}{}", paths::HOLDS))
                .bearer_auth(&token)
                .json(&request)
                .send()
                .await
                .ok()?;
            let HoldResponse { hold, .. } = placed.json().await.ok()?;
            let captured = client
                .post(format!(
                    "{url}{}",
                    paths::with_id(paths::HOLD_CAPTURE, &hold.id)
                ))
                .bearer_auth(&token)
                .send()
                .await
                .ok()?;
            (captured.status() == reqwest::StatusCode::OK).then_some((user, -amount))
        }
    })
    .await;
    let mismatched = run.mismatched(&http, url, &tokens, expected).await?;
    let Run {
        done,
        failures,
        seconds,
        ..
    } = run;
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

/// What [`spread`] did: each user's balance moved by the operations that succeeded.
struct Run {
    moved: HashMap<usize, i64>,
    done: usize,
    failures: usize,
    seconds: f64,
}

impl Run {
    /// How many users' balances differ from where they started (`start`) plus what this run
    /// moved, or still hold credits.
    async fn mismatched(
        &self,
        http: &reqwest::Client,
        url: &str,
        tokens: &[String],
        mut start: HashMap<usize, i64>,
    ) -> Result<usize, Failure> {
        for (user, amount) in &self.moved {
            *start.entry(*user).or_default() += amount;
        }
        let mut mismatched = 0;
        for (u, token) in tokens.iter().enumerate() {
            let snapshot = balance_of(http, url, token).await?;
            if snapshot.balance != start[&u] || snapshot.held != 0 {
                mismatched += 1;
            }
        }
        Ok(mismatched)
    }
}

/// Runs operations `0..total`, `clients` at a time. Each answers the user it moved and by
/// how much, or `None` when it failed.
async fn spread<F, Fut>(clients: usize, total: usize, operation: F) -> Run
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<(usize, i64)>> + Send + 'static,
{
    let (next, operation) = (Arc::new(AtomicUsize::new(0)), Arc::new(operation));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..clients.max(1) {
        let (next, operation) = (next.clone(), operation.clone());
        tasks.spawn(async move {
            let (mut moved, mut failures) = (HashMap::<usize, i64>::new(), 0usize);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                match operation(n).await {
                    Some((user, amount)) => *moved.entry(user).or_default() += amount,
                    None => failures += 1,
                }
            }
            (moved, failures)
        });
    }
    let (mut moved, mut failures) = (HashMap::new(), 0);
    while let Some(Ok((by_task, failed))) = tasks.join_next().await {
        failures += failed;
        for (user, amount) in by_task {
            *moved.entry(user).or_default() += amount;
        }
    }
    Run {
        moved,
        done: total - failures,
        failures,
        seconds: started.elapsed().as_secs_f64(),
    }
}
fn verdict(mismatched: usize) -> String {
    if mismatched == 0 {
        "all equal their sums".to_owned()
    } else {
        format!("WRONG for {mismatched} users")
    }
}
