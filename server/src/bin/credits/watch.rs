//! Watching one user's balance over each transport, and applying a change, as the seed's
//! test tools did: every update is printed with its version and the delay since the change.

use std::{io::Write, time::Duration};

use app::wire::{
    ApiError, BalanceEvent, ChangeRequest, PollResponse, WsClientMsg, WsServerMsg,
    close::{self, Advice},
    paths,
};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message, protocol::CloseFrame};

use super::Failure;

/// Where results go: text lines, or one JSON object per line.
#[derive(Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Prints `text`, or `value` as one line of JSON. Once stdout is closed (`credits ws … |
    /// head`) nobody reads on, so the program ends quietly, as shell tools do.
    pub fn line(&self, text: &str, value: &Value) {
        let written = if self.json {
            writeln!(std::io::stdout(), "{value}")
        } else {
            writeln!(std::io::stdout(), "{text}")
        };
        if written.is_err() {
            std::process::exit(0);
        }
    }

    fn update(&self, transport: &str, event: &BalanceEvent) {
        let delay_ms = event.change.as_ref().map(|change| {
            (chrono::Utc::now() - change.created_at)
                .num_microseconds()
                .unwrap_or(0) as f64
                / 1000.0
        });
        let change = event.change.as_ref().map_or_else(
            || "snapshot".to_owned(),
            |c| format!("{:+} {}", c.amount, c.kind),
        );
        let delay = delay_ms.map_or_else(String::new, |ms| format!(" delay={ms:.1}ms"));
        self.line(
            &format!(
                "[{transport}] v{} balance={} ({change}){delay}",
                event.version, event.balance
            ),
            &json!({
                "transport": transport, "user_id": event.user_id, "version": event.version,
                "balance": event.balance, "change": event.change, "delay_ms": delay_ms,
            }),
        );
    }
}

/// Sends `request`; a transport error or a refusal becomes a one-line failure.
pub async fn send(
    url: &str,
    request: reqwest::RequestBuilder,
) -> Result<reqwest::Response, Failure> {
    let response = request
        .send()
        .await
        .map_err(|err| Failure::unreachable(url, err))?;
    if response.status().is_success() {
        Ok(response)
    } else {
        Err(refusal(url, response).await)
    }
}

/// A refused HTTP answer as a one-line failure.
async fn refusal(url: &str, response: reqwest::Response) -> Failure {
    let status = response.status();
    let message = response
        .json::<ApiError>()
        .await
        .map_or_else(|_| status.to_string(), |e| e.message);
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        Failure::auth(format!("authentication failed: {message}"))
    } else {
        Failure::other(format!("{url} answered {status}: {message}"))
    }
}

fn ws_url(url: &str, token: &str) -> String {
    let base = url.replacen("http", "ws", 1);
    format!("{base}{}?token={token}", paths::WS)
}

/// Prints every update over WebSocket. With `refresh`, each `auth_expiring` warning is
/// answered in place with a fresh token from it, so the connection outlives any one token.
pub async fn websocket(
    url: &str,
    token: &str,
    refresh: Option<&dyn Fn() -> Result<String, Failure>>,
    out: Output,
) -> Result<(), Failure> {
    let (socket, _) = match tokio_tungstenite::connect_async(ws_url(url, token)).await {
        Ok(connected) => connected,
        Err(tungstenite::Error::Http(response)) if response.status() == 401 => {
            return Err(Failure::auth(
                "authentication failed: the server refused the token",
            ));
        }
        Err(err) => return Err(Failure::unreachable(url, err)),
    };
    let lost = |err: tungstenite::Error| Failure::other(format!("connection lost: {err}"));
    let (mut sink, mut frames) = socket.split();
    while let Some(frame) = frames.next().await {
        let text = match frame.map_err(lost)? {
            Message::Text(text) => text,
            Message::Close(frame) => return Err(closed(frame.as_ref())),
            _ => continue,
        };
        match serde_json::from_str(&text) {
            Ok(WsServerMsg::Balance(event)) => out.update("websocket", &event),
            Ok(WsServerMsg::AuthExpiring { .. }) => {
                if let Some(refresh) = refresh {
                    let auth = WsClientMsg::Auth { token: refresh()? };
                    let frame = serde_json::to_string(&auth)
                        .map_err(|err| Failure::other(format!("cannot encode: {err}")))?;
                    sink.send(Message::text(frame)).await.map_err(lost)?;
                }
            }
            Ok(WsServerMsg::AuthOk { expires_at, .. }) => out.line(
                &format!("[websocket] token refreshed, valid until {expires_at}"),
                &json!({ "transport": "websocket", "refreshed_until": expires_at }),
            ),
            _ => {}
        }
    }
    Err(Failure::other("connection lost"))
}

/// The failure a close frame ends `credits ws` with, as [`close::advice`] reads its code:
/// one line, and the exit code of refused credentials when only a new token can help.
fn closed(frame: Option<&CloseFrame>) -> Failure {
    let Some(frame) = frame else {
        return Failure::other("the server closed the connection");
    };
    let code = u16::from(frame.code);
    let why = format!("{code} {}", frame.reason);
    match close::advice(code) {
        Advice::SignIn => Failure::auth("the token expired"),
        Advice::Stop => Failure::auth(format!(
            "the server refused this token for this connection ({why}); retrying cannot help"
        )),
        Advice::FixClient => Failure::other(format!(
            "the server refused a frame this client sent ({why}); not resending it"
        )),
        Advice::Reconnect | Advice::BackOff | Advice::SlowDown => {
            Failure::other(format!("the server closed the connection: {why}"))
        }
    }
}

/// Reads `text/event-stream` frames from a streamed body.
pub struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

/// One parsed server-sent event.
pub struct ServerEvent {
    pub event: String,
    pub data: String,
}

impl EventStream {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event with a name; `None` when the stream ends.
    pub async fn next(&mut self) -> Option<ServerEvent> {
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = ServerEvent {
                    event: String::new(),
                    data: String::new(),
                };
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        event.event = value.trim().to_owned();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        event.data.push_str(value.trim_start());
                    }
                }
                if !event.event.is_empty() {
                    return Some(event);
                }
            }
            let chunk = self.response.chunk().await.ok()??;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

/// Opens the SSE stream of the token's user.
pub async fn open_sse(
    client: &reqwest::Client,
    url: &str,
    token: &str,
) -> Result<EventStream, Failure> {
    let request = client
        .get(format!("{url}{}", paths::SSE))
        .bearer_auth(token);
    Ok(EventStream::new(send(url, request).await?))
}

pub async fn sse(url: &str, token: &str, out: Output) -> Result<(), Failure> {
    let mut stream = open_sse(&reqwest::Client::new(), url, token).await?;
    while let Some(event) = stream.next().await {
        match event.event.as_str() {
            "balance" => {
                if let Ok(balance) = serde_json::from_str::<BalanceEvent>(&event.data) {
                    out.update("sse", &balance);
                }
            }
            close::SSE_AUTH_EXPIRED => return Err(Failure::auth("the token expired")),
            _ => {}
        }
    }
    Err(Failure::other("the server ended the stream"))
}

pub async fn poll(url: &str, token: &str, wait: u32, out: Output) -> Result<(), Failure> {
    let client = reqwest::Client::new();
    let mut version: Option<i64> = None;
    loop {
        let query = match version {
            Some(version) if wait > 0 => format!("?version={version}&wait={wait}"),
            _ => String::new(),
        };
        let request = client
            .get(format!("{url}{}{query}", paths::POLL))
            .bearer_auth(token);
        let answer: PollResponse = send(url, request)
            .await?
            .json()
            .await
            .map_err(|err| Failure::other(format!("unexpected answer: {err}")))?;
        if version != Some(answer.snapshot.version) {
            version = Some(answer.snapshot.version);
            out.update("poll", &BalanceEvent::snapshot(answer.snapshot));
        }
        if wait == 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(answer.poll_interval_ms))).await;
        }
    }
}

pub async fn simulate(
    url: &str,
    service_token: &str,
    request: &ChangeRequest,
    out: Output,
) -> Result<(), Failure> {
    let post = reqwest::Client::new()
        .post(format!("{url}{}", paths::CHANGES))
        .bearer_auth(service_token)
        .json(request);
    let response = send(url, post).await?;
    let replayed = response.headers().contains_key("idempotent-replayed");
    let event: BalanceEvent = response
        .json()
        .await
        .map_err(|err| Failure::other(format!("unexpected answer: {err}")))?;
    let note = if replayed {
        " (replayed: nothing applied)"
    } else {
        ""
    };
    out.line(
        &format!(
            "{} is now at {} (v{}){note}",
            event.user_id, event.balance, event.version
        ),
        &json!({ "event": event, "replayed": replayed }),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    use super::*;

    /// Each close code ends `credits ws` as its advice says: an expired or refused token
    /// exits as refused credentials, anything else as a failure, each with one line.
    #[test]
    fn close_codes_follow_their_advice() {
        for (code, exit, words) in [
            (close::TOKEN_EXPIRED, 3, "the token expired"),
            (close::FORBIDDEN_CREDENTIAL, 3, "retrying cannot help"),
            (close::POLICY, 1, "not resending it"),
            (close::TOO_BIG, 1, "not resending it"),
            (close::RESTARTING, 1, "closed the connection: 1012"),
            (close::TRY_AGAIN_LATER, 1, "closed the connection: 1013"),
            (
                close::TOO_MANY_CONNECTIONS,
                1,
                "closed the connection: 4029",
            ),
            (4999, 1, "closed the connection: 4999"),
        ] {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: "why".into(),
            };
            let failure = closed(Some(&frame));
            assert_eq!(failure.code, exit, "{code}");
            assert!(
                failure.message.contains(words),
                "{code}: {}",
                failure.message
            );
            assert!(!failure.message.contains('\n'), "{code}");
        }
    }
}
