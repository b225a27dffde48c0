//! The HTTP API through the real router: every status of SPEC §4, every token attack, the
//! token sources, idempotent replays, dev mode, and a database outage answered with 503.

mod common;

use app::wire::paths;
use axum::{
    body::Body,
    http::{Method, Request},
};
use common::{
    Answer, SECRET, SERVICE_KEY, TestDb, change, config, get, now_plus, post, send, service_jwt,
    sign, state, user_token,
};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;
use server::AppState;

async fn sqlite_state(overrides: &[(&str, &str)]) -> (TestDb, AppState) {
    let db = TestDb::sqlite();
    let state = state(config(&db, overrides)).await;
    (db, state)
}

async fn apply(state: &AppState, body: String) -> Answer {
    send(state, post(paths::CHANGES, Some(SERVICE_KEY), body)).await
}

/// The balance of a new user, then after a change, for that user only.
#[tokio::test]
async fn balance_follows_changes() {
    let (_db, state) = sqlite_state(&[]).await;
    let alice = user_token("alice");
    let answer = send(&state, get(paths::BALANCE, Some(&alice))).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.json(),
        json!({
            "user_id": "alice", "balance": 0, "held": 0, "available": 0, "version": 0,
            "updated_at": null
        })
    );

    let created = apply(&state, change("alice", 250, "purchase")).await;
    assert_eq!(created.status, 201);
    let event = created.json();
    assert_eq!(event["type"], "balance");
    assert_eq!(
        (event["balance"].as_i64(), event["version"].as_i64()),
        (Some(250), Some(1))
    );
    assert_eq!(event["change"]["type"], "purchase");

    let answer = send(&state, get(paths::BALANCE, Some(&alice))).await;
    assert_eq!(answer.json()["balance"], 250);
    let bob = send(&state, get(paths::BALANCE, Some(&user_token("bob")))).await;
    assert_eq!(bob.json()["balance"], 0);
}

/// Every way of presenting a bad or wrong token is refused with the right status.
#[tokio::test]
async fn token_attacks_are_refused() {
    let (_db, state) = sqlite_state(&[]).await;
    let secret = EncodingKey::from_secret(SECRET.as_bytes());
    let wrong = EncodingKey::from_secret(b"another-secret-entirely-0123456789");
    let rsa = EncodingKey::from_rsa_pem(include_bytes!("fixtures/rsa_private.pem")).expect("key");
    let claims = |exp: i64| json!({"sub": "alice", "exp": exp});
    let unsigned = format!(
        "{}.{}.",
        base64_url(br#"{"alg":"none","typ":"JWT"}"#),
        base64_url(claims(now_plus(3600)).to_string().as_bytes())
    );
    let cases: Vec<(&str, Option<String>, u16)> = vec![
        ("missing", None, 401),
        ("garbage", Some("not-a-jwt".into()), 401),
        (
            "expired",
            Some(sign(claims(now_plus(-30)), Algorithm::HS256, &secret)),
            401,
        ),
        (
            "wrong secret",
            Some(sign(claims(now_plus(3600)), Algorithm::HS256, &wrong)),
            401,
        ),
        ("alg none", Some(unsigned), 401),
        (
            "HS512, right secret",
            Some(sign(claims(now_plus(3600)), Algorithm::HS512, &secret)),
            401,
        ),
        (
            "RS256 without JWKS",
            Some(sign(claims(now_plus(3600)), Algorithm::RS256, &rsa)),
            401,
        ),
        (
            "no exp",
            Some(sign(json!({"sub": "alice"}), Algorithm::HS256, &secret)),
            401,
        ),
        (
            "no sub",
            Some(sign(
                json!({"exp": now_plus(3600)}),
                Algorithm::HS256,
                &secret,
            )),
            401,
        ),
        ("service JWT as user", Some(service_jwt()), 403),
        ("service key as user", Some(SERVICE_KEY.into()), 403),
    ];
    for (name, token, status) in cases {
        let answer = send(&state, get(paths::BALANCE, token.as_deref())).await;
        assert_eq!(answer.status, status, "{name}");
        let code = if status == 401 {
            "unauthorized"
        } else {
            "forbidden"
        };
        assert_eq!(answer.error_code(), code, "{name}");
    }

    // Within the 5 s leeway a just-expired token still passes; beyond it, it does not.
    let fresh = sign(claims(now_plus(-2)), Algorithm::HS256, &secret);
    assert_eq!(
        send(&state, get(paths::BALANCE, Some(&fresh))).await.status,
        200
    );

    // A user token on the service route is forbidden; no token is unauthorized.
    let body = change("alice", 1, "grant");
    let as_user = send(
        &state,
        post(paths::CHANGES, Some(&user_token("alice")), body.clone()),
    )
    .await;
    assert_eq!(
        (as_user.status, as_user.error_code().as_str()),
        (403, "forbidden")
    );
    let anonymous = send(&state, post(paths::CHANGES, None, body.clone())).await;
    assert_eq!(anonymous.status, 401);
    // Both service credentials are accepted.
    assert_eq!(
        send(&state, post(paths::CHANGES, Some(&service_jwt()), body))
            .await
            .status,
        201
    );
}

/// Hand-rolled base64url for the `alg: none` token, which no signing library will make.
fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, &b| acc << 8 | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// A configured audience is required; tokens for another audience are refused.
#[tokio::test]
async fn audience_is_checked_when_configured() {
    let (_db, state) = sqlite_state(&[("JWT_AUDIENCE", "authenticated")]).await;
    let secret = EncodingKey::from_secret(SECRET.as_bytes());
    let token = |aud: &str| {
        sign(
            json!({"sub": "alice", "exp": now_plus(60), "aud": aud}),
            Algorithm::HS256,
            &secret,
        )
    };
    let ok = send(&state, get(paths::BALANCE, Some(&token("authenticated")))).await;
    assert_eq!(ok.status, 200);
    let other = send(&state, get(paths::BALANCE, Some(&token("someone-else")))).await;
    assert_eq!(other.status, 401);
}

/// Browsers' token sources: the `token` query parameter and the session cookie.
#[tokio::test]
async fn token_from_query_and_cookie() {
    let (_db, state) = sqlite_state(&[]).await;
    let token = user_token("alice");
    let by_query = send(
        &state,
        get(&format!("{}?token={token}", paths::BALANCE), None),
    )
    .await;
    assert_eq!(by_query.json()["user_id"], "alice");
    let by_cookie = Request::get(paths::BALANCE)
        .header("cookie", format!("theme=dark; livecredits_session={token}"))
        .body(Body::empty())
        .expect("request");
    assert_eq!(send(&state, by_cookie).await.json()["user_id"], "alice");
}

/// Every refusal of a change has its status and code, and changes nothing.
#[tokio::test]
async fn change_refusals() {
    let (_db, state) = sqlite_state(&[]).await;
    assert_eq!(
        apply(&state, change("alice", 100, "grant")).await.status,
        201
    );
    let big = "x".repeat(4100);
    let huge = "y".repeat(17 * 1024);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "insufficient",
            change("alice", -101, "spend"),
            409,
            "insufficient_credits",
        ),
        (
            "beyond 2^53-1",
            change("alice", 9_007_199_254_740_992, "grant"),
            422,
            "out_of_range",
        ),
        (
            "balance overflow",
            change("alice", 9_007_199_254_740_991, "grant"),
            422,
            "out_of_range",
        ),
        (
            "beyond i64",
            r#"{"user_id":"alice","amount":99999999999999999999,"type":"grant"}"#.into(),
            422,
            "out_of_range",
        ),
        ("zero", change("alice", 0, "grant"), 422, "invalid_field"),
        (
            "bad type",
            change("alice", 1, "Grant!"),
            422,
            "invalid_field",
        ),
        (
            "float",
            r#"{"user_id":"alice","amount":1.5,"type":"grant"}"#.into(),
            422,
            "invalid_field",
        ),
        (
            "string amount",
            r#"{"user_id":"alice","amount":"1","type":"grant"}"#.into(),
            422,
            "invalid_field",
        ),
        (
            "metadata array",
            json!({"user_id":"alice","amount":1,"type":"grant","metadata":[1]}).to_string(),
            422,
            "invalid_field",
        ),
        (
            "metadata > 4 KiB",
            json!({"user_id":"alice","amount":1,"type":"grant","metadata":{"b":big}}).to_string(),
            422,
            "invalid_field",
        ),
        (
            "missing user",
            r#"{"amount":1,"type":"grant"}"#.into(),
            422,
            "invalid_field",
        ),
        ("empty user", change("", 1, "grant"), 422, "invalid_field"),
        (
            "unknown field",
            r#"{"user_id":"alice","amount":1,"type":"grant","balance":5}"#.into(),
            422,
            "invalid_field",
        ),
        (
            "long key",
            json!({"user_id":"alice","amount":1,"type":"grant","idempotency_key":"k".repeat(129)})
                .to_string(),
            422,
            "invalid_field",
        ),
        ("malformed JSON", "{\"user_id\": ".into(), 400, "bad_json"),
        (
            "body > 16 KiB",
            json!({"user_id":"alice","amount":1,"type":"grant","metadata":{"b":huge}}).to_string(),
            413,
            "payload_too_large",
        ),
    ];
    for (name, body, status, code) in cases {
        let answer = apply(&state, body).await;
        assert_eq!(
            (answer.status, answer.error_code().as_str()),
            (status, code),
            "{name}"
        );
        assert!(
            !answer.json()["message"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "{name}"
        );
    }
    let field = apply(&state, change("alice", 1, "Grant!")).await.json();
    assert!(
        field["message"]
            .as_str()
            .expect("message")
            .starts_with("type"),
        "{field}"
    );

    let balance = send(&state, get(paths::BALANCE, Some(&user_token("alice")))).await;
    assert_eq!(
        (
            balance.json()["balance"].as_i64(),
            balance.json()["version"].as_i64()
        ),
        (Some(100), Some(1))
    );

    let no_content_type = Request::post(paths::CHANGES)
        .header("authorization", format!("Bearer {SERVICE_KEY}"))
        .body(Body::from(change("alice", 1, "grant")))
        .expect("request");
    assert_eq!(send(&state, no_content_type).await.error_code(), "bad_json");
}

/// A repeated key answers 200 with the original event and `Idempotent-Replayed: true`; the
/// same key with another body is 409.
#[tokio::test]
async fn idempotent_replay_over_http() {
    let (_db, state) = sqlite_state(&[]).await;
    let body = json!({"user_id": "alice", "amount": 30, "type": "purchase",
                      "metadata": {"order": 7}, "idempotency_key": "order-7"});
    let first = apply(&state, body.to_string()).await;
    assert_eq!(first.status, 201);
    assert!(first.headers.get("idempotent-replayed").is_none());
    let again = apply(&state, body.to_string()).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.json(), first.json());

    let mut different = body.clone();
    different["metadata"] = json!({"order": 8});
    let conflict = apply(&state, different.to_string()).await;
    assert_eq!(
        (conflict.status, conflict.error_code().as_str()),
        (409, "idempotency_conflict")
    );
    let balance = send(&state, get(paths::BALANCE, Some(&user_token("alice")))).await;
    assert_eq!(balance.json()["balance"], 30);
}

/// The ledger listing pages newest first and validates its query.
#[tokio::test]
async fn transactions_listing() {
    let (_db, state) = sqlite_state(&[]).await;
    for amount in 1..=3 {
        apply(&state, change("alice", amount, "grant")).await;
    }
    let alice = user_token("alice");
    let page = send(
        &state,
        get(&format!("{}?limit=2", paths::TRANSACTIONS), Some(&alice)),
    )
    .await
    .json();
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(page["items"][0]["version"], 3);
    assert_eq!(page["next_before"], 2);
    let rest = send(
        &state,
        get(
            &format!("{}?limit=2&before=2", paths::TRANSACTIONS),
            Some(&alice),
        ),
    )
    .await
    .json();
    assert_eq!(rest["items"][0]["version"], 1);
    assert_eq!(rest["next_before"], json!(null));
    let default = send(&state, get(paths::TRANSACTIONS, Some(&alice)))
        .await
        .json();
    assert_eq!(default["items"].as_array().map(Vec::len), Some(3));

    for query in [
        "limit=0",
        "limit=101",
        "limit=abc",
        "before=-1",
        "before=1.5",
        "user_id=bob",
    ] {
        let answer = send(
            &state,
            get(&format!("{}?{query}", paths::TRANSACTIONS), Some(&alice)),
        )
        .await;
        assert_eq!(
            (answer.status, answer.error_code().as_str()),
            (422, "invalid_field"),
            "{query}"
        );
    }
}

/// Dev mode: sign-in sets an HttpOnly, SameSite=Lax session cookie that authenticates, and
/// the caller can change their own balance.
#[tokio::test]
async fn dev_sign_in_and_own_credits() {
    let (db, state) = sqlite_state(&[("LIVECREDITS_DEV_LOGIN", "1"), ("JWT_SECRET", "")]).await;
    let login = send(
        &state,
        post(
            paths::DEV_LOGIN,
            None,
            json!({"user_id": "dev-user"}).to_string(),
        ),
    )
    .await;
    assert_eq!(login.status, 200);
    let cookie = login.headers["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(cookie.starts_with("livecredits_session="), "{cookie}");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax") && cookie.contains("Path=/"),
        "{cookie}"
    );
    let body = login.json();
    assert_eq!(body["user_id"], "dev-user");
    let token = body["token"].as_str().expect("token").to_owned();

    let session = cookie.split(';').next().expect("name=value").to_owned();
    let spend = Request::post(paths::DEV_CREDITS)
        .header("cookie", &session)
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"amount": 40, "type": "grant"}).to_string(),
        ))
        .expect("request");
    let event = send(&state, spend).await;
    assert_eq!(event.status, 201);
    assert_eq!(event.json()["user_id"], "dev-user");
    let balance = send(&state, get(paths::BALANCE, Some(&token))).await;
    assert_eq!(balance.json()["balance"], 40);

    // The generated secret is kept, so a restarted instance accepts the same session.
    assert!(
        db.dir
            .path()
            .join("data")
            .join(server::auth::dev::SECRET_FILE)
            .exists()
    );
    let restarted = common::state(config(
        &db,
        &[("LIVECREDITS_DEV_LOGIN", "1"), ("JWT_SECRET", "")],
    ))
    .await;
    assert_eq!(
        send(&restarted, get(paths::BALANCE, Some(&token)))
            .await
            .status,
        200
    );

    let bad = send(
        &state,
        post(paths::DEV_LOGIN, None, json!({"user_id": ""}).to_string()),
    )
    .await;
    assert_eq!(bad.status, 422);
    let anonymous = send(
        &state,
        post(
            paths::DEV_CREDITS,
            None,
            json!({"amount": 1, "type": "grant"}).to_string(),
        ),
    )
    .await;
    assert_eq!(anonymous.status, 401);
}

/// Without dev mode the dev routes do not exist; unknown API paths are 404 `ApiError`s.
#[tokio::test]
async fn dev_routes_are_404_outside_dev_mode() {
    let (_db, state) = sqlite_state(&[]).await;
    for uri in [
        paths::DEV_LOGIN,
        paths::DEV_CREDITS,
        "/api/nothing-here",
        "/api/",
        "/api",
    ] {
        let answer = send(&state, post(uri, None, json!({"user_id": "x"}).to_string())).await;
        assert_eq!(
            (answer.status, answer.error_code().as_str()),
            (404, "not_found"),
            "{uri}"
        );
    }
}

/// With PostgreSQL unreachable, requests fail fast with 503 and the instance recovers by
/// itself once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_answers_503_then_recovers() {
    let (db, proxy, url) = common::postgres_behind_proxy().await;
    let mut config = config(&db, &[]);
    config.database_url = url;
    let state = state(config).await;
    assert_eq!(apply(&state, change("alice", 5, "grant")).await.status, 201);

    proxy.cut().await;
    let started = std::time::Instant::now();
    let down = apply(&state, change("alice", 5, "grant")).await;
    assert_eq!(
        (down.status, down.error_code().as_str()),
        (503, "unavailable")
    );
    let read = send(&state, get(paths::BALANCE, Some(&user_token("alice")))).await;
    assert_eq!(read.status, 503);
    assert!(started.elapsed() < std::time::Duration::from_secs(8));

    proxy.restore().await;
    let back = apply(&state, change("alice", 5, "grant")).await;
    assert_eq!(back.status, 201);
    assert_eq!(send(&state, get(paths::READYZ, None)).await.status, 200);
    assert_eq!(back.json()["balance"], 10);
}

/// A database that refuses connections (`ALLOW_CONNECTIONS false`, as an operator or a
/// failover does) is unavailable, not an internal error: 503, then 201 once it is back
/// (found by the soak, which saw 500s). Meanwhile requests are answered at once rather than
/// each trying to connect: 200 at once make a few connection attempts, not 200 (the soak saw
/// them queue for the pool for up to 2.5 s, and its clients pile up connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_refusing_connections_answers_503_at_once() {
    use sqlx::Connection;
    let (db, proxy, url) = common::postgres_behind_proxy().await;
    let mut config = config(&db, &[]);
    config.database_url = url;
    let state = state(config).await;
    assert_eq!(apply(&state, change("alice", 5, "grant")).await.status, 201);
    let mut admin = sqlx::PgConnection::connect(&common::postgres_admin_url())
        .await
        .expect("admin connection");
    let name = db.postgres_name();
    for statement in [
        format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"),
        format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&mut admin)
            .await
            .expect("cuts");
    }
    let down = apply(&state, change("alice", 5, "grant")).await;
    assert_eq!(
        (down.status, down.error_code().as_str()),
        (503, "unavailable")
    );

    let attempts_before = proxy.accepted();
    let token = user_token("alice");
    let reads = (0..200).map(|_| send(&state, get(paths::BALANCE, Some(&token))));
    let answers = futures::future::join_all(reads).await;
    assert!(answers.iter().all(|answer| answer.status == 503));
    let attempts = proxy.accepted() - attempts_before;
    assert!(
        attempts < 50,
        "{attempts} connection attempts for 200 reads of an unreachable database"
    );

    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS true"
    )))
    .execute(&mut admin)
    .await
    .expect("restores");
    let back = apply(&state, change("alice", 5, "grant")).await;
    assert_eq!(
        (back.status, back.json()["balance"].clone()),
        (201, json!(10))
    );
}

/// Listed origins get CORS answers, with credentials; others get none.
#[tokio::test]
async fn cors_for_listed_origins_only() {
    let (_db, state) = sqlite_state(&[("CORS_ORIGINS", "https://app.example")]).await;
    for (origin, allowed) in [
        ("https://app.example", true),
        ("https://evil.example", false),
    ] {
        let preflight = Request::options(paths::BALANCE)
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .body(Body::empty())
            .expect("request");
        let answer = send(&state, preflight).await;
        let allow = answer.headers.get("access-control-allow-origin");
        if allowed {
            assert_eq!(allow.map(|v| v.to_str().unwrap_or_default()), Some(origin));
            assert_eq!(answer.headers["access-control-allow-credentials"], "true");
        } else {
            assert!(allow.is_none(), "{origin}");
        }
    }
}

/// `nbf` more than the 5 s leeway ahead is refused like `exp`; within the leeway it passes.
#[tokio::test]
async fn tokens_not_yet_valid_are_refused() {
    let (_db, state) = sqlite_state(&[]).await;
    let secret = EncodingKey::from_secret(SECRET.as_bytes());
    let token = |nbf: i64| {
        sign(
            json!({"sub": "alice", "exp": now_plus(600), "nbf": now_plus(nbf)}),
            Algorithm::HS256,
            &secret,
        )
    };
    let early = send(&state, get(paths::BALANCE, Some(&token(60)))).await;
    assert_eq!(
        (early.status, early.error_code().as_str()),
        (401, "unauthorized")
    );
    let skewed = send(&state, get(paths::BALANCE, Some(&token(2)))).await;
    assert_eq!(skewed.status, 200);
}

/// The balance and version of `user`, read over the API.
async fn balance_of(state: &AppState, user: &str) -> (Option<i64>, Option<i64>) {
    let body = send(state, get(paths::BALANCE, Some(&user_token(user))))
        .await
        .json();
    (body["balance"].as_i64(), body["version"].as_i64())
}

/// Amounts too big even for i64 are `out_of_range` on both change endpoints, like any beyond
/// ±(2^53 − 1); a fraction or a string stays `invalid_field`; none changes anything.
#[tokio::test]
async fn amounts_beyond_i64_are_out_of_range() {
    let (_db, state) = sqlite_state(&[("LIVECREDITS_DEV_LOGIN", "1")]).await;
    let alice = user_token("alice");
    let huge = [
        "9223372036854775808",
        "18446744073709551616",
        "1234567890123456789012345678901",
        "-9223372036854775809",
        "-18446744073709551616",
        "-1234567890123456789012345678901",
    ];
    let cases = huge.iter().map(|amount| (amount, "out_of_range")).chain(
        [
            ("1.5", "invalid_field"),
            ("-0.5", "invalid_field"),
            ("\"1\"", "invalid_field"),
        ]
        .iter()
        .map(|(a, c)| (a, *c)),
    );
    for (amount, code) in cases {
        let service = format!(r#"{{"user_id":"alice","amount":{amount},"type":"grant"}}"#);
        let own = format!(r#"{{"amount":{amount},"type":"grant"}}"#);
        let answers = [
            ("changes", apply(&state, service).await),
            (
                "dev",
                send(&state, post(paths::DEV_CREDITS, Some(&alice), own)).await,
            ),
        ];
        for (route, answer) in answers {
            assert_eq!(
                (answer.status, answer.error_code().as_str()),
                (422, code),
                "{route} {amount}"
            );
            let message = answer.json()["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            assert!(message.starts_with("amount"), "{route} {amount}: {message}");
        }
    }
    assert_eq!(balance_of(&state, "alice").await, (Some(0), Some(0)));
}

/// Valid JSON that is not an object is `bad_json` on every JSON endpoint and applies nothing:
/// serde alone reads `["alice", 5, "grant"]` as a change and `[token]` as a sign-in.
#[tokio::test]
async fn non_object_bodies_are_bad_json() {
    let (_db, state) = sqlite_state(&[("LIVECREDITS_DEV_LOGIN", "1")]).await;
    let alice = user_token("alice");
    let cases = [
        (
            paths::CHANGES,
            Some(SERVICE_KEY),
            r#"["alice", 5, "grant"]"#.to_owned(),
        ),
        (
            paths::DEV_CREDITS,
            Some(alice.as_str()),
            r#"[5, "grant"]"#.to_owned(),
        ),
        (paths::DEV_LOGIN, None, r#"["alice"]"#.to_owned()),
        (paths::SESSION, None, json!([alice]).to_string()),
    ];
    for (uri, bearer, array) in &cases {
        for body in [array.as_str(), r#""alice""#, "5", "null", "true", " \n[]"] {
            let answer = send(&state, post(uri, *bearer, body.to_owned())).await;
            assert_eq!(
                (answer.status, answer.error_code().as_str()),
                (400, "bad_json"),
                "{uri} {body}"
            );
            assert!(answer.headers.get("set-cookie").is_none(), "{uri} {body}");
        }
    }
    assert_eq!(balance_of(&state, "alice").await, (Some(0), Some(0)));

    let padded = format!(" \r\n\t{}", change("alice", 5, "grant"));
    assert_eq!(apply(&state, padded).await.status, 201);
}

/// A wrong method on an API path is a 405 `ApiError` that keeps axum's `Allow` header.
#[tokio::test]
async fn wrong_method_is_405_api_error() {
    let (_db, state) = sqlite_state(&[]).await;
    let cases = [
        (Method::DELETE, paths::BALANCE, "GET"),
        (Method::PUT, paths::CHANGES, "POST"),
        (Method::GET, paths::CHANGES, "POST"),
        (Method::POST, paths::TRANSACTIONS, "GET"),
        (Method::POST, paths::SSE, "GET"),
        (Method::DELETE, paths::POLL, "GET"),
        (Method::PATCH, paths::SESSION, "DELETE"),
    ];
    for (method, uri, allowed) in cases {
        let request = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header("authorization", format!("Bearer {SERVICE_KEY}"))
            .body(Body::empty())
            .expect("request");
        let answer = send(&state, request).await;
        assert_eq!(
            (answer.status, answer.error_code().as_str()),
            (405, "method_not_allowed"),
            "{method} {uri}"
        );
        let allow = answer.headers.get("allow").and_then(|v| v.to_str().ok());
        assert!(
            allow.is_some_and(|allow| allow.split(',').any(|m| m.trim() == allowed)),
            "{method} {uri}: Allow {allow:?}"
        );
    }
}
