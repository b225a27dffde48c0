//! A real server on an ephemeral port and real clients for it: WebSocket (tokio-tungstenite),
//! SSE (a line parser over a streamed reqwest body) and plain HTTP.

use std::{net::SocketAddr, time::Duration};

use app::wire::paths;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use server::{AppState, Config};
use tokio::{net::TcpStream, sync::oneshot, task::JoinHandle};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest, http::HeaderValue},
};

use super::SERVICE_KEY;

/// How long a test waits for any one frame or event before failing.
pub const PATIENCE: Duration = Duration::from_secs(5);

/// A server running in this process, stopped by [`TestServer::stop`].
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: AppState,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestServer {
    /// Builds the state for `config` and serves it on a free local port.
    pub async fn start(config: Config) -> Self {
        let state = super::state(config).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(state.clone(), listener, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            state,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Applies a change through the service API and returns the answer's JSON.
    pub async fn change(&self, user: &str, amount: i64) -> Value {
        let response = self
            .http
            .post(self.url(paths::CHANGES))
            .bearer_auth(SERVICE_KEY)
            .json(&serde_json::json!({"user_id": user, "amount": amount, "type": "grant"}))
            .send()
            .await
            .expect("change request");
        assert_eq!(response.status(), 201, "change refused");
        response.json().await.expect("event JSON")
    }

    /// Starts a graceful stop, as SIGTERM does.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops gracefully and waits for `run` to return.
    pub async fn stop(mut self) {
        self.signal_stop();
        tokio::time::timeout(Duration::from_secs(12), self.task)
            .await
            .expect("stops in time")
            .expect("no panic");
    }
}

/// Polls `check` until it holds or `limit` passes; returns whether it held.
pub async fn eventually(limit: Duration, check: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens `/ws` with the token in the query string.
pub async fn ws_connect(server: &TestServer, token: &str) -> Ws {
    ws_connect_with(server, &format!("{}?token={token}", paths::WS), &[]).await
}

/// Opens `path` as a WebSocket with extra headers.
pub async fn ws_connect_with(server: &TestServer, path: &str, headers: &[(&str, &str)]) -> Ws {
    let mut request = format!("ws://{}{path}", server.addr)
        .into_client_request()
        .expect("request");
    for (name, value) in headers {
        request.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                .expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    tokio_tungstenite::connect_async(request)
        .await
        .expect("WebSocket handshake")
        .0
}

/// The next text frame as JSON, skipping protocol pings and pongs.
pub async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let frame = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a frame in time")
            .expect("connection open")
            .expect("valid frame");
        match frame {
            Message::Text(text) => return serde_json::from_str(&text).expect("JSON frame"),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads until the server closes; returns the close code, if one was sent.
pub async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code.into()),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return None,
        }
    }
}

/// Sends a text frame.
pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

/// One server-sent event.
#[derive(Debug, Default, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
    pub retry: Option<u64>,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("JSON data")
    }
}

/// An open event stream, read frame by frame.
pub struct SseStream {
    pub response: reqwest::Response,
    buffer: String,
    /// Comment lines (heartbeats) seen so far.
    pub comments: usize,
}

impl SseStream {
    /// Opens `/api/credits/sse` with a Bearer token and an optional `Last-Event-ID`.
    pub async fn open(server: &TestServer, token: &str, last_event_id: Option<i64>) -> Self {
        let mut request = server.http.get(server.url(paths::SSE)).bearer_auth(token);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request.send().await.expect("SSE request");
        assert_eq!(response.status(), 200);
        Self {
            response,
            buffer: String::new(),
            comments: 0,
        }
    }

    /// The next event (comments are counted, not returned); `None` when the stream ends.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent::default();
                let mut fields = 0;
                for line in block.lines().filter(|line| !line.is_empty()) {
                    if line.starts_with(':') {
                        self.comments += 1;
                        continue;
                    }
                    let (name, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    fields += 1;
                    match name {
                        "event" => event.event = value.to_owned(),
                        "id" => event.id = Some(value.to_owned()),
                        "data" => event.data.push_str(value),
                        "retry" => event.retry = value.parse().ok(),
                        _ => {}
                    }
                }
                if fields > 0 {
                    return Some(event);
                }
                continue;
            }
            let chunk = tokio::time::timeout(PATIENCE, self.response.chunk())
                .await
                .expect("SSE data in time")
                .expect("stream readable")?;
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }

    /// The next `balance` event's JSON, skipping retry-only frames.
    pub async fn next_balance(&mut self) -> Value {
        loop {
            let event = self.next_event().await.expect("stream open");
            if event.event == "balance" {
                return event.json();
            }
        }
    }
}
