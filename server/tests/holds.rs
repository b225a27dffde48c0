//! Holds (SPEC §12) on SQLite and PostgreSQL through the real router: placing, available
//! credits for holds and spends, partial and full capture, release, retries, `hold_closed`,
//! expiry pushed once, concurrent holds that never overdraw, and bad input.

mod common;

use std::time::Duration;

use app::wire::paths;
use common::{
    Answer, SERVICE_KEY, TestDb, change, config, get, live::TestServer, on_both_databases, post,
    send, state, user_token,
};
use futures::StreamExt;
use serde_json::{Value, json};
use server::{
    AppState,
    store::{Applied, NewHold, Settle, Store},
};

on_both_databases!(
    place_then_capture_part,
    release_and_retries,
    idempotent_placing,
    holds_expire_within_five_seconds,
    concurrent_holds_never_overdraw,
    racing_sweepers_expire_once,
    captures_racing_across_instances_apply_once,
    bad_input_is_refused,
);

async fn place(state: &AppState, body: Value) -> Answer {
    send(
        state,
        post(paths::HOLDS, Some(SERVICE_KEY), body.to_string()),
    )
    .await
}

async fn settle(state: &AppState, id: &str, action: &str, body: Option<Value>) -> Answer {
    let uri = format!("{}/{id}/{action}", paths::HOLDS);
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut request = post(&uri, Some(SERVICE_KEY), body.clone());
    if body.is_empty() {
        request.headers_mut().remove("content-type");
    }
    send(state, request).await
}

async fn grant(state: &AppState, user: &str, amount: i64) {
    let answer = send(
        state,
        post(
            paths::CHANGES,
            Some(SERVICE_KEY),
            change(user, amount, "grant"),
        ),
    )
    .await;
    assert_eq!(answer.status, 201);
}

async fn balance(state: &AppState, user: &str) -> Value {
    send(state, get(paths::BALANCE, Some(&user_token(user))))
        .await
        .json()
}

/// A hold takes from `available`, not `balance`; a partial capture writes one `capture`
/// row and releases the rest; a retried capture answers the same; anything else is closed.
async fn place_then_capture_part(db: TestDb) {
    let state = state(config(&db, &[])).await;
    grant(&state, "ann", 100).await;
    let placed = place(
        &state,
        json!({"user_id": "ann", "amount": 30, "metadata": {"job": "render-7"}}),
    )
    .await;
    assert_eq!(placed.status, 201, "{:?}", placed.json());
    let placed = placed.json();
    let hold = &placed["hold"];
    assert_eq!(
        (hold["status"].as_str(), hold["amount"].as_i64()),
        (Some("held"), Some(30))
    );
    assert_eq!(placed["event"]["hold"], *hold);
    let event = &placed["event"];
    assert_eq!(
        (
            &event["balance"],
            &event["held"],
            &event["available"],
            &event["version"]
        ),
        (&json!(100), &json!(30), &json!(70), &json!(2))
    );
    let expires = chrono::DateTime::parse_from_rfc3339(hold["expires_at"].as_str().unwrap())
        .unwrap()
        - chrono::DateTime::parse_from_rfc3339(hold["created_at"].as_str().unwrap()).unwrap();
    assert_eq!(expires.num_seconds(), 900, "the default lifetime");
    let id = hold["id"].as_str().unwrap().to_owned();

    // Held credits can be neither held again nor spent.
    let too_much = place(&state, json!({"user_id": "ann", "amount": 71})).await;
    assert_eq!(
        (too_much.status, too_much.error_code()),
        (409, "insufficient_credits".into())
    );
    let spend = send(
        &state,
        post(
            paths::CHANGES,
            Some(SERVICE_KEY),
            change("ann", -71, "spend"),
        ),
    )
    .await;
    assert_eq!(
        (spend.status, spend.error_code()),
        (409, "insufficient_credits".into())
    );
    let now = balance(&state, "ann").await;
    assert_eq!(
        (&now["balance"], &now["held"], &now["available"]),
        (&json!(100), &json!(30), &json!(70))
    );
    let listed = send(&state, get(paths::HOLDS, Some(&user_token("ann")))).await;
    assert_eq!(listed.json()["items"], json!([hold]));
    let others = send(&state, get(paths::HOLDS, Some(&user_token("bob")))).await;
    assert_eq!(others.json()["items"], json!([]));

    let captured = settle(&state, &id, "capture", Some(json!({"amount": 12}))).await;
    assert_eq!(captured.status, 200, "{:?}", captured.json());
    assert!(!captured.headers.contains_key("idempotent-replayed"));
    let body = captured.json();
    assert_eq!(
        (&body["hold"]["status"], &body["hold"]["captured"]),
        (&json!("captured"), &json!(12))
    );
    let event = &body["event"];
    assert_eq!(
        (
            &event["balance"],
            &event["held"],
            &event["available"],
            &event["version"]
        ),
        (&json!(88), &json!(0), &json!(88), &json!(3))
    );
    assert_eq!(
        (&event["change"]["type"], &event["change"]["amount"]),
        (&json!("capture"), &json!(-12))
    );
    assert_eq!(
        event["change"]["metadata"],
        json!({"job": "render-7", "hold_id": id})
    );
    let ledger = send(&state, get(paths::TRANSACTIONS, Some(&user_token("ann")))).await;
    let rows = ledger.json()["items"].clone();
    assert_eq!(
        rows.as_array().map(Vec::len),
        Some(2),
        "one grant and one capture: {rows}"
    );
    assert_eq!(
        (&rows[0]["type"], &rows[0]["balance_after"]),
        (&json!("capture"), &json!(88))
    );

    // Retrying the capture, with its amount or none, answers the original result.
    for retry in [Some(json!({"amount": 12})), None] {
        let again = settle(&state, &id, "capture", retry).await;
        assert_eq!(again.status, 200);
        assert_eq!(again.headers["idempotent-replayed"], "true");
        assert_eq!(again.json(), body);
    }
    for (action, body) in [("capture", Some(json!({"amount": 13}))), ("release", None)] {
        let closed = settle(&state, &id, action, body).await;
        assert_eq!(
            (closed.status, closed.error_code()),
            (409, "hold_closed".into())
        );
        assert!(
            closed.json()["message"]
                .as_str()
                .unwrap()
                .contains("captured")
        );
    }
    assert_eq!(
        balance(&state, "ann").await["version"],
        3,
        "refusals changed nothing"
    );
}

/// Releasing returns the credits without a ledger row; a retried release is replayed.
async fn release_and_retries(db: TestDb) {
    let state = state(config(&db, &[])).await;
    grant(&state, "ben", 50).await;
    let placed = place(&state, json!({"user_id": "ben", "amount": 50}))
        .await
        .json();
    let id = placed["hold"]["id"].as_str().unwrap().to_owned();
    let released = settle(&state, &id, "release", None).await;
    assert_eq!(released.status, 200);
    let body = released.json();
    assert_eq!(body["hold"]["status"], "released");
    assert_eq!(
        (
            &body["event"]["balance"],
            &body["event"]["available"],
            &body["event"]["change"]
        ),
        (&json!(50), &json!(50), &Value::Null)
    );
    let again = settle(&state, &id, "release", None).await;
    assert_eq!(
        (
            again.status,
            again.headers["idempotent-replayed"].to_str().unwrap()
        ),
        (200, "true")
    );
    assert_eq!(again.json(), body);
    let capture = settle(&state, &id, "capture", None).await;
    assert_eq!(
        (capture.status, capture.error_code()),
        (409, "hold_closed".into())
    );
    let ledger = send(&state, get(paths::TRANSACTIONS, Some(&user_token("ben")))).await;
    assert_eq!(ledger.json()["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(balance(&state, "ben").await["version"], 3);
}

/// A hold placed twice with one key is placed once; another body with the key conflicts.
async fn idempotent_placing(db: TestDb) {
    let state = state(config(&db, &[])).await;
    grant(&state, "cat", 10).await;
    let request = json!({"user_id": "cat", "amount": 4, "ttl_s": 60, "idempotency_key": "job-1"});
    let first = place(&state, request.clone()).await;
    assert_eq!(first.status, 201);
    let second = place(&state, request).await;
    assert_eq!(
        (
            second.status,
            second.headers["idempotent-replayed"].to_str().unwrap()
        ),
        (200, "true")
    );
    assert_eq!(second.json(), first.json());
    for other in [
        json!({"user_id": "cat", "amount": 5, "ttl_s": 60, "idempotency_key": "job-1"}),
        json!({"user_id": "cat", "amount": 4, "ttl_s": 61, "idempotency_key": "job-1"}),
    ] {
        let conflict = place(&state, other).await;
        assert_eq!(
            (conflict.status, conflict.error_code()),
            (409, "idempotency_conflict".into())
        );
    }
    let now = balance(&state, "cat").await;
    assert_eq!((&now["held"], &now["version"]), (&json!(4), &json!(2)));
}

/// An expired hold gives its credits back within 5 s, pushed to a connected client, and
/// can no longer be captured.
async fn holds_expire_within_five_seconds(db: TestDb) {
    let server = TestServer::start(config(&db, &[])).await;
    let state = &server.state;
    grant(state, "dan", 10).await;
    let url = format!(
        "ws://{}{}?token={}",
        server.addr,
        paths::WS,
        user_token("dan")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("WebSocket");
    let snapshot = common::live::next_json(&mut ws).await;
    assert_eq!(snapshot["available"], 10);
    let placed = place(state, json!({"user_id": "dan", "amount": 6, "ttl_s": 1}))
        .await
        .json();
    let id = placed["hold"]["id"].as_str().unwrap().to_owned();
    let pushed = common::live::next_json(&mut ws).await;
    assert_eq!(
        (&pushed["available"], &pushed["hold"]["status"]),
        (&json!(4), &json!("held"))
    );

    let expired = tokio::time::timeout(Duration::from_secs(7), common::live::next_json(&mut ws))
        .await
        .expect("the expiry is pushed within 5 s of expires_at");
    assert_eq!(
        (
            &expired["available"],
            &expired["held"],
            &expired["hold"]["status"],
            &expired["version"]
        ),
        (&json!(10), &json!(0), &json!("expired"), &json!(3))
    );
    let late = settle(state, &id, "capture", None).await;
    assert_eq!(
        (late.status, late.error_code()),
        (409, "hold_closed".into())
    );
    assert!(late.json()["message"].as_str().unwrap().contains("expired"));
    // Exactly once: nothing more arrives, and the version moved once.
    let more = tokio::time::timeout(Duration::from_millis(2500), ws.next()).await;
    assert!(more.is_err(), "a second event arrived: {more:?}");
    assert_eq!(balance(state, "dan").await["version"], 3);
    server.stop().await;
}

/// Fifty holds at once on a balance that covers twenty: twenty are placed, none overdraws.
async fn concurrent_holds_never_overdraw(db: TestDb) {
    let state = state(config(&db, &[])).await;
    grant(&state, "eve", 20).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let store = state.store.clone();
        tasks.spawn(async move { store.place_hold(&hold("eve", 1, 60)).await });
    }
    let (mut placed, mut refused) = (0, 0);
    for outcome in tasks.join_all().await {
        match outcome {
            Ok(Applied::New(_)) => placed += 1,
            Err(server::store::StoreError::InsufficientCredits {
                available: 0,
                needed: 1,
            }) => {
                refused += 1;
            }
            other => panic!("unexpected outcome: {other:?}"),
        }
    }
    assert_eq!((placed, refused), (20, 30));
    let now = state.store.snapshot("eve").await.unwrap();
    assert_eq!(
        (now.balance, now.held, now.available, now.version),
        (20, 20, 0, 21)
    );
    assert_eq!(state.store.holds("eve").await.unwrap().len(), 20);
}

/// Two stores on one database (two instances) sweep the same due hold at once: it expires
/// once, with one event.
async fn racing_sweepers_expire_once(db: TestDb) {
    let (commits_a, mut events_a) = tokio::sync::mpsc::channel(16);
    let (commits_b, mut events_b) = tokio::sync::mpsc::channel(16);
    let a = Store::connect(&db.url, commits_a).await.unwrap();
    let b = Store::connect(&db.url, commits_b).await.unwrap();
    a.apply(&server::store::NewChange {
        user_id: "fay".into(),
        amount: 5,
        kind: "grant".into(),
        metadata: Default::default(),
        idempotency_key: None,
    })
    .await
    .unwrap();
    for _ in 0..3 {
        a.place_hold(&hold("fay", 1, 1)).await.unwrap();
    }
    while events_a.try_recv().is_ok() {}
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (expired_a, expired_b) = tokio::join!(a.expire_due(100), b.expire_due(100));
    assert_eq!(expired_a.unwrap() + expired_b.unwrap(), 3);
    let mut events = Vec::new();
    while let Ok(event) = events_a.try_recv() {
        events.push(event);
    }
    while let Ok(event) = events_b.try_recv() {
        events.push(event);
    }
    assert_eq!(events.len(), 3, "one event per hold: {events:?}");
    let now = a.snapshot("fay").await.unwrap();
    assert_eq!((now.held, now.available, now.version), (0, 5, 7));
    assert_eq!(a.expire_due(100).await.unwrap(), 0, "nothing is due twice");
    // Settling an expired hold is refused; the refusal changes nothing.
    let held = a.place_hold(&hold("fay", 2, 60)).await.unwrap();
    let Applied::New(event) = held else {
        panic!("placed")
    };
    let id = event.hold.unwrap().id;
    assert!(
        b.settle_hold(&id, Settle::Release, Some("fay"))
            .await
            .is_ok()
    );
    assert!(matches!(
        b.settle_hold(&id, Settle::Release, Some("gus")).await,
        Err(server::store::StoreError::NotFound(_))
    ));
}

/// Two stores on one database (two instances) capture the same hold 20 times at once while
/// another hold stays active: one capture applies, every other answers it again, and the
/// balance is charged once: holds are read only under the account lock, never before it.
async fn captures_racing_across_instances_apply_once(db: TestDb) {
    let (commits_a, _events_a) = tokio::sync::mpsc::channel(64);
    let (commits_b, _events_b) = tokio::sync::mpsc::channel(64);
    let a = Store::connect(&db.url, commits_a).await.unwrap();
    let b = Store::connect(&db.url, commits_b).await.unwrap();
    a.apply(&server::store::NewChange {
        user_id: "hal".into(),
        amount: 1000,
        kind: "grant".into(),
        metadata: Default::default(),
        idempotency_key: None,
    })
    .await
    .unwrap();
    a.place_hold(&hold("hal", 500, 60)).await.unwrap();
    let Applied::New(placed) = a.place_hold(&hold("hal", 10, 60)).await.unwrap() else {
        panic!("placed")
    };
    let id = placed.hold.unwrap().id;
    let mut captures = tokio::task::JoinSet::new();
    for i in 0..20 {
        let (store, id) = (if i % 2 == 0 { a.clone() } else { b.clone() }, id.clone());
        captures.spawn(async move { store.settle_hold(&id, Settle::Capture(None), None).await });
    }
    let answers = captures.join_all().await;
    let new = answers
        .iter()
        .filter(|answer| matches!(answer, Ok(Applied::New(_))))
        .count();
    let replayed = answers
        .iter()
        .filter(|answer| matches!(answer, Ok(Applied::Replayed(_))))
        .count();
    assert_eq!((new, replayed), (1, 19), "{answers:?}");
    let now = b.snapshot("hal").await.unwrap();
    assert_eq!(
        (now.balance, now.held, now.available, now.version),
        (990, 500, 490, 4)
    );
    let ledger = b.transactions("hal", 10, None).await.unwrap().items;
    assert_eq!(ledger.len(), 2, "the grant and one capture: {ledger:?}");
}

/// Bad amounts, lifetimes, ids and credentials are refused with their `ApiError`.
async fn bad_input_is_refused(db: TestDb) {
    let state = state(config(&db, &[])).await;
    grant(&state, "gil", 10).await;
    for (body, status, code) in [
        (json!({"user_id": "gil", "amount": 0}), 422, "invalid_field"),
        (
            json!({"user_id": "gil", "amount": -5}),
            422,
            "invalid_field",
        ),
        (
            json!({"user_id": "gil", "amount": 1.5}),
            422,
            "invalid_field",
        ),
        (
            json!({"user_id": "gil", "amount": 9_007_199_254_740_992_i64}),
            422,
            "out_of_range",
        ),
        (
            json!({"user_id": "gil", "amount": 1, "ttl_s": 0}),
            422,
            "invalid_field",
        ),
        (
            json!({"user_id": "gil", "amount": 1, "ttl_s": 86_401}),
            422,
            "invalid_field",
        ),
        (
            json!({"user_id": "gil", "amount": 1, "ttl_s": "soon"}),
            422,
            "invalid_field",
        ),
        (
            json!({"user_id": "gil", "amount": 1, "extra": true}),
            422,
            "invalid_field",
        ),
        (json!(["gil", 1]), 400, "bad_json"),
    ] {
        let answer = place(&state, body.clone()).await;
        assert_eq!(
            (answer.status, answer.error_code()),
            (status, code.into()),
            "{body}"
        );
    }
    let unknown = settle(&state, "no-such-hold", "capture", None).await;
    assert_eq!(
        (unknown.status, unknown.error_code()),
        (404, "not_found".into())
    );
    let id = place(&state, json!({"user_id": "gil", "amount": 5}))
        .await
        .json()["hold"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for amount in [json!(6), json!(0), json!(-1)] {
        let answer = settle(&state, &id, "capture", Some(json!({ "amount": amount }))).await;
        assert_eq!(
            (answer.status, answer.error_code()),
            (422, "invalid_field".into()),
            "{amount}"
        );
    }
    // A user's own credential cannot place, capture or release.
    let user = user_token("gil");
    let body = json!({"user_id": "gil", "amount": 1}).to_string();
    for uri in [
        paths::HOLDS.to_owned(),
        paths::with_id(paths::HOLD_RELEASE, &id),
    ] {
        let answer = send(&state, post(&uri, Some(&user), body.clone())).await;
        assert_eq!(
            (answer.status, answer.error_code()),
            (403, "forbidden".into()),
            "{uri}"
        );
    }
    let now = balance(&state, "gil").await;
    assert_eq!(
        (&now["held"], &now["version"]),
        (&json!(5), &json!(2)),
        "nothing half-applied"
    );
}

fn hold(user: &str, amount: i64, ttl_s: i64) -> NewHold {
    NewHold {
        user_id: user.into(),
        amount,
        ttl_s,
        metadata: Default::default(),
        idempotency_key: None,
    }
}

/// Holds are pushed on SSE and polling as on WebSocket, with `available`.
#[tokio::test]
async fn holds_reach_sse_and_polling() {
    let db = TestDb::sqlite();
    let server = TestServer::start(config(&db, &[])).await;
    server.change("hal", 10).await;
    let token = user_token("hal");
    let mut sse = common::live::SseStream::open(&server, &token, None).await;
    assert_eq!(sse.next_balance().await["available"], 10);
    let poll_url = server.url(&format!("{}?version=1&wait=10", paths::POLL));
    let poll = server.http.get(poll_url).bearer_auth(&token).send();
    let placed = server
        .http
        .post(server.url(paths::HOLDS))
        .bearer_auth(SERVICE_KEY)
        .json(&json!({"user_id": "hal", "amount": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), 201);
    let pushed = sse.next_balance().await;
    assert_eq!(
        (&pushed["held"], &pushed["available"]),
        (&json!(3), &json!(7))
    );
    assert_eq!(pushed["hold"]["amount"], 3);
    let polled: Value = poll.await.unwrap().json().await.unwrap();
    assert_eq!(
        (&polled["held"], &polled["available"], &polled["version"]),
        (&json!(3), &json!(7), &json!(2))
    );
    server.stop().await;
}
