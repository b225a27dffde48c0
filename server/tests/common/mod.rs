//! Shared test set-up: a fresh SQLite file or PostgreSQL database per test, configurations
//! built in code, tokens, and one-shot requests through the real router.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod live;
pub mod process;

use std::collections::HashMap;

use app::wire::paths;
use axum::{
    body::Body,
    http::{Request, Response},
};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use server::{AppState, Config, config::DatabaseUrl, routes};
use tower::ServiceExt;

/// The HS256 secret of test configurations.
pub const SECRET: &str = "test-secret-0123456789-abcdefghijklmnop";
/// The opaque service key of test configurations.
pub const SERVICE_KEY: &str = "sb_secret_test_service_key_0123456789";

/// Runs one async case against a fresh SQLite file and a fresh PostgreSQL database.
#[allow(unused_macros)] // not every test binary runs cases on both databases
macro_rules! on_both_databases {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::TestDb::sqlite()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::TestDb::postgres().await).await;
                }
            )*
        }
    };
}
#[allow(unused_imports)] // not every test binary runs cases on both databases
pub(crate) use on_both_databases;

/// The PostgreSQL server tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("LIVECREDITS_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of one test's own, removed when dropped.
pub struct TestDb {
    pub url: DatabaseUrl,
    pub dir: tempfile::TempDir,
    postgres_name: Option<String>,
}

impl TestDb {
    /// A new SQLite file in a temporary folder.
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}/ledger.db", dir.path().display());
        Self {
            url: DatabaseUrl::Sqlite(url),
            dir,
            postgres_name: None,
        }
    }

    /// A new, empty PostgreSQL database on the local server.
    pub async fn postgres() -> Self {
        use sqlx::Connection;
        let name = format!("livecredits_test_{}", uuid::Uuid::now_v7().simple());
        let admin = postgres_admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("PostgreSQL must be running (make test starts it)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let base = admin.rsplit_once('/').expect("URL with a database").0;
        Self {
            url: DatabaseUrl::Postgres(format!("{base}/{name}")),
            dir: tempfile::tempdir().expect("temp dir"),
            postgres_name: Some(name),
        }
    }

    /// The PostgreSQL database name, for tests that cut its connections.
    pub fn postgres_name(&self) -> &str {
        self.postgres_name
            .as_deref()
            .expect("a PostgreSQL test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.postgres_name.take() else {
            return;
        };
        // Drop may run inside a runtime, so the clean-up gets a thread and runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&postgres_admin_url()).await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await
                .map(drop)
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop a test database");
        }
    }
}

/// A configuration for `db` with the test secret and service key and the given overrides.
pub fn config(db: &TestDb, overrides: &[(&str, &str)]) -> Config {
    let url = match &db.url {
        DatabaseUrl::Sqlite(url) | DatabaseUrl::Postgres(url) => url.clone(),
    };
    let data_dir = db.dir.path().join("data").display().to_string();
    let mut vars: HashMap<String, String> = [
        ("DATABASE_URL", url.as_str()),
        ("JWT_SECRET", SECRET),
        ("SUPABASE_SERVICE_ROLE_KEY", SERVICE_KEY),
        ("LIVECREDITS_DATA_DIR", data_dir.as_str()),
        ("LEPTOS_SITE_ADDR", "127.0.0.1:0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (k, v) in overrides {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    Config::from_lookup(|name| vars.get(name).cloned()).expect("valid test configuration")
}

/// The state of an instance for `config`.
pub async fn state(config: Config) -> AppState {
    AppState::new(config).await.expect("state builds")
}

/// Seconds since the epoch, `offset` from now.
pub fn now_plus(offset: i64) -> i64 {
    chrono::Utc::now().timestamp() + offset
}

/// Signs `claims` with `alg` and `key`.
pub fn sign(claims: Value, alg: Algorithm, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).expect("signs")
}

/// A valid HS256 user token for `user` under the test secret.
pub fn user_token(user: &str) -> String {
    sign(
        json!({ "sub": user, "exp": now_plus(3600), "role": "authenticated" }),
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
}

/// `user`'s balance snapshot as the server at `addr` answers it over HTTP.
pub async fn balance_over_http(http: &reqwest::Client, addr: &str, user: &str) -> Value {
    http.get(format!("http://{addr}{}", paths::BALANCE))
        .bearer_auth(user_token(user))
        .send()
        .await
        .expect("balance")
        .json()
        .await
        .expect("JSON")
}

/// A legacy Supabase-style service-role JWT (no `sub`) under the test secret.
pub fn service_jwt() -> String {
    sign(
        json!({ "role": "service_role", "exp": now_plus(3600) }),
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
}

/// A response with its body read to the end.
pub struct Answer {
    pub status: u16,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("JSON body, got {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The `error` code of an `ApiError` body.
    pub fn error_code(&self) -> String {
        self.json()["error"].as_str().expect("ApiError").to_owned()
    }
}

/// Sends one request through the full router of `state`.
pub async fn send(state: &AppState, request: Request<Body>) -> Answer {
    let response: Response<Body> = routes::router(state.clone())
        .oneshot(request)
        .await
        .expect("infallible");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

/// A GET with an optional Bearer token.
pub fn get(uri: &str, bearer: Option<&str>) -> Request<Body> {
    let mut builder = Request::get(uri);
    if let Some(token) = bearer {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    builder.body(Body::empty()).expect("request")
}

/// A POST of `body` as JSON with an optional Bearer token.
pub fn post(uri: &str, bearer: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut builder = Request::post(uri).header("content-type", "application/json");
    if let Some(token) = bearer {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    builder.body(body.into()).expect("request")
}

/// A change request body.
pub fn change(user: &str, amount: i64, kind: &str) -> String {
    json!({ "user_id": user, "amount": amount, "type": kind }).to_string()
}

/// A TCP proxy in front of a real server that a test can cut and restore, to play an
/// unreachable database without touching the server itself.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    target: String,
    accept: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Proxy {
    /// Starts forwarding a fresh local port to `target` (host:port).
    pub async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let proxy = Self {
            addr: listener.local_addr().expect("addr"),
            target: target.to_owned(),
            accept: std::sync::Mutex::new(None),
            accepted: std::sync::Arc::default(),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let (target, accepted) = (self.target.clone(), self.accepted.clone());
        let task = tokio::spawn(async move {
            // Owning the connections here means aborting this task closes every one of them.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let target = target.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        *self.accept.lock().expect("lock") = Some(task);
    }

    /// Connections accepted so far: the attempts the client made to reach the target.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Closes every proxied connection and refuses new ones.
    pub async fn cut(&self) {
        let task = self.accept.lock().expect("lock").take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Accepts connections again on the same port.
    pub async fn restore(&self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("rebind the proxy port");
        self.serve(listener);
    }
}

/// A PostgreSQL test database reached through a [`Proxy`] that the test controls.
pub async fn postgres_behind_proxy() -> (TestDb, Proxy, DatabaseUrl) {
    let db = TestDb::postgres().await;
    let DatabaseUrl::Postgres(url) = &db.url else {
        unreachable!("a PostgreSQL database")
    };
    let (scheme_user, rest) = url.split_once('@').expect("user@host in the URL");
    let (host, path) = rest.split_once('/').expect("a database path");
    let proxy = Proxy::start(host).await;
    let proxied = DatabaseUrl::Postgres(format!("{scheme_user}@{}/{path}", proxy.addr));
    (db, proxy, proxied)
}
