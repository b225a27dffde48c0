//! Property tests of the ledger against an in-memory model, on SQLite and on PostgreSQL:
//! random sequences of changes, replays, conflicting replays, spends past zero and
//! concurrent lanes over a few users. After every step the store must agree with the model;
//! after every sequence its ledger must be exactly the model's: balance = Σ applied,
//! versions 1..n, each `balance_after` the running sum.
//!
//! The model is, per user: the balance (summed by the model itself), the applied rows (their
//! ids and timestamps learnt from the store) and the idempotency keys in use, each with the
//! request that used it and the event it answered. Changes submitted alone must have exactly
//! the outcome the model predicts. Changes submitted together (a lane) commit in an order the
//! model cannot know: their outcomes must be those of *some* serial order of the lane, which
//! a small search finds or proves missing.

mod common;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use app::wire::{BalanceEvent, MAX_CREDITS, Metadata, Transaction};
use common::TestDb;
use futures::future::join_all;
use proptest::{
    collection::vec,
    prelude::*,
    sample::select,
    test_runner::{Config, TestCaseError, TestError, TestRunner},
};
use serde_json::json;
use server::store::{Applied, NewChange, Store, StoreError};

/// Cases per database; each runs up to 30 operations on fresh users.
const CASES: u32 = 24;
/// Most users of one case.
const MAX_USERS: usize = 4;
/// Longest operation sequence of one case.
const MAX_OPS: usize = 30;
/// Most changes submitted together in one lane.
const MAX_LANE: usize = 8;

/// Random sequences of changes agree with the model on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_ledger_agrees_with_the_model() {
    check_against_model(TestDb::sqlite()).await;
}

/// Random sequences of changes agree with the model on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_ledger_agrees_with_the_model() {
    check_against_model(TestDb::postgres().await).await;
}

/// Runs the property on `db` with two stores (two pools and writer queues, as two instances
/// have); each case works on users of its own, so one database serves every case.
async fn check_against_model(db: TestDb) {
    let stores = [connect(&db).await, connect(&db).await];
    let config = Config {
        cases: CASES,
        // No regression files in the tree; a failure prints its minimal case instead.
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..Config::default()
    };
    let cases = AtomicUsize::new(0);
    let stats = Mutex::new(Stats::default());
    let handle = tokio::runtime::Handle::current();
    let started = std::time::Instant::now();
    let result = tokio::task::block_in_place(|| {
        TestRunner::new(config).run(&scenario(), |scenario| {
            let case = cases.fetch_add(1, Ordering::Relaxed);
            let seen = handle.block_on(run_case(&stores, case, &scenario))?;
            stats.lock().expect("stats").add(&seen);
            Ok(())
        })
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, minimal)) => {
            panic!("{reason}\nminimal failing case: {minimal:#?}")
        }
        Err(TestError::Abort(reason)) => panic!("aborted: {reason}"),
    }
    let stats = stats.into_inner().expect("stats");
    eprintln!(
        "{} cases ({} runs) in {:.1?}: {stats:?}",
        CASES,
        cases.load(Ordering::Relaxed),
        started.elapsed()
    );
    // The generators must reach every outcome, or the property proves less than it says.
    assert!(stats.applied > 0 && stats.replayed > 0, "{stats:?}");
    assert!(stats.conflicts > 0 && stats.insufficient > 0, "{stats:?}");
    assert!(stats.key_reused_after_refusal > 0, "{stats:?}");
    assert!(
        stats.lanes > 0 && stats.lane_outcomes_same_user > 0,
        "{stats:?}"
    );
}

/// On SQLite, a change refused for a user never seen creates no account, even when it is
/// committed in one batch with accepted changes (found by the property).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_refusal_in_a_mixed_batch_creates_no_account() {
    refusal_in_a_mixed_batch_creates_no_account(TestDb::sqlite()).await;
}

/// On PostgreSQL, a change refused for a user never seen creates no account, even when it
/// is committed in one batch with accepted changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refusal_in_a_mixed_batch_creates_no_account() {
    refusal_in_a_mixed_batch_creates_no_account(TestDb::postgres().await).await;
}

/// 32 refused first changes of new users submitted together with 32 accepted ones, so
/// that group commit puts refusals and acceptances in the same transactions.
async fn refusal_in_a_mixed_batch_creates_no_account(db: TestDb) {
    let store = connect(&db).await;
    let change = |user: String, amount| NewChange {
        user_id: user,
        amount,
        kind: "spend".into(),
        metadata: Metadata::new(),
        idempotency_key: None,
    };
    let refused: Vec<String> = (0..32).map(|i| format!("refused-{i}")).collect();
    let requests: Vec<NewChange> = refused
        .iter()
        .flat_map(|user| [change(user.clone(), -1), change(format!("{user}-saver"), 1)])
        .collect();
    let outcomes = join_all(requests.iter().map(|request| store.apply(request))).await;
    for (request, outcome) in requests.iter().zip(outcomes) {
        match outcome {
            Ok(Applied::New(_)) if request.amount == 1 => {}
            Err(StoreError::InsufficientCredits { .. }) if request.amount == -1 => {}
            other => panic!("{request:?}: {other:?}"),
        }
    }
    let accounts = store.snapshots(&refused).await.expect("snapshots");
    assert!(
        accounts.is_empty(),
        "{} of 32 users refused on their first change have an account: {:?}",
        accounts.len(),
        accounts.first()
    );
}

/// A store whose committed changes nobody publishes.
async fn connect(db: &TestDb) -> Store {
    let (commits, _) = tokio::sync::mpsc::channel(1);
    Store::connect(&db.url, commits).await.expect("connects")
}

// ---------------------------------------------------------------------------------------
// Generated operations

/// One generated case: its users, the page size it reads the ledger with, its operations.
#[derive(Clone, Debug)]
struct Scenario {
    users: usize,
    page_limit: u32,
    ops: Vec<Op>,
}

#[derive(Clone, Debug)]
enum Op {
    /// A change submitted alone: the model predicts its exact outcome.
    Change(Req),
    /// An earlier keyed request (any, applied or refused) submitted again unchanged.
    Replay(Back),
    /// An earlier keyed request submitted again with one field changed.
    Conflict(Back, Mutation),
    /// Changes submitted together, split over the two stores.
    Lane(Vec<(bool, LaneReq)>),
}

#[derive(Clone, Debug)]
enum LaneReq {
    Fresh(Req),
    Replay(Back),
    Conflict(Back, Mutation),
}

/// Which earlier keyed request: 0 is the latest, counting back (wrapping round).
type Back = u8;

/// A change request in terms of the case's users and the pools below.
#[derive(Clone)]
struct Req {
    user: usize,
    amount: i64,
    kind: &'static str,
    metadata: Metadata,
    key: Option<String>,
}

impl fmt::Debug for Req {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Req(user {}, {:+}, {}, {}, key {})",
            self.user,
            self.amount,
            self.kind,
            brief(&self.metadata),
            self.key.as_deref().map_or("none".into(), brief_key)
        )
    }
}

/// Metadata as JSON, cut short: failures stay readable with the 4 KB body.
fn brief(metadata: &Metadata) -> String {
    let text = serde_json::to_string(metadata).expect("metadata serialises");
    if text.chars().count() <= 60 {
        return text;
    }
    let start: String = text.chars().take(60).collect();
    format!("{start}…({} bytes)", text.len())
}

fn brief_key(key: &str) -> String {
    match key.chars().count() {
        0..=20 => format!("{key:?}"),
        n => format!("{:?}…({n} chars)", key.chars().take(8).collect::<String>()),
    }
}

/// A request and its answer on one line each, for failure messages.
fn show(change: &NewChange, outcome: &Result<Applied, StoreError>) -> String {
    let answer = |tag, event: &BalanceEvent| {
        let details = event.change.as_ref();
        format!(
            "{tag} v{} balance {} id {:?} at {:?}",
            event.version,
            event.balance,
            details.map(|c| &c.id),
            details.map(|c| c.created_at)
        )
    };
    let answer = match outcome {
        Ok(Applied::New(event)) => answer("New", event),
        Ok(Applied::Replayed(event)) => answer("Replayed", event),
        Err(err) => format!("Err({err:?})"),
    };
    format!(
        "{} {:+} {} {} key {}\n      → {answer}",
        change.user_id,
        change.amount,
        change.kind,
        brief(&change.metadata),
        change
            .idempotency_key
            .as_deref()
            .map_or("none".into(), brief_key),
    )
}

#[derive(Clone, Debug)]
enum Mutation {
    Amount(i64),
    /// Another type: the pool's entry at this position, or the next one.
    Kind(u8),
    /// Other metadata: the pool's entry at this position, or the next one.
    Metadata(u8),
}

const KINDS: [&str; 5] = ["purchase", "spend", "refund", "grant", "x_1"];

/// A small pool, so keys recur: the same key on other users, after refusals, with other
/// bodies. Case matters; the longest key allowed is in it.
fn keys() -> Vec<String> {
    ["k1", "K1", "k2", "1", "order-42 é ✓", &"k".repeat(128)]
        .map(str::to_owned)
        .to_vec()
}

/// Metadata bodies, some differing only in the representation of a number.
fn metadatas() -> Vec<Metadata> {
    let bodies = [
        json!({}),
        json!({ "order": "A-1" }),
        json!({ "order": "A-2" }),
        json!({ "n": 1 }),
        json!({ "n": 1.0 }),
        json!({ "nested": { "list": [1, "two", null, true, { "z": [] }], "zero": -0.0 } }),
        json!({ "text": "é ✓ 😀 \u{0} \"quoted\" \\ \n\u{2028}" }),
        json!({ "big": u64::MAX, "low": i64::MIN, "f": 1e300, "tiny": 5e-324, "third": 1.0 / 3.0 }),
        json!({ "blob": "x".repeat(4000) }),
    ];
    bodies
        .into_iter()
        .map(|body| match body {
            serde_json::Value::Object(map) => map,
            _ => unreachable!("object bodies"),
        })
        .collect()
}

/// Mostly small amounts either way, so balances hover near zero and spends go past it;
/// rarely the largest amounts, so a balance can also hit the 2^53 − 1 ceiling.
fn amount() -> impl Strategy<Value = i64> {
    prop_oneof![
        12 => 1_i64..=100,
        10 => -100_i64..=-1,
        1 => Just(MAX_CREDITS),
        1 => Just(-MAX_CREDITS),
    ]
}

fn request() -> impl Strategy<Value = Req> {
    (
        0..MAX_USERS,
        amount(),
        select(KINDS.to_vec()),
        select(metadatas()),
        prop::option::weighted(0.6, select(keys())),
    )
        .prop_map(|(user, amount, kind, metadata, key)| Req {
            user,
            amount,
            kind,
            metadata,
            key,
        })
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        amount().prop_map(Mutation::Amount),
        (0..KINDS.len() as u8).prop_map(Mutation::Kind),
        (0..metadatas().len() as u8).prop_map(Mutation::Metadata),
    ]
}

fn back() -> impl Strategy<Value = Back> {
    0..8_u8
}

fn lane_request() -> impl Strategy<Value = (bool, LaneReq)> {
    let req = prop_oneof![
        4 => request().prop_map(LaneReq::Fresh),
        2 => back().prop_map(LaneReq::Replay),
        1 => (back(), mutation()).prop_map(|(b, m)| LaneReq::Conflict(b, m)),
    ];
    (any::<bool>(), req)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => request().prop_map(Op::Change),
        2 => back().prop_map(Op::Replay),
        2 => (back(), mutation()).prop_map(|(b, m)| Op::Conflict(b, m)),
        1 => vec(lane_request(), 2..=MAX_LANE).prop_map(Op::Lane),
    ]
}

/// Users are drawn from all `MAX_USERS` and folded onto the case's few, so each part of a
/// case shrinks on its own.
fn scenario() -> impl Strategy<Value = Scenario> {
    (
        2..=MAX_USERS,
        prop_oneof![Just(100_u32), 1_u32..=7],
        vec(op(), 1..=MAX_OPS),
    )
        .prop_map(|(users, page_limit, mut ops)| {
            let fold = |req: &mut Req| req.user %= users;
            for op in &mut ops {
                match op {
                    Op::Change(req) => fold(req),
                    Op::Lane(lane) => {
                        for (_, req) in lane {
                            if let LaneReq::Fresh(req) = req {
                                fold(req);
                            }
                        }
                    }
                    Op::Replay(_) | Op::Conflict(..) => {}
                }
            }
            Scenario {
                users,
                page_limit,
                ops,
            }
        })
}

/// `change` with one field changed.
fn mutate(change: &NewChange, mutation: &Mutation) -> NewChange {
    let mut changed = change.clone();
    match mutation {
        Mutation::Amount(amount) if *amount != change.amount => changed.amount = *amount,
        Mutation::Amount(_) => {
            changed.amount = match change.amount {
                1 => 2,
                -1 => -2,
                other => other - other.signum(),
            }
        }
        Mutation::Kind(at) => {
            let at = usize::from(*at) % KINDS.len();
            let at = if KINDS[at] == change.kind {
                (at + 1) % KINDS.len()
            } else {
                at
            };
            changed.kind = KINDS[at].to_owned();
        }
        Mutation::Metadata(at) => {
            let bodies = metadatas();
            let at = usize::from(*at) % bodies.len();
            let at = if bodies[at] == change.metadata {
                (at + 1) % bodies.len()
            } else {
                at
            };
            changed.metadata = bodies[at].clone();
        }
    }
    changed
}

// ---------------------------------------------------------------------------------------
// The model

#[derive(Default)]
struct Account {
    /// Σ of the applied amounts, kept by the model itself.
    balance: i64,
    /// The applied changes in version order, as the store answered them.
    rows: Vec<Transaction>,
    /// Keys in use: the request that used each and the event it was answered.
    keys: HashMap<String, (NewChange, BalanceEvent)>,
    /// Keys whose change was refused while they were unused.
    refused_keys: HashSet<String>,
}

impl Account {
    fn version(&self) -> i64 {
        self.rows.len() as i64
    }
}

struct Model {
    users: Vec<String>,
    accounts: Vec<Account>,
    /// Every keyed request submitted so far, for replays: (user index, request).
    keyed: Vec<(usize, NewChange)>,
    /// Every change id the store has handed out.
    ids: HashSet<String>,
    stats: Stats,
}

/// What the model expects of one change, given the state it meets.
#[derive(Debug)]
enum Expected {
    New { balance: i64, version: i64 },
    Replayed(BalanceEvent),
    Conflict,
    Insufficient { balance: i64 },
    OutOfRange,
}

/// How often each outcome occurred, to show the generators reach them all.
#[derive(Clone, Debug, Default)]
struct Stats {
    applied: u64,
    replayed: u64,
    conflicts: u64,
    insufficient: u64,
    out_of_range: u64,
    key_reused_after_refusal: u64,
    lanes: u64,
    lane_outcomes_same_user: u64,
}

impl Stats {
    fn add(&mut self, other: &Self) {
        self.applied += other.applied;
        self.replayed += other.replayed;
        self.conflicts += other.conflicts;
        self.insufficient += other.insufficient;
        self.out_of_range += other.out_of_range;
        self.key_reused_after_refusal += other.key_reused_after_refusal;
        self.lanes += other.lanes;
        self.lane_outcomes_same_user += other.lane_outcomes_same_user;
    }
}

fn same_body(a: &NewChange, b: &NewChange) -> bool {
    a.amount == b.amount && a.kind == b.kind && a.metadata == b.metadata
}

/// What a change meets: a key in use answers for it, else the balance decides.
fn expect(
    balance: i64,
    version: i64,
    used: Option<(&NewChange, &BalanceEvent)>,
    change: &NewChange,
) -> Expected {
    if let Some((prior, event)) = used {
        return if same_body(prior, change) {
            Expected::Replayed(event.clone())
        } else {
            Expected::Conflict
        };
    }
    match balance.checked_add(change.amount) {
        Some(next) if next > MAX_CREDITS => Expected::OutOfRange,
        Some(next) if next < 0 => Expected::Insufficient { balance },
        Some(next) => Expected::New {
            balance: next,
            version: version + 1,
        },
        None => Expected::OutOfRange,
    }
}

/// Whether `outcome` is what `expected` allows; a `New` event's own fields are checked apart.
fn matches(expected: &Expected, change: &NewChange, outcome: &Result<Applied, StoreError>) -> bool {
    match (expected, outcome) {
        (Expected::New { balance, version }, Ok(Applied::New(event))) => {
            event.balance == *balance && event.version == *version
        }
        (Expected::Replayed(original), Ok(Applied::Replayed(event))) => {
            event == original && json(event) == json(original)
        }
        (Expected::Conflict, Err(StoreError::IdempotencyConflict)) => true,
        (
            Expected::Insufficient { balance },
            Err(StoreError::InsufficientCredits { available, needed }),
        ) => available == balance && *needed == -change.amount,
        (Expected::OutOfRange, Err(StoreError::OutOfRange { field, .. })) => *field == "balance",
        _ => false,
    }
}

fn json(event: &BalanceEvent) -> String {
    serde_json::to_string(event).expect("events serialise")
}

impl Model {
    fn new(case: usize, users: usize) -> Self {
        Self {
            users: (0..users).map(|u| format!("case{case}-user{u}")).collect(),
            accounts: (0..users).map(|_| Account::default()).collect(),
            keyed: Vec::new(),
            ids: HashSet::new(),
            stats: Stats::default(),
        }
    }

    fn change(&self, req: &Req) -> NewChange {
        NewChange {
            user_id: self.users[req.user].clone(),
            amount: req.amount,
            kind: req.kind.to_owned(),
            metadata: req.metadata.clone(),
            idempotency_key: req.key.clone(),
        }
    }

    /// The earlier keyed request `back` picks, if any was submitted yet.
    fn earlier(&self, back: Back) -> Option<(usize, NewChange)> {
        let back = usize::from(back) % self.keyed.len().max(1);
        self.keyed.iter().rev().nth(back).cloned()
    }

    fn expect(&self, user: usize, change: &NewChange) -> Expected {
        let account = &self.accounts[user];
        let used = change
            .idempotency_key
            .as_ref()
            .and_then(|key| account.keys.get(key))
            .map(|(prior, event)| (prior, event));
        expect(account.balance, account.version(), used, change)
    }

    /// Learns an outcome the model accepted: a new row and its key, or a refusal.
    fn record(&mut self, user: usize, change: &NewChange, outcome: &Result<Applied, StoreError>) {
        let account = &mut self.accounts[user];
        match outcome {
            Ok(Applied::New(event)) => {
                self.stats.applied += 1;
                let details = event
                    .change
                    .clone()
                    .expect("checked: a new event has its change");
                account.balance += change.amount;
                account.rows.push(Transaction {
                    id: details.id,
                    amount: details.amount,
                    kind: details.kind,
                    metadata: details.metadata,
                    balance_after: event.balance,
                    version: event.version,
                    created_at: details.created_at,
                });
                if let Some(key) = &change.idempotency_key {
                    if account.refused_keys.remove(key) {
                        self.stats.key_reused_after_refusal += 1;
                    }
                    account
                        .keys
                        .insert(key.clone(), (change.clone(), event.clone()));
                }
            }
            Ok(Applied::Replayed(_)) => self.stats.replayed += 1,
            Err(StoreError::IdempotencyConflict) => self.stats.conflicts += 1,
            Err(refused) => {
                if matches!(refused, StoreError::InsufficientCredits { .. }) {
                    self.stats.insufficient += 1;
                } else {
                    self.stats.out_of_range += 1;
                }
                if let Some(key) = &change.idempotency_key {
                    account.refused_keys.insert(key.clone());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running a case

fn store_ok<T>(result: Result<T, StoreError>, what: &str) -> Result<T, TestCaseError> {
    result.map_err(|err| TestCaseError::fail(format!("{what}: {err}")))
}

async fn run_case(
    stores: &[Store; 2],
    case: usize,
    scenario: &Scenario,
) -> Result<Stats, TestCaseError> {
    let mut model = Model::new(case, scenario.users);
    for (step, op) in scenario.ops.iter().enumerate() {
        run_step(stores, &mut model, step, op)
            .await
            .map_err(|err| TestCaseError::fail(format!("step {step}, {op:?}: {err}")))?;
    }
    for store in stores {
        for user in 0..model.users.len() {
            check_ledger(store, &model, user, scenario.page_limit)
                .await
                .map_err(|err| TestCaseError::fail(format!("after the last step: {err}")))?;
        }
    }
    Ok(model.stats)
}

/// One operation, then every user's snapshot against the model.
async fn run_step(
    stores: &[Store; 2],
    model: &mut Model,
    step: usize,
    op: &Op,
) -> Result<(), TestCaseError> {
    let single = match op {
        Op::Change(req) => Some((req.user, model.change(req))),
        Op::Replay(back) => model.earlier(*back),
        Op::Conflict(back, mutation) => model
            .earlier(*back)
            .map(|(user, change)| (user, mutate(&change, mutation))),
        Op::Lane(lane) => {
            run_lane(stores, model, lane).await?;
            None
        }
    };
    if let Some((user, change)) = single {
        run_single(&stores[step % 2], model, user, &change).await?;
    }
    for user in 0..model.users.len() {
        check_snapshot(&stores[step % 2], model, user).await?;
    }
    Ok(())
}

/// One change alone: exactly the predicted outcome.
async fn run_single(
    store: &Store,
    model: &mut Model,
    user: usize,
    change: &NewChange,
) -> Result<(), TestCaseError> {
    let expected = model.expect(user, change);
    let outcome = store.apply(change).await;
    prop_assert!(
        matches(&expected, change, &outcome),
        "expected {:?}, got: {}",
        expected,
        show(change, &outcome)
    );
    if let Ok(Applied::New(event)) = &outcome {
        check_new_event(model, change, event)?;
    }
    if change.idempotency_key.is_some() {
        model.keyed.push((user, change.clone()));
    }
    model.record(user, change, &outcome);
    Ok(())
}

/// A new event describes the request it answers, with an id never seen before.
fn check_new_event(
    model: &mut Model,
    change: &NewChange,
    event: &BalanceEvent,
) -> Result<(), TestCaseError> {
    let details = event.change.as_ref();
    prop_assert!(
        details.is_some(),
        "a new event without its change: {event:?}"
    );
    let details = details.expect("checked");
    prop_assert_eq!(&event.user_id, &change.user_id);
    prop_assert_eq!(details.amount, change.amount);
    prop_assert_eq!(&details.kind, &change.kind);
    prop_assert_eq!(&details.metadata, &change.metadata);
    prop_assert_eq!(event.updated_at, Some(details.created_at));
    prop_assert!(
        (0..=MAX_CREDITS).contains(&event.balance),
        "balance out of range: {event:?}"
    );
    prop_assert!(
        model.ids.insert(details.id.clone()),
        "change id {} handed out twice",
        details.id
    );
    Ok(())
}

/// Changes submitted together: each answer is well-formed, each user's new versions follow on
/// without gap, and some serial order of the lane explains every answer.
async fn run_lane(
    stores: &[Store; 2],
    model: &mut Model,
    lane: &[(bool, LaneReq)],
) -> Result<(), TestCaseError> {
    let mut requests = Vec::new();
    for (second, req) in lane {
        let resolved = match req {
            LaneReq::Fresh(req) => Some((req.user, model.change(req))),
            LaneReq::Replay(back) => model.earlier(*back),
            LaneReq::Conflict(back, mutation) => model
                .earlier(*back)
                .map(|(user, change)| (user, mutate(&change, mutation))),
        };
        if let Some((user, change)) = resolved {
            requests.push((usize::from(*second), user, change));
        }
    }
    let outcomes = join_all(
        requests
            .iter()
            .map(|(store, _, change)| stores[*store].apply(change)),
    )
    .await;
    model.stats.lanes += 1;

    for ((_, _, change), outcome) in requests.iter().zip(&outcomes) {
        prop_assert!(
            matches!(
                outcome,
                Ok(_)
                    | Err(StoreError::IdempotencyConflict
                        | StoreError::InsufficientCredits { .. }
                        | StoreError::OutOfRange {
                            field: "balance",
                            ..
                        })
            ),
            "unexpected outcome: {}",
            show(change, outcome)
        );
        if let Ok(Applied::New(event)) = outcome {
            check_new_event(model, change, event)?;
        }
    }
    for user in 0..model.users.len() {
        let account = &model.accounts[user];
        let mut new: Vec<&BalanceEvent> = requests
            .iter()
            .zip(&outcomes)
            .filter(|((_, u, _), _)| *u == user)
            .filter_map(|(_, outcome)| match outcome {
                Ok(Applied::New(event)) => Some(event),
                _ => None,
            })
            .collect();
        new.sort_by_key(|event| event.version);
        let versions: Vec<i64> = new.iter().map(|event| event.version).collect();
        let expected: Vec<i64> = (1..=new.len() as i64)
            .map(|n| account.version() + n)
            .collect();
        prop_assert_eq!(versions, expected, "versions of user {}", user);
        let mut running = account.balance;
        for event in new {
            running += event.change.as_ref().expect("checked").amount;
            prop_assert_eq!(event.balance, running, "running sum at {}", event.version);
        }
        let same_user = requests.iter().filter(|(_, u, _)| *u == user).count();
        if same_user > 1 {
            model.stats.lane_outcomes_same_user += same_user as u64;
        }
    }

    let serial = serial_order(model, &requests, &outcomes);
    prop_assert!(
        serial.is_some(),
        "no serial order explains the lane:\n{}",
        requests
            .iter()
            .zip(&outcomes)
            .map(|((store, _, change), outcome)| format!(
                "  store {store}: {}",
                show(change, outcome)
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for at in serial.expect("checked") {
        let (_, user, change) = &requests[at];
        if change.idempotency_key.is_some() {
            model.keyed.push((*user, change.clone()));
        }
        model.record(*user, change, &outcomes[at]);
    }
    Ok(())
}

/// An order of the lane in which each request, run alone against the model, gets exactly the
/// answer it got; a depth-first search, pruned by each answer (a new event fixes its version).
fn serial_order(
    model: &Model,
    requests: &[(usize, usize, NewChange)],
    outcomes: &[Result<Applied, StoreError>],
) -> Option<Vec<usize>> {
    struct Search<'a> {
        model: &'a Model,
        requests: &'a [(usize, usize, NewChange)],
        outcomes: &'a [Result<Applied, StoreError>],
        balances: Vec<i64>,
        versions: Vec<i64>,
        /// Keys first used in this lane so far: (user, key) → request index.
        lane_keys: HashMap<(usize, String), usize>,
        order: Vec<usize>,
        placed: Vec<bool>,
    }

    impl Search<'_> {
        fn expected(&self, at: usize) -> Expected {
            let (_, user, change) = &self.requests[at];
            let used = change.idempotency_key.as_ref().and_then(|key| {
                if let Some((prior, event)) = self.model.accounts[*user].keys.get(key) {
                    return Some((prior, event));
                }
                let first = *self.lane_keys.get(&(*user, key.clone()))?;
                match &self.outcomes[first] {
                    Ok(Applied::New(event)) => Some((&self.requests[first].2, event)),
                    _ => None,
                }
            });
            expect(self.balances[*user], self.versions[*user], used, change)
        }

        fn run(&mut self) -> bool {
            if self.order.len() == self.requests.len() {
                return true;
            }
            let requests = self.requests;
            for (at, (_, user, change)) in requests.iter().enumerate() {
                if self.placed[at] {
                    continue;
                }
                if !matches(&self.expected(at), change, &self.outcomes[at]) {
                    continue;
                }
                let undo = (self.balances[*user], self.versions[*user]);
                let mut new_key = None;
                if let Ok(Applied::New(event)) = &self.outcomes[at] {
                    self.balances[*user] = event.balance;
                    self.versions[*user] = event.version;
                    if let Some(key) = &change.idempotency_key {
                        new_key = Some((*user, key.clone()));
                        self.lane_keys.insert((*user, key.clone()), at);
                    }
                }
                self.placed[at] = true;
                self.order.push(at);
                if self.run() {
                    return true;
                }
                self.order.pop();
                self.placed[at] = false;
                (self.balances[*user], self.versions[*user]) = undo;
                if let Some(slot) = new_key {
                    self.lane_keys.remove(&slot);
                }
            }
            false
        }
    }

    let mut search = Search {
        model,
        requests,
        outcomes,
        balances: model.accounts.iter().map(|a| a.balance).collect(),
        versions: model.accounts.iter().map(Account::version).collect(),
        lane_keys: HashMap::new(),
        order: Vec::new(),
        placed: vec![false; requests.len()],
    };
    search.run().then_some(search.order)
}

/// The snapshot is the model's balance and version, stamped by the last applied change; a
/// user with none is the never-seen user, without an account.
async fn check_snapshot(store: &Store, model: &Model, user: usize) -> Result<(), TestCaseError> {
    let account = &model.accounts[user];
    let snapshot = store_ok(store.snapshot(&model.users[user]).await, "snapshot")?;
    let accounts = store_ok(
        store
            .snapshots(std::slice::from_ref(&model.users[user]))
            .await,
        "snapshots",
    )?;
    if account.rows.is_empty() {
        prop_assert!(
            accounts.is_empty(),
            "user {} has no applied change but an account: {:?}",
            user,
            accounts
        );
    } else {
        prop_assert_eq!(&accounts, std::slice::from_ref(&snapshot));
    }
    prop_assert_eq!(&snapshot.user_id, &model.users[user]);
    prop_assert_eq!(
        (snapshot.balance, snapshot.version, snapshot.updated_at),
        (
            account.balance,
            account.version(),
            account.rows.last().map(|row| row.created_at)
        ),
        "snapshot of user {}",
        user
    );
    Ok(())
}

/// The user's ledger, read page by page, is exactly the model's rows: versions 1..n, each
/// `balance_after` the running sum, their sum the balance.
async fn check_ledger(
    store: &Store,
    model: &Model,
    user: usize,
    page_limit: u32,
) -> Result<(), TestCaseError> {
    let account = &model.accounts[user];
    let mut ledger = Vec::new();
    let mut before = None;
    loop {
        let page = store_ok(
            store
                .transactions(&model.users[user], page_limit, before)
                .await,
            "ledger page",
        )?;
        prop_assert!(page.items.len() <= page_limit as usize);
        ledger.extend(page.items);
        match page.next_before {
            Some(next) => {
                prop_assert!(
                    before.is_none_or(|before| next < before),
                    "cursor went back"
                );
                before = Some(next);
            }
            None => break,
        }
    }
    ledger.reverse();
    let versions: Vec<i64> = ledger.iter().map(|row| row.version).collect();
    prop_assert_eq!(versions, (1..=account.version()).collect::<Vec<_>>());
    let mut running = 0_i64;
    for row in &ledger {
        running += row.amount;
        prop_assert_eq!(row.balance_after, running, "version {}", row.version);
        prop_assert!((0..=MAX_CREDITS).contains(&running));
    }
    prop_assert_eq!(running, account.balance, "Σ applied of user {}", user);
    prop_assert_eq!(
        account.rows.iter().map(|row| row.amount).sum::<i64>(),
        account.balance
    );
    prop_assert_eq!(&ledger, &account.rows, "ledger of user {}", user);
    let snapshot = store_ok(store.snapshot(&model.users[user]).await, "snapshot")?;
    prop_assert_eq!(snapshot.balance, running);
    Ok(())
}
