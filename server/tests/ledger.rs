//! The ledger's guarantees, proven on SQLite and on PostgreSQL alike: atomic changes, no lost
//! updates across independent pools, idempotency, refusals that leave no trace.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use app::wire::{MAX_CREDITS, Metadata};
use common::{TestDb, on_both_databases};
use serde_json::json;
use server::store::{Applied, NewChange, Store, StoreError};

on_both_databases!(
    new_user_has_zero_balance,
    change_updates_balance_version_and_ledger,
    two_pools_lose_no_update,
    two_pools_creating_accounts_lose_no_update,
    concurrent_idempotent_requests_apply_once,
    refused_changes_leave_no_trace,
    refusals_among_concurrent_changes_stay_local,
    ledger_pages_newest_first,
);

/// A store whose committed changes nobody publishes.
async fn connect(url: &server::config::DatabaseUrl) -> Store {
    let (commits, _) = tokio::sync::mpsc::channel(1);
    Store::connect(url, commits).await.expect("connects")
}

fn change(user: &str, amount: i64) -> NewChange {
    NewChange {
        user_id: user.into(),
        amount,
        kind: "purchase".into(),
        metadata: Metadata::new(),
        idempotency_key: None,
    }
}

fn applied(result: Result<Applied, StoreError>) -> app::wire::BalanceEvent {
    match result.expect("change applies") {
        Applied::New(event) => event,
        Applied::Replayed(event) => panic!("unexpected replay of version {}", event.version),
    }
}

/// A user never seen has balance 0, version 0 and no `updated_at`.
async fn new_user_has_zero_balance(db: TestDb) {
    let store = connect(&db.url).await;
    let snapshot = store.snapshot("nobody").await.expect("snapshot");
    assert_eq!((snapshot.balance, snapshot.version), (0, 0));
    assert_eq!(snapshot.updated_at, None);
    let page = store.transactions("nobody", 20, None).await.expect("page");
    assert!(page.items.is_empty());
    assert_eq!(page.next_before, None);
}

/// One change moves balance and version together and is listed in the ledger.
async fn change_updates_balance_version_and_ledger(db: TestDb) {
    let store = connect(&db.url).await;
    let mut grant = change("alice", 500);
    grant.metadata.insert("order".into(), json!("A-1"));
    let event = applied(store.apply(&grant).await);
    assert_eq!((event.balance, event.version), (500, 1));
    let details = event.change.clone().expect("change details");
    assert_eq!(details.amount, 500);
    assert_eq!(details.metadata["order"], "A-1");

    let spend = applied(store.apply(&change("alice", -200)).await);
    assert_eq!((spend.balance, spend.version), (300, 2));

    let snapshot = store.snapshot("alice").await.expect("snapshot");
    assert_eq!((snapshot.balance, snapshot.version), (300, 2));
    assert_eq!(snapshot.updated_at, spend.updated_at);

    let page = store.transactions("alice", 20, None).await.expect("page");
    let versions: Vec<i64> = page.items.iter().map(|t| t.version).collect();
    assert_eq!(versions, [2, 1]);
    assert_eq!(page.items[1].id, details.id);
    assert_eq!(page.items[1].metadata["order"], "A-1");
    assert_eq!(page.items[1].created_at, details.created_at);
}

/// Two independent pools (as two instances have) × 200 concurrent changes on one user:
/// the exact sum, and versions 1..=400 with no gap or repeat.
async fn two_pools_lose_no_update(db: TestDb) {
    let a = connect(&db.url).await;
    let b = connect(&db.url).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..400_i64 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.spawn(async move { applied(store.apply(&change("hot", i + 1)).await).version });
    }
    let versions: BTreeSet<i64> = tasks.join_all().await.into_iter().collect();
    assert_eq!(versions, (1..=400).collect::<BTreeSet<_>>());

    let snapshot = a.snapshot("hot").await.expect("snapshot");
    assert_eq!(snapshot.balance, (1..=400).sum::<i64>());
    assert_eq!(snapshot.version, 400);

    let mut ledger = Vec::new();
    let mut before = None;
    loop {
        let page = b.transactions("hot", 100, before).await.expect("page");
        ledger.extend(page.items);
        match page.next_before {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    assert_eq!(ledger.len(), 400);
    // Every row's balance_after is the running sum at its version.
    ledger.sort_by_key(|t| t.version);
    let mut running = 0;
    for row in &ledger {
        running += row.amount;
        assert_eq!(row.balance_after, running, "version {}", row.version);
    }
}

/// Two pools create the same 50 accounts at once, in batches that mix users: each account is
/// created once and locked by whichever batch comes second, and no change is lost or applied
/// twice, even when the two creation orders interleave.
async fn two_pools_creating_accounts_lose_no_update(db: TestDb) {
    let a = connect(&db.url).await;
    let b = connect(&db.url).await;
    let mut tasks = tokio::task::JoinSet::new();
    for user in 0..50 {
        for i in 0..8_i64 {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.spawn(async move {
                let user = format!("new-{user}");
                let version = applied(store.apply(&change(&user, i + 1)).await).version;
                (user, version)
            });
        }
    }
    let mut versions: BTreeMap<String, BTreeSet<i64>> = Default::default();
    for (user, version) in tasks.join_all().await {
        versions.entry(user).or_default().insert(version);
    }
    assert_eq!(versions.len(), 50);
    for (user, versions) in versions {
        assert_eq!(versions, (1..=8).collect::<BTreeSet<_>>(), "{user}");
        let snapshot = b.snapshot(&user).await.expect("snapshot");
        assert_eq!(
            (snapshot.balance, snapshot.version),
            ((1..=8).sum(), 8),
            "{user}"
        );
    }
}

/// 20 concurrent requests with one idempotency key: applied once, all answered alike.
async fn concurrent_idempotent_requests_apply_once(db: TestDb) {
    let store = connect(&db.url).await;
    let mut request = change("bob", 75);
    request.idempotency_key = Some("order-42".into());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (store, request) = (store.clone(), request.clone());
        tasks.spawn(async move { store.apply(&request).await.expect("answered") });
    }
    let results = tasks.join_all().await;
    let new = results
        .iter()
        .filter(|r| matches!(r, Applied::New(_)))
        .count();
    assert_eq!(new, 1, "exactly one request applies the change");
    let events: BTreeSet<String> = results
        .iter()
        .map(|r| match r {
            Applied::New(e) | Applied::Replayed(e) => serde_json::to_string(e).expect("json"),
        })
        .collect();
    assert_eq!(
        events.len(),
        1,
        "every answer is the same event: {events:?}"
    );

    let snapshot = store.snapshot("bob").await.expect("snapshot");
    assert_eq!((snapshot.balance, snapshot.version), (75, 1));

    let mut conflicting = request.clone();
    conflicting.amount = 76;
    assert!(matches!(
        store.apply(&conflicting).await,
        Err(StoreError::IdempotencyConflict)
    ));
}

/// Concurrent changes are committed together; each still gets the outcome it would have
/// alone. 30 withdrawals of 1 from a balance of 10, racing 30 other users' deposits: exactly 10
/// withdrawals apply, 20 are refused, every deposit applies, and the ledger has no gap.
async fn refusals_among_concurrent_changes_stay_local(db: TestDb) {
    let store = connect(&db.url).await;
    applied(store.apply(&change("spender", 10)).await);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..30 {
        let (spender, saver) = (store.clone(), store.clone());
        tasks.spawn(async move { (true, spender.apply(&change("spender", -1)).await) });
        tasks.spawn(async move { (false, saver.apply(&change(&format!("saver-{i}"), 1)).await) });
    }
    let (mut withdrawn, mut refused) = (0, 0);
    for (withdrawal, result) in tasks.join_all().await {
        match result {
            Ok(Applied::New(_)) if withdrawal => withdrawn += 1,
            Err(StoreError::InsufficientCredits {
                available: 0,
                needed: 1,
            }) if withdrawal => {
                refused += 1;
            }
            Ok(Applied::New(event)) => assert_eq!((event.balance, event.version), (1, 1)),
            other => panic!("unexpected outcome (withdrawal: {withdrawal}): {other:?}"),
        }
    }
    assert_eq!((withdrawn, refused), (10, 20));
    let spender = store.snapshot("spender").await.expect("snapshot");
    assert_eq!((spender.balance, spender.version), (0, 11));
    let page = store
        .transactions("spender", 100, None)
        .await
        .expect("page");
    let versions: Vec<i64> = page.items.iter().map(|t| t.version).collect();
    assert_eq!(versions, (1..=11).rev().collect::<Vec<_>>());
    let balances: Vec<i64> = page.items.iter().map(|t| t.balance_after).collect();
    assert_eq!(balances, (0..=10).collect::<Vec<_>>());
    for i in 0..30 {
        let saver = store
            .snapshot(&format!("saver-{i}"))
            .await
            .expect("snapshot");
        assert_eq!((saver.balance, saver.version), (1, 1));
    }
}

/// Refusals change nothing: balance, version and ledger stay, and the key stays unused.
async fn refused_changes_leave_no_trace(db: TestDb) {
    let store = connect(&db.url).await;
    applied(store.apply(&change("carol", 100)).await);
    let before = store.snapshot("carol").await.expect("snapshot");

    let mut overdraw = change("carol", -101);
    overdraw.idempotency_key = Some("k-1".into());
    assert!(matches!(
        store.apply(&overdraw).await,
        Err(StoreError::InsufficientCredits {
            available: 100,
            needed: 101
        })
    ));
    assert!(matches!(
        store.apply(&change("carol", MAX_CREDITS)).await,
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        store.apply(&change("carol", MAX_CREDITS + 1)).await,
        Err(StoreError::OutOfRange { .. })
    ));
    let mut bad_type = change("carol", 1);
    bad_type.kind = "DROP TABLE".into();
    assert!(matches!(
        store.apply(&bad_type).await,
        Err(StoreError::Invalid { field: "type", .. })
    ));
    assert!(matches!(
        store.apply(&change("carol", 0)).await,
        Err(StoreError::Invalid {
            field: "amount",
            ..
        })
    ));

    assert_eq!(store.snapshot("carol").await.expect("snapshot"), before);
    let page = store.transactions("carol", 100, None).await.expect("page");
    assert_eq!(page.items.len(), 1);

    // A refused change does not use up its key: the same key now works for a valid change.
    let mut valid = change("carol", -100);
    valid.idempotency_key = Some("k-1".into());
    assert_eq!(applied(store.apply(&valid).await).balance, 0);
    // A brand-new user refused on their first change is not created either.
    assert!(store.apply(&change("dave", -1)).await.is_err());
    assert_eq!(
        store.snapshot("dave").await.expect("snapshot").updated_at,
        None
    );
}

/// Pages run newest first, `before` is exclusive, and the last page has no cursor.
async fn ledger_pages_newest_first(db: TestDb) {
    let store = connect(&db.url).await;
    for amount in 1..=5 {
        applied(store.apply(&change("erin", amount)).await);
    }
    let first = store.transactions("erin", 2, None).await.expect("page");
    assert_eq!(
        first.items.iter().map(|t| t.version).collect::<Vec<_>>(),
        [5, 4]
    );
    assert_eq!(first.next_before, Some(4));
    let second = store.transactions("erin", 2, Some(4)).await.expect("page");
    assert_eq!(
        second.items.iter().map(|t| t.version).collect::<Vec<_>>(),
        [3, 2]
    );
    let last = store.transactions("erin", 2, Some(2)).await.expect("page");
    assert_eq!(
        last.items.iter().map(|t| t.version).collect::<Vec<_>>(),
        [1]
    );
    assert_eq!(last.next_before, None);
    assert!(matches!(
        store.transactions("erin", 0, None).await,
        Err(StoreError::Invalid { field: "limit", .. })
    ));
    assert!(matches!(
        store.transactions("erin", 101, None).await,
        Err(StoreError::Invalid { field: "limit", .. })
    ));
}

/// A PostgreSQL outage fails changes fast with `Unavailable`, and the same store recovers by
/// itself when the database is reachable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_is_unavailable_then_recovers() {
    let (_db, proxy, url) = common::postgres_behind_proxy().await;
    let store = connect(&url).await;
    applied(store.apply(&change("frank", 10)).await);

    proxy.cut().await;
    let started = std::time::Instant::now();
    let outage = store.apply(&change("frank", 1)).await;
    assert!(
        matches!(outage, Err(StoreError::Unavailable(_))),
        "{outage:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));

    proxy.restore().await;
    let event = applied(store.apply(&change("frank", 1)).await);
    assert_eq!((event.balance, event.version), (11, 2));
}

/// The writers keep their connections between batches; one the server closed meanwhile
/// (a restart, a failover, an idle timeout) costs no change: the next batch goes on a fresh
/// connection instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writer_survives_its_connection_closed() {
    use sqlx::Connection;
    let db = TestDb::postgres().await;
    let store = connect(&db.url).await;
    applied(store.apply(&change("gina", 10)).await);

    let mut admin = sqlx::PgConnection::connect(&common::postgres_admin_url())
        .await
        .expect("admin connection");
    let closed: Vec<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'",
        db.postgres_name()
    )))
    .fetch_all(&mut admin)
    .await
    .expect("terminates");
    assert!(!closed.is_empty() && closed.iter().all(|&done| done));

    let event = applied(store.apply(&change("gina", 1)).await);
    assert_eq!((event.balance, event.version), (11, 2));
}
