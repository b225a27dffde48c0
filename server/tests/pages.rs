//! Server-rendered pages through the real router: the page context (the signed-in user,
//! dev mode) is decided by route, so any client gets the page a browser gets.

mod common;

use app::wire::paths;
use axum::{body::Body, http::Request};
use common::{TestDb, config, post, send, state};
use serde_json::json;
use server::AppState;

/// A dev-mode instance and the session cookie (`name=value`) of `user` signed in on it.
async fn signed_in(user: &str) -> (TestDb, AppState, String) {
    let db = TestDb::sqlite();
    let state = state(config(
        &db,
        &[("LIVECREDITS_DEV_LOGIN", "1"), ("JWT_SECRET", "")],
    ))
    .await;
    let body = json!({ "user_id": user }).to_string();
    let login = send(&state, post(paths::DEV_LOGIN, None, body)).await;
    assert_eq!(login.status, 200);
    let cookie = login.headers["set-cookie"].to_str().expect("ASCII");
    let session = cookie.split(';').next().expect("name=value").to_owned();
    (db, state, session)
}

/// `path` as HTML, requested with `accept` (none when `None`) and `cookie`.
async fn page(state: &AppState, path: &str, accept: Option<&str>, cookie: Option<&str>) -> String {
    let mut request = Request::get(path);
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    let answer = send(state, request.body(Body::empty()).expect("request")).await;
    assert_eq!(answer.status, 200, "{path}");
    String::from_utf8(answer.body).expect("UTF-8 page")
}

/// A page requested as curl does (`Accept: */*`), or with no `Accept` at all, is rendered
/// for the session's user with dev mode on, as for a browser; without the cookie it is
/// rendered signed out.
#[tokio::test]
async fn pages_render_the_session_whatever_the_accept_header() {
    let (_db, state, session) = signed_in("pia").await;
    for accept in [
        Some("text/html"),
        Some("*/*"),
        Some("application/json"),
        None,
    ] {
        let home = page(&state, "/", accept, Some(&session)).await;
        assert!(home.contains("Signed in as "), "{accept:?}: {home}");
        assert!(home.contains("<strong>pia</strong>"), "{accept:?}: {home}");
        assert!(home.contains(r#""dev_login":true"#), "{accept:?}: {home}");
        assert!(home.contains(r#""user_id":"pia""#), "{accept:?}: {home}");

        let debug = page(&state, "/debug", accept, Some(&session)).await;
        assert!(debug.contains(r#""user_id":"pia""#), "{accept:?}: {debug}");
    }

    let anonymous = page(&state, "/", Some("*/*"), None).await;
    assert!(!anonymous.contains("Signed in as "), "{anonymous}");
    assert!(anonymous.contains(r#""dev_login":true"#), "{anonymous}");
}
