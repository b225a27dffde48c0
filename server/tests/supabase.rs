//! Supabase mode against a local server that plays Supabase Auth over real HTTP: JWKS with
//! real RSA and EC keys, key rotation, and `/auth/v1/user` with its cache.

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::get,
};
use common::{SERVICE_KEY, TestDb, change, config, get as get_req, now_plus, post, send, sign};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use server::AppState;

/// What the fake Supabase Auth serves and how often it was asked.
#[derive(Clone, Default)]
struct Fake {
    jwks: Arc<Mutex<Vec<Value>>>,
    users: Arc<Mutex<HashMap<String, String>>>,
    jwks_hits: Arc<AtomicUsize>,
    user_hits: Arc<AtomicUsize>,
    /// When set, Auth answers 503 as during an outage.
    down: Arc<AtomicBool>,
}

fn fixture_keys() -> Vec<Value> {
    let set: Value = serde_json::from_str(include_str!("fixtures/jwks.json")).expect("jwks");
    set["keys"].as_array().expect("keys").clone()
}

async fn jwks(State(fake): State<Fake>) -> Json<Value> {
    fake.jwks_hits.fetch_add(1, Ordering::SeqCst);
    Json(json!({ "keys": *fake.jwks.lock().expect("lock") }))
}

async fn user(State(fake): State<Fake>, headers: HeaderMap) -> (StatusCode, Json<Value>) {
    fake.user_hits.fetch_add(1, Ordering::SeqCst);
    if fake.down.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"msg": "down"})),
        );
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

async fn balance_status(state: &AppState, token: &str) -> (u16, Value) {
    let answer = send(state, get_req("/api/credits/balance", Some(token))).await;
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

/// A key published after the cache was filled is found by refreshing on its unknown `kid`,
/// and refreshes are rate-limited.
#[tokio::test]
async fn unknown_kid_refreshes_the_keys() {
    let keys = fixture_keys();
    let (fake, url) = start_fake(vec![keys[0].clone()]).await;
    let db = TestDb::sqlite();
    let state = supabase_state(&db, &url).await;
    let claims = json!({"sub": "u", "exp": now_plus(60)});

    assert_eq!(
        balance_status(&state, &signed(Algorithm::RS256, "rsa-1", claims.clone()))
            .await
            .0,
        200
    );
    fake.jwks.lock().expect("lock").push(keys[1].clone());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        balance_status(&state, &signed(Algorithm::ES256, "ec-1", claims.clone()))
            .await
            .0,
        200
    );
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
    let foreign = EncodingKey::from_secret(b"the-project-secret-we-do-not-have");
    let token = sign(
        json!({"sub": "ignored", "exp": now_plus(60)}),
        Algorithm::HS256,
        &foreign,
    );
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

    let refused = sign(
        json!({"sub": "x", "exp": now_plus(60)}),
        Algorithm::HS256,
        &foreign,
    );
    assert_eq!(balance_status(&state, &refused).await.0, 401);
    let expired = sign(
        json!({"sub": "x", "exp": now_plus(-60)}),
        Algorithm::HS256,
        &foreign,
    );
    assert_eq!(balance_status(&state, &expired).await.0, 401);

    // With Supabase Auth down, an unknown token is 503, not a false 401; cached ones still pass.
    fake.down.store(true, Ordering::SeqCst);
    let unknown = sign(
        json!({"sub": "y", "exp": now_plus(60)}),
        Algorithm::HS256,
        &foreign,
    );
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
        post(
            "/api/credits/changes",
            Some(SERVICE_KEY),
            change("u", 5, "grant"),
        ),
    )
    .await;
    assert_eq!(answer.status, 201);
}
