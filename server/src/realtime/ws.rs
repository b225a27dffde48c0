//! `GET /ws`: the snapshot, then one JSON text frame per change; app-level ping/pong,
//! protocol pings with a dead-peer timeout, in-band token refresh (`auth` → `auth_ok`, with an
//! `auth_expiring` warning first), and the close codes of `app::wire::close`.

use std::time::Duration;

use app::wire::{
    AuthExpiringTag, AuthOkTag, BalanceEvent, ErrorCode, ErrorTag, PongTag, WsClientMsg,
    WsServerMsg, close, paths,
};
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
    auth::{Auth, AuthError, AuthUser, Identity, TokenSource},
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
/// How long before its credential expires a connection is sent `auth_expiring`, at most;
/// a shorter-lived credential is warned at half its lifetime.
const EXPIRING_LEAD: Duration = Duration::from_secs(60);

pub fn router() -> Router<AppState> {
    Router::new().route(paths::WS, get(upgrade))
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
    /// Verifies tokens sent in-band; one `Arc`.
    auth: Auth,
}

impl From<&AppState> for Live {
    fn from(state: &AppState) -> Self {
        Self {
            metrics: state.metrics.clone(),
            timing: state.realtime,
            auth: state.auth.clone(),
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
    /// When the current credential expires, ending the session unless it is refreshed.
    expires_at: chrono::DateTime<chrono::Utc>,
    /// How long before `expires_at` to send `auth_expiring`, in milliseconds; 0 once sent
    /// (or for a credential too short-lived to warn). Milliseconds in a `u32` rather than a
    /// second timestamp: every idle connection holds this.
    expiring_lead_ms: u32,
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
            expiring_lead_ms: expiring_lead_ms(expires_at),
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
        let mut next_ping = Instant::now() + self.live.timing.ping_interval;
        let mut last_heard = Instant::now();
        // One timer serves the ping schedule, the `auth_expiring` warning and the token's
        // expiry: every idle connection holds it, so it pays to have just one.
        let timer = sleep_until(self.deadline(next_ping));
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
                            // An `auth` frame may have moved the expiry.
                            timer.as_mut().reset(self.deadline(next_ping));
                        }
                        Some(Err(err)) if is_too_big(&err) => {
                            return End::Close(close::TOO_BIG, "frames are limited to 4 KiB");
                        }
                        Some(Err(_)) | None => return End::Silent,
                    }
                }
                () = &mut timer => {
                    // Decided on the wall clock, the one `exp` is on: `instant_of` a past
                    // time is a moving "now", never reached.
                    let now = Instant::now();
                    let wall = chrono::Utc::now();
                    if wall >= self.expires_at {
                        return End::Close(close::TOKEN_EXPIRED, "token expired");
                    }
                    if self.expiring_lead_ms > 0
                        && wall + Duration::from_millis(self.expiring_lead_ms.into()) >= self.expires_at
                    {
                        self.expiring_lead_ms = 0;
                        let warning = WsServerMsg::AuthExpiring {
                            tag: AuthExpiringTag::AuthExpiring,
                            expires_at: self.expires_at,
                        };
                        if !self.send(frame(&warning)).await {
                            return End::Silent;
                        }
                    }
                    if now >= next_ping {
                        if last_heard.elapsed() > self.live.timing.idle_timeout
                            || !self.send(Message::Ping(Default::default())).await
                        {
                            return End::Silent;
                        }
                        next_ping = now + self.live.timing.ping_interval;
                    }
                    timer.as_mut().reset(self.deadline(next_ping));
                }
            }
        }
    }

    /// When the single timer must next fire: the earliest of the next ping, the
    /// `auth_expiring` warning (until sent) and the credential's expiry.
    fn deadline(&self, next_ping: Instant) -> Instant {
        let expires = instant_of(self.expires_at);
        let soonest = next_ping.min(expires);
        self.expiring_at().map_or(soonest, |at| soonest.min(at))
    }

    /// When `auth_expiring` is due, unless it was already sent for this credential.
    fn expiring_at(&self) -> Option<Instant> {
        let lead = Duration::from_millis(self.expiring_lead_ms.into());
        (self.expiring_lead_ms > 0).then(|| {
            let expires = instant_of(self.expires_at);
            expires.checked_sub(lead).unwrap_or(expires)
        })
    }

    /// Handles one client frame; returns how the session ends, if it must.
    async fn answer(&mut self, message: Message) -> Option<End> {
        let reply = match message {
            Message::Text(text) => match from_json_object::<WsClientMsg>(text.as_bytes()) {
                Ok(WsClientMsg::Ping) => WsServerMsg::Pong { tag: PongTag::Pong },
                Ok(WsClientMsg::Auth { token }) => {
                    let (reply, end) = self.refresh(&token).await;
                    if !self.send(frame(&reply)).await {
                        return Some(End::Silent);
                    }
                    return end;
                }
                Err(_) => return self.bad_frame().await,
            },
            Message::Binary(_) => return self.bad_frame().await,
            // Protocol pings are answered by the library; pongs only prove the peer lives.
            Message::Ping(_) | Message::Pong(_) => return None,
            Message::Close(_) => return Some(End::Silent),
        };
        (!self.send(frame(&reply)).await).then_some(End::Silent)
    }

    /// Verifies an in-band token. The same user's token replaces the credential; another
    /// user's, or a service credential (not a user, so not this connection's owner either),
    /// is forbidden and ends the connection with 4003. An invalid token, or one that cannot
    /// be checked now, leaves the old credential in place until its own expiry; it is the
    /// client's token at fault, not its framing, so it does not count as a bad frame.
    async fn refresh(&mut self, token: &str) -> (WsServerMsg, Option<End>) {
        match self.live.auth.identify(token).await {
            Ok(Identity::User(user)) if user.user_id == self.subscription.user_id() => {
                self.expires_at = user.expires_at;
                self.expiring_lead_ms = expiring_lead_ms(user.expires_at);
                let ok = WsServerMsg::AuthOk {
                    tag: AuthOkTag::AuthOk,
                    expires_at: user.expires_at,
                };
                (ok, None)
            }
            Ok(Identity::User(_) | Identity::Service) => (
                error_message(
                    ErrorCode::Forbidden,
                    "the token is not for this connection's user",
                ),
                Some(End::Close(
                    close::FORBIDDEN_CREDENTIAL,
                    "token for another user",
                )),
            ),
            Err(AuthError::Unavailable | AuthError::Internal(_)) => (
                error_message(ErrorCode::Unavailable, "the token cannot be checked now"),
                None,
            ),
            Err(err) => (
                error_message(ErrorCode::Unauthorized, err.to_string()),
                None,
            ),
        }
    }

    /// Answers a malformed or unknown frame with an error frame, or closes with 1008 after
    /// too many.
    async fn bad_frame(&mut self) -> Option<End> {
        self.bad_frames += 1;
        if self.bad_frames > MAX_BAD_FRAMES {
            return Some(End::Close(close::POLICY, "repeated malformed frames"));
        }
        let reply = error_message(
            ErrorCode::BadJson,
            r#"expected {"type":"ping"} or {"type":"auth","token":…}"#,
        );
        (!self.send(frame(&reply)).await).then_some(End::Silent)
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

/// An error frame telling the client what it got wrong.
fn error_message(error: ErrorCode, message: impl Into<String>) -> WsServerMsg {
    WsServerMsg::Error {
        tag: ErrorTag::Error,
        error,
        message: message.into(),
    }
}

/// A server frame as a text message.
fn frame(message: &WsServerMsg) -> Message {
    let json = serde_json::to_string(message).expect("server frames always serialise");
    Message::Text(json.into())
}

/// How long before `expires_at` a credential received now is warned: a minute, or half its
/// remaining lifetime if that is shorter; 0 (no warning) if it has already expired.
fn expiring_lead_ms(expires_at: chrono::DateTime<chrono::Utc>) -> u32 {
    let lifetime = (expires_at - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    let lead = EXPIRING_LEAD.min(lifetime / 2).as_millis();
    u32::try_from(lead).expect("the lead is at most a minute")
}
