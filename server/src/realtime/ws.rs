//! `GET /ws`: the snapshot, then one JSON text frame per change; app-level ping/pong,
//! protocol pings with a dead-peer timeout, and the close codes of `app::wire::close`.

use std::time::Duration;

use app::wire::{BalanceEvent, ErrorCode, ErrorTag, PongTag, WsClientMsg, WsServerMsg, close};
use axum::{
    Router,
    extract::{
        State,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade},
    },
    http::HeaderMap,
    response::Response,
    routing::get,
};
use tokio::time::{Instant, sleep_until};

use super::{
    RealtimeConfig, Update,
    hub::{OpenError, Refused, Transport},
    instant_of, origin_allowed,
    subscription::Subscription,
};
use crate::{
    AppState,
    auth::{AuthUser, TokenSource},
    error::from_json_object,
    metrics::Metrics,
};

/// Largest client frame; bigger ones close the connection with 1009.
const MAX_CLIENT_FRAME: usize = 4 * 1024;
/// Read buffer allocated per connection. Client frames are tiny; tungstenite's 128 KiB
/// default would cost more than all the rest of an idle connection.
const READ_BUFFER: usize = 256;
/// Outgoing bytes queued for a slow reader before sends fail and the connection closes.
const MAX_WRITE_BUFFER: usize = 64 * 1024;
/// Malformed or unknown client frames tolerated, each answered with an error frame; the
/// next one closes with 1008.
const MAX_BAD_FRAMES: u32 = 3;
/// A send to a peer that does not read for this long ends the connection.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

pub fn router() -> Router<AppState> {
    Router::new().route("/ws", get(upgrade))
}

/// Authenticates at the handshake (a bad token is a 401 `ApiError`), then upgrades. Refusals
/// that a browser must be able to read (origin, limits) are sent as close codes instead.
async fn upgrade(
    State(state): State<AppState>,
    caller: AuthUser,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let upgrade = upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(MAX_CLIENT_FRAME)
        .max_frame_size(MAX_CLIENT_FRAME);
    match admit(&state, &caller, &headers).await {
        Ok((subscription, first)) => {
            // axum's upgrade task keeps the callback's captures for the connection's life, so
            // they travel in one box that the session empties.
            let admitted = Box::new(Admitted {
                live: Live::from(&state),
                expires_at: caller.user.expires_at,
                subscription,
                first,
            });
            let tasks = state.shutdown.tracker();
            upgrade.on_upgrade(move |socket| tasks.track_future(Session::run(socket, *admitted)))
        }
        Err((code, reason)) => upgrade.on_upgrade(move |socket| refuse(socket, code, reason)),
    }
}

/// Checks the origin, subscribes, and reads the snapshot — before upgrading, so the session
/// task never holds a database future and every idle connection stays small. A refusal is
/// the close code and reason to send.
async fn admit(
    state: &AppState,
    caller: &AuthUser,
    headers: &HeaderMap,
) -> Result<(Subscription, Utf8Bytes), (u16, String)> {
    if caller.source == TokenSource::Cookie
        && !origin_allowed(
            headers,
            &state.config.public_url,
            &state.config.allowed_origins,
        )
    {
        state.metrics.refused("forbidden_origin");
        return Err((close::FORBIDDEN_ORIGIN, "origin not allowed".into()));
    }
    let opened = state
        .hub
        .open(&state.store, &caller.user.user_id, Transport::WebSocket)
        .await;
    let (subscription, snapshot) = opened.map_err(|err| match err {
        OpenError::Refused(refused @ Refused::TooMany { .. }) => {
            (close::TOO_MANY_CONNECTIONS, refused.to_string())
        }
        OpenError::Refused(refused @ Refused::Closed) => (close::RESTARTING, refused.to_string()),
        OpenError::Store(err) => {
            tracing::warn!(%err, "no snapshot for a new WebSocket");
            (close::TRY_AGAIN_LATER, "ledger unavailable".to_owned())
        }
    })?;
    Ok((
        subscription,
        Update::new(BalanceEvent::snapshot(snapshot)).json,
    ))
}

async fn refuse(mut socket: WebSocket, code: u16, reason: String) {
    let _ = socket.send(close_message(code, reason.into())).await;
}

fn close_message(code: u16, reason: Utf8Bytes) -> Message {
    Message::Close(Some(CloseFrame { code, reason }))
}

/// What a session needs of the app state: kept small, since every idle connection holds it.
struct Live {
    metrics: Metrics,
    timing: RealtimeConfig,
}

impl From<&AppState> for Live {
    fn from(state: &AppState) -> Self {
        Self {
            metrics: state.metrics.clone(),
            timing: state.realtime,
        }
    }
}

/// What an admitted connection brings to its session.
struct Admitted {
    live: Live,
    /// When the token expires, ending the session.
    expires_at: chrono::DateTime<chrono::Utc>,
    subscription: Subscription,
    /// The snapshot frame.
    first: Utf8Bytes,
}

/// One open WebSocket.
struct Session {
    socket: WebSocket,
    live: Live,
    expires_at: chrono::DateTime<chrono::Utc>,
    subscription: Subscription,
    bad_frames: u32,
}

/// Why a session ends, and the close frame it sends, if any.
enum End {
    Close(u16, &'static str),
    Silent,
}

impl Session {
    /// Serves the connection until it ends. Not an `async fn`: those keep a second copy of
    /// their arguments in the future, which every idle connection would carry.
    fn run(socket: WebSocket, admitted: Admitted) -> impl Future<Output = ()> {
        let Admitted {
            live,
            expires_at,
            subscription,
            first,
        } = admitted;
        let mut session = Self {
            socket,
            live,
            expires_at,
            subscription,
            bad_frames: 0,
        };
        async move {
            let end = session.serve(first).await;
            if let End::Close(code, reason) = end {
                let _ = session
                    .socket
                    .send(close_message(code, reason.into()))
                    .await;
            }
        }
    }

    async fn serve(&mut self, first: Utf8Bytes) -> End {
        if !self.send(Message::Text(first)).await {
            return End::Silent;
        }
        let expires = instant_of(self.expires_at);
        let mut next_ping = Instant::now() + self.live.timing.ping_interval;
        let mut last_heard = Instant::now();
        // One timer serves both the ping schedule and the token's expiry: every idle
        // connection holds it, so it pays to have just one.
        let timer = sleep_until(next_ping.min(expires));
        tokio::pin!(timer);
        loop {
            tokio::select! {
                update = self.subscription.next() => {
                    // The hub closes every subscription when the server shuts down.
                    let Some(update) = update else { return End::Close(close::RESTARTING, "server restarting") };
                    if !self.send(Message::Text(update.json.clone())).await {
                        return End::Silent;
                    }
                    self.live.metrics.delivered(Transport::WebSocket, update.event.change.as_ref().map(|c| c.created_at));
                }
                frame = self.socket.recv() => {
                    last_heard = Instant::now();
                    match frame {
                        Some(Ok(message)) => {
                            // Boxed: client frames are rare, and inline this future would
                            // enlarge every idle session.
                            if let Some(end) = Box::pin(self.answer(message)).await {
                                return end;
                            }
                        }
                        Some(Err(err)) if is_too_big(&err) => {
                            return End::Close(close::TOO_BIG, "frames are limited to 4 KiB");
                        }
                        Some(Err(_)) | None => return End::Silent,
                    }
                }
                () = &mut timer => {
                    let now = Instant::now();
                    if now >= expires {
                        return End::Close(close::TOKEN_EXPIRED, "token expired");
                    }
                    if last_heard.elapsed() > self.live.timing.idle_timeout
                        || !self.send(Message::Ping(Default::default())).await
                    {
                        return End::Silent;
                    }
                    next_ping = now + self.live.timing.ping_interval;
                    timer.as_mut().reset(next_ping.min(expires));
                }
            }
        }
    }

    /// Handles one client frame; returns how the session ends, if it must.
    async fn answer(&mut self, message: Message) -> Option<End> {
        let reply = match message {
            Message::Text(text) if from_json_object::<WsClientMsg>(text.as_bytes()).is_ok() => {
                WsServerMsg::Pong { tag: PongTag::Pong }
            }
            Message::Text(_) | Message::Binary(_) => {
                self.bad_frames += 1;
                if self.bad_frames > MAX_BAD_FRAMES {
                    return Some(End::Close(close::POLICY, "repeated malformed frames"));
                }
                WsServerMsg::Error {
                    tag: ErrorTag::Error,
                    error: ErrorCode::BadJson,
                    message: r#"expected {"type":"ping"}"#.into(),
                }
            }
            // Protocol pings are answered by the library; pongs only prove the peer lives.
            Message::Ping(_) | Message::Pong(_) => return None,
            Message::Close(_) => return Some(End::Silent),
        };
        let json = serde_json::to_string(&reply).expect("server frames always serialise");
        (!self.send(Message::Text(json.into())).await).then_some(End::Silent)
    }

    async fn send(&mut self, message: Message) -> bool {
        matches!(
            tokio::time::timeout(SEND_TIMEOUT, self.socket.send(message)).await,
            Ok(Ok(()))
        )
    }
}

fn is_too_big(err: &axum::Error) -> bool {
    use std::error::Error as _;
    let mut source = err.source();
    while let Some(cause) = source {
        if let Some(tungstenite) = cause.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
            return matches!(
                tungstenite,
                tokio_tungstenite::tungstenite::Error::Capacity(_)
            );
        }
        source = cause.source();
    }
    false
}
