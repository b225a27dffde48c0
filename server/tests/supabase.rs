//! Supabase mode against a local server that plays Supabase Auth over real HTTP: JWKS with
//! real RSA and EC keys, key rotation, `/auth/v1/user` with its cache, and the bounds that
//! keep Supabase from being flooded through us (SPEC §10).

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use app::wire::paths;
use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::get,
};
use common::{
    SECRET, SERVICE_KEY, TestDb, change, config, get as get_req, now_plus, post, send, sign,
};
use futures::future::join_all;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use server::AppState;

/// The server's shortest time between two JWKS downloads.
const JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// The server's bound on `/auth/v1/user` look-ups in flight.
const MAX_LOOKUPS_IN_FLIGHT: usize = 16;

/// What the fake Supabase Auth serves and how often it was asked.
#[derive(Clone, Default)]
struct Fake {
    jwks: Arc<Mutex<Vec<Value>>>,
    users: Arc<Mutex<HashMap<String, String>>>,
    jwks_hits: Arc<AtomicUsize>,
    user_hits: Arc<AtomicUsize>,
    /// When non-zero, both endpoints answer this status, as during an outage.
    outage: Arc<AtomicU16>,
    /// How long `/auth/v1/user` takes to answer, in milliseconds.
    delay_ms: Arc<AtomicU64>,
    /// `/auth/v1/user` requests being answered now, and the most ever at once.
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Fake {
    fn outage_status(&self) -> Option<StatusCode> {
        match self.outage.load(Ordering::SeqCst) {
            0 => None,
            code => Some(StatusCode::from_u16(code).expect("a status code")),
        }
    }
}

fn fixture_keys() -> Vec<Value> {
    let set: Value = serde_json::from_str(include_str!("fixtures/jwks.json")).expect("jwks");
    set["keys"].as_array().expect("keys").clone()
}

async fn jwks(State(fake): State<Fake>) -> (StatusCode, Json<Value>) {
    fake.jwks_hits.fetch_add(1, Ordering::SeqCst);
    if let Some(status) = fake.outage_status() {
        return (status, Json(json!({"msg": "down"})));
    }
    let keys = json!({ "keys": *fake.jwks.lock().expect("lock") });
    (StatusCode::OK, Json(keys))
}

async fn user(State(fake): State<Fake>, headers: HeaderMap) -> (StatusCode, Json<Value>) {
    fake.user_hits.fetch_add(1, Ordering::SeqCst);
    let now = fake.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    fake.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let delay = fake.delay_ms.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    fake.in_flight.fetch_sub(1, Ordering::SeqCst);
    if let Some(status) = fake.outage_status() {
        return (status, Json(json!({"msg": "down"})));
    }
    let refuse = (
        StatusCode::UNAUTHORIZED,
        Json(json!({"msg": "invalid JWT"})),
    );
    if headers.get("apikey").and_then(|v| v.to_str().ok()) != Some(SERVICE_KEY) {
        return refuse;
    }
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let users = fake.users.lock().expect("lock");
    match token.and_then(|t| users.get(t)) {
        Some(id) => (
            StatusCode::OK,
            Json(json!({"id": id, "role": "authenticated"})),
        ),
        None => refuse,
    }
}

/// Starts the fake on a free port; returns it and its URL.
async fn start_fake(keys: Vec<Value>) -> (Fake, String) {
    let fake = Fake::default();
    *fake.jwks.lock().expect("lock") = keys;
    let app = Router::new()
        .route("/auth/v1/.well-known/jwks.json", get(jwks))
        .route("/auth/v1/user", get(user))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("fake serves");
    });
    (fake, url)
}

async fn supabase_state(db: &TestDb, url: &str) -> AppState {
    common::state(config(db, &[("SUPABASE_URL", url), ("JWT_SECRET", "")])).await
}

fn signed(alg: Algorithm, kid: &str, claims: Value) -> String {
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(include_bytes!("fixtures/rsa_private.pem")),
        _ => EncodingKey::from_ec_pem(include_bytes!("fixtures/ec_private.pem")),
    }
    .expect("fixture key");
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims, &key).expect("signs")
}

/// An HS256 token under a secret this instance does not have, so only Supabase can vouch
/// for it.
fn foreign(claims: Value) -> String {
    let key = EncodingKey::from_secret(b"the-project-secret-we-do-not-have-0123");
    sign(claims, Algorithm::HS256, &key)
}

/// Registers `token` at the fake as `user`'s.
fn vouch(fake: &Fake, token: &str, user: &str) {
    fake.users
        .lock()
        .expect("lock")
        .insert(token.to_owned(), user.to_owned());
}

async fn balance_status(state: &AppState, token: &str) -> (u16, Value) {
    let answer = send(state, get_req(paths::BALANCE, Some(token))).await;
    let body = answer.json();
    (answer.status, body)
}

/// RS256 and ES256 tokens verify against the JWKS; expired ones and unknown keys do not.
#[tokio::test]
async fn asymmetric_tokens_verify_with_jwks() {
    let (fake, url) = start_fake(fixture_keys()).await;
    let db = TestDb::sqlite();
    let state = supabase_state(&db, &url).await;

    let claims = |sub: &str, exp: i64| json!({"sub": sub, "exp": exp, "role": "authenticated"});
    let (status, body) = balance_status(
        &state,
        &signed(Algorithm::RS256, "rsa-1", claims("rs-user", now_plus(60))),
    )
    .await;
    assert_eq!((status, body["user_id"].as_str()), (200, Some("rs-user")));
    let (status, body) = balance_status(
        &state,
        &signed(Algorithm::ES256, "ec-1", claims("ec-user", now_plus(60))),
    )
    .await;
    assert_eq!((status, body["user_id"].as_str()), (200, Some("ec-user")));
    assert_eq!(fake.jwks_hits.load(Ordering::SeqCst), 1, "keys are cached");

    let expired = signed(Algorithm::RS256, "rsa-1", claims("rs-user", now_plus(-30)));
    assert_eq!(balance_status(&state, &expired).await.0, 401);
    // The RSA key under the EC key's id: the signature cannot verify.
    let swapped = signed(Algorithm::RS256, "ec-1", claims("rs-user", now_plus(60)));
    assert_eq!(balance_status(&state, &swapped).await.0, 401);
    assert_eq!(
        fake.user_hits.load(Ordering::SeqCst),
        0,
        "JWKS tokens never reach /user"
    );
}

/// A key published after the cache was filled is found by refreshing on its unknown `kid`
/// once the refresh interval has passed, and refreshes are rate-limited.
#[tokio::test]
async fn unknown_kid_refreshes_the_keys() {
    let keys = fixture_keys();
    let (fake, url) = start_fake(vec![keys[0].clone()]).await;
    let db = TestDb::sqlite();
    let state = supabase_state(&db, &url).await;
    let claims = json!({"sub": "u", "exp": now_plus(120)});
    let rotated = signed(Algorithm::ES256, "ec-1", claims.clone());

    assert_eq!(
        balance_status(&state, &signed(Algorithm::RS256, "rsa-1", claims.clone()))
            .await
            .0,
        200
    );
    fake.jwks.lock().expect("lock").push(keys[1].clone());
    assert_eq!(balance_status(&state, &rotated).await.0, 401, "too soon");
    assert_eq!(fake.jwks_hits.load(Ordering::SeqCst), 1);
    tokio::time::sleep(JWKS_REFRESH_INTERVAL + Duration::from_secs(1)).await;
    assert_eq!(balance_status(&state, &rotated).await.0, 200);
    assert_eq!(fake.jwks_hits.load(Ordering::SeqCst), 2);

    let bogus = signed(Algorithm::ES256, "made-up", claims);
    for _ in 0..5 {
        assert_eq!(balance_status(&state, &bogus).await.0, 401);
    }
    assert_eq!(fake.jwks_hits.load(Ordering::SeqCst), 2, "no refresh flood");
}

/// A token no local key can check is verified by `/auth/v1/user` (with the `apikey`
/// header), and the positive answer is cached.
#[tokio::test]
async fn other_tokens_verify_through_auth_user() {
    let (fake, url) = start_fake(fixture_keys()).await;
    let db = TestDb::sqlite();
    let state = supabase_state(&db, &url).await;
    let token = foreign(json!({"sub": "ignored", "exp": now_plus(60)}));
    fake.users
        .lock()
        .expect("lock")
        .insert(token.clone(), "remote-user".into());

    let (status, body) = balance_status(&state, &token).await;
    assert_eq!(
        (status, body["user_id"].as_str()),
        (200, Some("remote-user"))
    );
    assert_eq!(balance_status(&state, &token).await.0, 200);
    assert_eq!(
        fake.user_hits.load(Ordering::SeqCst),
        1,
        "second call served from the cache"
    );

    let refused = foreign(json!({"sub": "x", "exp": now_plus(60)}));
    assert_eq!(balance_status(&state, &refused).await.0, 401);
    let expired = foreign(json!({"sub": "x", "exp": now_plus(-60)}));
    assert_eq!(balance_status(&state, &expired).await.0, 401);

    // With Supabase Auth down, an unknown token is 503, not a false 401; cached ones still pass.
    fake.outage.store(503, Ordering::SeqCst);
    let unknown = foreign(json!({"sub": "y", "exp": now_plus(60)}));
    let (status, body) = balance_status(&state, &unknown).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("unavailable")));
    assert_eq!(balance_status(&state, &token).await.0, 200);
}

/// In Supabase mode the opaque `SUPABASE_SERVICE_ROLE_KEY` is a service credential.
#[tokio::test]
async fn service_role_key_is_a_service() {
    let (_fake, url) = start_fake(fixture_keys()).await;
    let db = TestDb::sqlite();
    let state = supabase_state(&db, &url).await;
    let answer = send(
        &state,
        post(paths::CHANGES, Some(SERVICE_KEY), change("u", 5, "grant")),
    )
    .await;
    assert_eq!(answer.status, 201);
}

/// A token Supabase refuses, asked 50 times at once and 50 more times in a row, costs one
/// `/auth/v1/user` request; every answer is 401.
#[tokio::test]
async fn refused_token_costs_one_lookup() {
    let (fake, url) = start_fake(fixture_keys()).await;
    let db = TestDb::sqlite();
    let state = supabase_state(&db, &url).await;
    let junk = foreign(json!({"sub": "nobody", "exp": now_plus(600)}));

    let answers = join_all((0..50).map(|_| balance_status(&state, &junk))).await;
    assert!(
        answers.iter().all(|(status, _)| *status == 401),
        "{answers:?}"
    );
    for _ in 0..50 {
        assert_eq!(balance_status(&state, &junk).await.0, 401);
    }
    assert_eq!(fake.user_hits.load(Ordering::SeqCst), 1);
}

/// Supabase answering 429 is `503 unavailable`, not 401, and 20 concurrent requests with
/// one token cost one request.
#[tokio::test]
async fn rate_limited_auth_is_unavailable() {
    let (fake, url) = start_fake(fixture_keys()).await;
    let db = TestDb::sqlite();
    let state = supabase_state(&db, &url).await;
    let token = foreign(json!({"sub": "x", "exp": now_plus(600)}));
    vouch(&fake, &token, "remote-user");
    fake.outage.store(429, Ordering::SeqCst);

    let answers = join_all((0..20).map(|_| balance_status(&state, &token))).await;
    for (status, body) in answers {
        assert_eq!(status, 503);
        assert_eq!(body["error"], "unavailable");
        assert!(body["message"].is_string());
    }
    assert_eq!(fake.user_hits.load(Ordering::SeqCst), 1);
}

/// With a local secret and Supabase both configured, an HS256 token with a bad signature is
/// refused locally, even one Supabase would vouch for.
#[tokio::test]
async fn local_secret_decides_hs256_alone() {
    let (fake, url) = start_fake(fixture_keys()).await;
    let db = TestDb::sqlite();
    let state = common::state(config(
        &db,
        &[("SUPABASE_URL", &url), ("JWT_SECRET", SECRET)],
    ))
    .await;
    let forged = foreign(json!({"sub": "mallory", "exp": now_plus(600)}));
    vouch(&fake, &forged, "mallory");

    let (status, body) = balance_status(&state, &forged).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    assert_eq!(fake.user_hits.load(Ordering::SeqCst), 0);
}

/// Many distinct tokens at once against a slow Supabase: never more than 16 look-ups in
/// flight, and every caller is still answered.
#[tokio::test]
async fn lookups_in_flight_are_bounded() {
    let (fake, url) = start_fake(fixture_keys()).await;
    let db = TestDb::sqlite();
    let state = supabase_state(&db, &url).await;
    fake.delay_ms.store(300, Ordering::SeqCst);
    let tokens: Vec<String> = (0..40)
        .map(|i| {
            let token = foreign(json!({"sub": format!("u{i}"), "exp": now_plus(600)}));
            vouch(&fake, &token, &format!("user-{i}"));
            token
        })
        .collect();

    let answers = join_all(tokens.iter().map(|token| balance_status(&state, token))).await;
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "{answers:?}"
    );
    assert_eq!(fake.user_hits.load(Ordering::SeqCst), 40);
    let most = fake.max_in_flight.load(Ordering::SeqCst);
    assert!(
        (2..=MAX_LOOKUPS_IN_FLIGHT).contains(&most),
        "{most} in flight"
    );
}

/// Unknown `kid`s, at once and in a row, cause one JWKS download per refresh interval; a
/// failed download counts too, and leaves callers with 503 rather than a false 401.
#[tokio::test]
async fn jwks_downloads_are_single_flight_and_rate_limited() {
    for outage in [0, 500] {
        let (fake, url) = start_fake(fixture_keys()).await;
        fake.outage.store(outage, Ordering::SeqCst);
        let expected = if outage == 0 { 401 } else { 503 };
        let db = TestDb::sqlite();
        let state = supabase_state(&db, &url).await;
        let made_up = |i: usize| {
            let claims = json!({"sub": "u", "exp": now_plus(600)});
            signed(Algorithm::RS256, &format!("made-up-{i}"), claims)
        };

        let tokens: Vec<String> = (0..30).map(made_up).collect();
        let answers = join_all(tokens.iter().map(|token| balance_status(&state, token))).await;
        assert!(
            answers.iter().all(|(status, _)| *status == expected),
            "{answers:?}"
        );
        for i in 30..40 {
            assert_eq!(balance_status(&state, &made_up(i)).await.0, expected);
        }
        assert_eq!(fake.jwks_hits.load(Ordering::SeqCst), 1, "outage {outage}");
    }
}

/// `nbf` more than the 5 s leeway ahead is refused on the JWKS and `/auth/v1/user` paths,
/// the latter without asking Supabase; within the leeway the token is accepted.
#[tokio::test]
async fn not_yet_valid_tokens_are_refused() {
    let (fake, url) = start_fake(fixture_keys()).await;
    let db = TestDb::sqlite();
    let state = supabase_state(&db, &url).await;
    let claims = |nbf: i64| json!({"sub": "u", "exp": now_plus(600), "nbf": now_plus(nbf)});

    let early = signed(Algorithm::RS256, "rsa-1", claims(60));
    assert_eq!(balance_status(&state, &early).await.0, 401);
    let skewed = signed(Algorithm::RS256, "rsa-1", claims(2));
    assert_eq!(balance_status(&state, &skewed).await.0, 200);

    let early = foreign(claims(60));
    vouch(&fake, &early, "remote-user");
    let (status, body) = balance_status(&state, &early).await;
    assert_eq!(status, 401);
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("not yet valid"))
    );
    assert_eq!(fake.user_hits.load(Ordering::SeqCst), 0);
    let skewed = foreign(claims(2));
    vouch(&fake, &skewed, "remote-user");
    assert_eq!(balance_status(&state, &skewed).await.0, 200);
}

/// The built server process, asked 50 times at once for one junk token, costs Supabase one
/// look-up; with Supabase answering 429 it answers 503, again for one look-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_process_never_amplifies_supabase() {
    let (fake, url) = start_fake(fixture_keys()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let database = format!("sqlite://{}/db.sqlite", dir.path().display());
    let server = common::process::ServerProcess::start(
        dir.path(),
        &[
            ("SUPABASE_URL", url.as_str()),
            ("SUPABASE_SERVICE_ROLE_KEY", SERVICE_KEY),
            ("DATABASE_URL", &database),
        ],
    );
    let http = reqwest::Client::new();
    let balance_url = format!("http://{}{}", server.addr, paths::BALANCE);
    let ask = |token: String| {
        let request = http.get(&balance_url).bearer_auth(token);
        async move { request.send().await.expect("answers").status().as_u16() }
    };

    let junk = foreign(json!({"sub": "nobody", "exp": now_plus(600)}));
    let statuses = join_all((0..50).map(|_| ask(junk.clone()))).await;
    assert!(statuses.iter().all(|&status| status == 401), "{statuses:?}");
    assert_eq!(fake.user_hits.load(Ordering::SeqCst), 1);

    fake.outage.store(429, Ordering::SeqCst);
    let other = foreign(json!({"sub": "somebody", "exp": now_plus(600)}));
    let statuses = join_all((0..50).map(|_| ask(other.clone()))).await;
    assert!(statuses.iter().all(|&status| status == 503), "{statuses:?}");
    assert_eq!(fake.user_hits.load(Ordering::SeqCst), 2);
}
