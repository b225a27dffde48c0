//! The browser half of the live balance (hydrate only): runs the connection machine with
//! real WebSockets, EventSources, fetches and timers, feeds what happens back into it, and
//! writes the results into the [`CreditContext`] signals. With the user's other tabs it
//! runs the [`tabs`](super::tabs) machine: only the leading tab connects.

use std::{cell::RefCell, rc::Rc, time::Duration};

use futures::{
    FutureExt, SinkExt, StreamExt,
    channel::mpsc::{self, UnboundedReceiver, UnboundedSender},
    future::{AbortHandle, Abortable},
};
use gloo_net::{
    eventsource::futures::EventSource,
    http::{Request, Response},
    websocket::{Message, WebSocketError, futures::WebSocket},
};
use gloo_timers::future::sleep;
use leptos::{prelude::*, task::spawn_local};

use super::{
    Control, CreditContext, HoldAction, PAGE_CONTEXT_ID, TokenSource,
    group::Group,
    machine::{Command, Ending, Input, Machine, Mode, Status, Transport, Tuning},
    tabs::{Duty, Role, Tabs},
};
use crate::wire::{
    ApiError, BalanceEvent, CaptureRequest, DevCreditRequest, DevHoldRequest, DevLoginRequest,
    DevLoginResponse, HoldList, PageContext, PollResponse, SessionInfo, SessionRequest,
    TransactionPage, WsClientMsg, WsServerMsg, close, paths,
};

/// How long a long-poll is held by the server.
const LONG_POLL_WAIT_SECS: u32 = 25;
/// Ledger rows per page on the debug page.
const LEDGER_PAGE: u32 = 10;
/// Polling slows down this much while the tab is hidden.
const HIDDEN_SLOWDOWN: u32 = 3;
/// How often the leading tab counts the tabs that share its connection.
const TAB_COUNT_INTERVAL: Duration = Duration::from_secs(1);
/// What every tab shows when an expired session cannot be renewed.
const EXPIRED: &str = "Your session expired. Sign in again.";

/// The page context the server embedded in the page.
pub fn embedded_page_context() -> Option<PageContext> {
    let element = document().get_element_by_id(PAGE_CONTEXT_ID)?;
    serde_json::from_str(&element.text_content()?).ok()
}

/// Starts the driver for `context` and, if someone is signed in, joins their tab group.
pub fn start(context: CreditContext, token_source: Option<TokenSource>) {
    let (controls, inbox) = mpsc::unbounded();
    context.controls.set_value(Some(controls.clone()));
    let forward = |controls: UnboundedSender<Control>, input: Input| {
        move |_| {
            let _ = controls.unbounded_send(Control::Machine(input));
        }
    };
    // Listeners live as long as the page: the provider sits at the root.
    std::mem::forget(window_event_listener_untyped(
        "online",
        forward(controls.clone(), Input::Online),
    ));
    std::mem::forget(window_event_listener_untyped(
        "offline",
        forward(controls.clone(), Input::NetworkLost),
    ));
    let refresh = controls.clone();
    std::mem::forget(window_event_listener_untyped(
        "visibilitychange",
        move |_| {
            if !document().hidden() {
                let _ = refresh.unbounded_send(Control::Refresh);
            }
        },
    ));
    if let Some(user_id) = context.user.get_untracked() {
        let _ = controls.unbounded_send(Control::SignedIn(user_id));
    }
    let driver = Driver {
        context,
        controls,
        machine: Rc::new(RefCell::new(Machine::new(tuning(context)))),
        running: Vec::new(),
        tabs: Tabs::default(),
        group: None,
        token_source,
        frames: None,
        counting: false,
    };
    spawn_local(driver.run(inbox));
}

fn tuning(context: CreditContext) -> Tuning {
    Tuning {
        climb_interval: context.climb_interval,
        ..Tuning::default()
    }
}

struct Driver {
    context: CreditContext,
    controls: UnboundedSender<Control>,
    machine: Rc<RefCell<Machine>>,
    /// The transports and probes of the current attempt.
    running: Vec<AbortHandle>,
    tabs: Tabs,
    /// This tab's membership of the user's tab group, while signed in where supported.
    group: Option<Group>,
    token_source: Option<TokenSource>,
    /// Frames for the current WebSocket to send (token refreshes).
    frames: Option<UnboundedSender<WsClientMsg>>,
    /// Whether the leader's tab count is being kept up to date.
    counting: bool,
}

impl Driver {
    async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<Control>) {
        while let Some(control) = inbox.next().await {
            self.handle(control);
        }
    }

    fn handle(&mut self, control: Control) {
        match control {
            Control::Machine(Input::SetMode(mode)) => {
                let duties = self.tabs.set_mode(mode);
                self.perform(duties);
            }
            Control::Machine(input) => self.feed(input),
            Control::Event(event) => self.apply(*event),
            Control::Relay(relay) => {
                let duties = self.tabs.heard(relay);
                self.perform(duties);
            }
            Control::Elected => {
                let duties = self.tabs.elected();
                self.context.role.set(self.tabs.role());
                self.context.note("leading this browser's tabs");
                self.perform(duties);
                if !self.counting {
                    self.counting = true;
                    self.count_tabs();
                }
            }
            Control::CountTabs => self.count_tabs(),
            Control::Counted(tabs) => {
                self.context.tabs.set(tabs);
                let duties = self.tabs.counted(tabs);
                self.perform(duties);
            }
            Control::AuthExpiring => {
                if let Some(frames) = self.frames.clone() {
                    spawn_local(refresh_in_place(
                        self.context,
                        self.token_source.clone(),
                        frames,
                    ));
                }
            }
            Control::Refreshed(expires_at) => self.context.note(format!(
                "token refreshed in place, valid until {}",
                expires_at.format("%H:%M:%S")
            )),
            Control::Reauthenticated => self.feed(Input::Start),
            Control::Expired => {
                let duties = self.tabs.sign_out(Some(EXPIRED.into()));
                self.perform(duties);
            }
            Control::Refresh => spawn_local(refresh(self.controls.clone())),
            Control::SignInDev(user_id) => {
                spawn_local(sign_in_dev(self.context, self.controls.clone(), user_id));
            }
            Control::SignInToken(token) => {
                spawn_local(sign_in_token(self.context, self.controls.clone(), token));
            }
            Control::SignedIn(user_id) => {
                // A new user starts from scratch: no version of theirs has been seen.
                self.group = None;
                if self.machine.borrow().status() != Status::SignedOut {
                    self.feed(Input::Stop);
                }
                *self.machine.borrow_mut() = Machine::new(tuning(self.context));
                self.group = Group::join(&user_id, self.controls.clone());
                self.context.user.set(Some(user_id));
                self.context.notice.set(None);
                let duties = self.tabs.join(self.group.is_some());
                self.context.role.set(self.tabs.role());
                self.context.tabs.set(1);
                self.perform(duties);
            }
            Control::SignOut => {
                let duties = self.tabs.sign_out(None);
                self.perform(duties);
                spawn_local(sign_out());
            }
            Control::Simulate { amount, kind } => {
                spawn_local(simulate(self.context, amount, kind));
            }
            Control::LoadLedger { before } => spawn_local(load_ledger(self.context, before)),
            Control::LoadHolds => spawn_local(load_holds(self.context)),
            Control::Hold(action) => spawn_local(hold(self.context, action)),
        }
    }

    /// Carries out what the tab group asks of this tab.
    fn perform(&mut self, duties: Vec<Duty>) {
        for duty in duties {
            match duty {
                Duty::Post(relay) => {
                    if let Some(group) = &self.group {
                        group.post(&relay);
                    }
                }
                Duty::Feed(input) => self.feed(input),
                Duty::Apply(event) => self.apply(*event),
                Duty::Show(shared) => {
                    self.show(
                        shared.status,
                        shared.transport,
                        shared.mode,
                        shared.attempts,
                    );
                    self.context.tabs.set(shared.tabs);
                }
                Duty::SignOut { notice } => self.signed_out(notice),
            }
        }
    }

    /// Steps the machine and carries out its commands; a leader relays the outcome.
    fn feed(&mut self, input: Input) {
        let commands = self
            .machine
            .borrow_mut()
            .step(input, js_sys::Math::random());
        for command in commands {
            self.execute(command);
        }
        if self.tabs.role() == Role::Follower {
            return;
        }
        let (status, transport, mode, attempts) = {
            let machine = self.machine.borrow();
            (
                machine.status(),
                machine.transport(),
                machine.mode(),
                machine.failures(),
            )
        };
        self.show(status, transport, mode, attempts);
        let duties = self.tabs.connection(status, transport, mode, attempts);
        self.perform(duties);
    }

    /// Shows a connection's state, this tab's or the leader's.
    fn show(&self, status: Status, transport: Option<Transport>, mode: Mode, attempts: u32) {
        let context = self.context;
        if context.status.get_untracked() != status
            || context.transport.get_untracked() != transport
        {
            let via = transport.map_or("", Transport::label);
            context.note(format!("{} {via}", status.label()));
        }
        context.status.set(status);
        context.transport.set(transport);
        context.mode.set(mode);
        context.attempts.set(attempts);
    }

    /// Signed out here or in another tab: stop, leave the group and forget the user.
    fn signed_out(&mut self, notice: Option<String>) {
        self.feed(Input::Stop);
        self.group = None;
        let context = self.context;
        context.role.set(Role::Alone);
        context.tabs.set(1);
        context.user.set(None);
        context.balance.set(None);
        context.held.set(0);
        context.ledger.set(None);
        context.holds.set(None);
        context.notice.set(notice);
    }

    /// The leader counts the tabs sharing its connection, now and every so often.
    fn count_tabs(&mut self) {
        let group = match &self.group {
            Some(group) if self.tabs.role() == Role::Leader => group,
            _ => {
                self.counting = false;
                return;
            }
        };
        let (count, controls) = (group.count(), self.controls.clone());
        spawn_local(async move {
            if let Some(tabs) = count.await {
                let _ = controls.unbounded_send(Control::Counted(tabs));
            }
            sleep(TAB_COUNT_INTERVAL).await;
            let _ = controls.unbounded_send(Control::CountTabs);
        });
    }

    fn execute(&mut self, command: Command) {
        let controls = self.controls.clone();
        match command {
            Command::CloseAll => {
                for handle in self.running.drain(..) {
                    handle.abort();
                }
            }
            Command::Open { transport, attempt } => {
                self.context.note(format!("opening {}", transport.label()));
                let task = match transport {
                    Transport::WebSocket => {
                        let (frames, outgoing) = mpsc::unbounded();
                        self.frames = Some(frames);
                        websocket(controls, attempt, outgoing).boxed_local()
                    }
                    Transport::Sse => sse(controls, attempt).boxed_local(),
                    Transport::Polling => polling(controls, attempt).boxed_local(),
                };
                self.spawn_abortable(task);
            }
            Command::Probe { attempt } => {
                self.spawn_abortable(probe(controls, attempt).boxed_local());
            }
            Command::Wake { after, input } => spawn_local(async move {
                sleep(after).await;
                let _ = controls.unbounded_send(Control::Machine(input));
            }),
            Command::Reauthenticate => {
                self.context.note("token expired: asking for a fresh one");
                spawn_local(reauthenticate(
                    self.context,
                    self.token_source.clone(),
                    controls,
                ));
            }
            Command::GiveUp => {
                self.context.note("refused by the server: not retrying");
                self.context.notice.set(Some(
                    "The server refuses live updates for this page or sign-in. \
                     Open the app at its own address, or sign in again."
                        .into(),
                ));
            }
        }
    }

    fn spawn_abortable(&mut self, task: futures::future::LocalBoxFuture<'static, ()>) {
        let (handle, registration) = AbortHandle::new_pair();
        self.running.push(handle);
        spawn_local(async move {
            let _ = Abortable::new(task, registration).await;
        });
    }

    /// Applies an event unless it is not newer than the last one applied.
    fn apply(&mut self, event: BalanceEvent) {
        if !self.machine.borrow_mut().accept(event.version) {
            return;
        }
        let context = self.context;
        let before = context
            .balance
            .get_untracked()
            .map(|balance| balance - context.held.get_untracked());
        context.balance.set(Some(event.balance));
        context.held.set(event.held);
        context.version.set(event.version);
        context.last_update.set(event.updated_at);
        let duties = self.tabs.applied(&event);
        self.perform(duties);
        // A change or a hold flashes what it did to the available credits.
        if event.change.is_some() || event.hold.is_some() {
            let moved = before.map_or_else(
                || event.change.as_ref().map_or(0, |change| change.amount),
                |before| event.available - before,
            );
            if moved != 0 {
                context
                    .last_change
                    .update(|last| *last = Some((moved, last.map_or(1, |(_, n)| n + 1))));
            }
        }
        context.last_event.set(Some(event));
    }
}

fn send(controls: &UnboundedSender<Control>, input: Input) {
    let _ = controls.unbounded_send(Control::Machine(input));
}

fn deliver(controls: &UnboundedSender<Control>, event: BalanceEvent) {
    let _ = controls.unbounded_send(Control::Event(Box::new(event)));
}

fn ws_url() -> String {
    let location = window().location();
    let scheme = match location.protocol().as_deref() {
        Ok("https:") => "wss",
        _ => "ws",
    };
    let host = location.host().unwrap_or_default();
    format!("{scheme}://{host}{}", paths::WS)
}

/// A WebSocket counts as open once the snapshot arrives: that proves auth and server.
/// `outgoing` carries the frames the driver sends on it (token refreshes).
async fn websocket(
    controls: UnboundedSender<Control>,
    attempt: u64,
    mut outgoing: UnboundedReceiver<WsClientMsg>,
) {
    let Ok(socket) = WebSocket::open(&ws_url()) else {
        return send(
            &controls,
            Input::Ended {
                attempt,
                ending: Ending::Refused,
            },
        );
    };
    let (mut write, read) = socket.split();
    let mut read = read.fuse();
    let mut opened = false;
    let ending = loop {
        let received = futures::select! {
            frame = outgoing.select_next_some() => {
                if let Ok(text) = serde_json::to_string(&frame) {
                    let _ = write.send(Message::Text(text)).await;
                }
                continue;
            }
            received = read.next() => received,
        };
        match received {
            Some(Ok(Message::Text(text))) => match serde_json::from_str(&text) {
                Ok(WsServerMsg::Balance(event)) => {
                    if !opened {
                        opened = true;
                        send(&controls, Input::Opened { attempt });
                    }
                    deliver(&controls, event);
                }
                Ok(WsServerMsg::AuthExpiring { .. }) => {
                    let _ = controls.unbounded_send(Control::AuthExpiring);
                }
                Ok(WsServerMsg::AuthOk { expires_at, .. }) => {
                    let _ = controls.unbounded_send(Control::Refreshed(expires_at));
                }
                _ => {}
            },
            Some(Ok(Message::Bytes(_))) => {}
            Some(Err(WebSocketError::ConnectionClose(event)))
                if event.code >= close::POLICY && event.code != close::ABNORMAL =>
            {
                break Ending::Code(event.code);
            }
            Some(Err(_)) | None => {
                break if opened {
                    Ending::Dropped
                } else {
                    Ending::Refused
                };
            }
        }
    };
    send(&controls, Input::Ended { attempt, ending });
}

/// Tries a WebSocket on the side while live on SSE or polling.
async fn probe(controls: UnboundedSender<Control>, attempt: u64) {
    let opened = async {
        let socket = WebSocket::open(&ws_url()).ok()?;
        let (_write, mut read) = socket.split();
        match read.next().await {
            Some(Ok(Message::Text(_))) => Some(()),
            _ => None,
        }
    };
    let timeout = sleep(Tuning::default().open_timeout);
    let input = futures::select! {
        opened = opened.fuse() => match opened {
            Some(()) => Input::ProbeOpened { attempt },
            None => Input::ProbeFailed { attempt },
        },
        () = timeout.fuse() => Input::ProbeFailed { attempt },
    };
    send(&controls, input);
}

async fn sse(controls: UnboundedSender<Control>, attempt: u64) {
    let Ok(mut source) = EventSource::new(paths::SSE) else {
        return send(
            &controls,
            Input::Ended {
                attempt,
                ending: Ending::Refused,
            },
        );
    };
    let (Ok(balances), Ok(expiries)) = (
        source.subscribe("balance"),
        source.subscribe(close::SSE_AUTH_EXPIRED),
    ) else {
        return send(
            &controls,
            Input::Ended {
                attempt,
                ending: Ending::Refused,
            },
        );
    };
    let (mut balances, mut expiries) = (balances.fuse(), expiries.fuse());
    let mut opened = false;
    let ending = loop {
        futures::select! {
            next = balances.next() => match next {
                Some(Ok((_, message))) => {
                    let data = message.data().as_string().unwrap_or_default();
                    if let Ok(event) = serde_json::from_str::<BalanceEvent>(&data) {
                        if !opened {
                            opened = true;
                            send(&controls, Input::Opened { attempt });
                        }
                        deliver(&controls, event);
                    }
                }
                // EventSource would retry by itself; the machine decides instead.
                Some(Err(_)) | None => break if opened { Ending::Dropped } else { Ending::Refused },
            },
            _ = expiries.next() => break Ending::AuthExpired,
        }
    };
    source.close();
    send(&controls, Input::Ended { attempt, ending });
}

async fn polling(controls: UnboundedSender<Control>, attempt: u64) {
    let mut version: Option<i64> = None;
    let mut opened = false;
    let ending = loop {
        let hidden = document().hidden();
        let url = match version {
            Some(version) if !hidden => {
                format!(
                    "{}?version={version}&wait={LONG_POLL_WAIT_SECS}",
                    paths::POLL
                )
            }
            _ => paths::POLL.to_owned(),
        };
        let started = js_sys::Date::now();
        let answer = match Request::get(&url).send().await {
            Ok(response) if response.status() == 401 => break Ending::AuthExpired,
            Ok(response) if response.ok() => response.json::<PollResponse>().await.ok(),
            _ => None,
        };
        let Some(answer) = answer else {
            break if opened {
                Ending::Dropped
            } else {
                Ending::Refused
            };
        };
        if !opened {
            opened = true;
            send(&controls, Input::Opened { attempt });
        }
        let changed = version != Some(answer.snapshot.version);
        version = Some(answer.snapshot.version);
        deliver(&controls, BalanceEvent::snapshot(answer.snapshot));
        // Held polls pace themselves; quick answers without news wait the suggested interval.
        let quick = js_sys::Date::now() - started < 1_000.0;
        if hidden || (quick && !changed) {
            let slowdown = if hidden { HIDDEN_SLOWDOWN } else { 1 };
            sleep(Duration::from_millis(u64::from(
                answer.poll_interval_ms * slowdown,
            )))
            .await;
        }
    };
    send(&controls, Input::Ended { attempt, ending });
}

/// The balance right now, for a tab that becomes visible again.
async fn refresh(controls: UnboundedSender<Control>) {
    if let Ok(response) = Request::get(paths::BALANCE).send().await
        && response.ok()
        && let Ok(snapshot) = response.json().await
    {
        deliver(&controls, BalanceEvent::snapshot(snapshot));
    }
}

/// The `ApiError` message of a failed response, or a generic one.
async fn failure(response: Response) -> String {
    match response.json::<ApiError>().await {
        Ok(error) => error.message,
        Err(_) => format!("request failed ({})", response.status()),
    }
}

async fn post_json<T: serde::Serialize>(url: &str, body: &T) -> Result<Response, String> {
    let request = Request::post(url)
        .json(body)
        .map_err(|err| err.to_string())?;
    answered(request).await
}

async fn post_empty(url: &str) -> Result<Response, String> {
    let request = Request::post(url).build().map_err(|err| err.to_string())?;
    answered(request).await
}

/// Sends `request`; a refusal becomes its `ApiError` message.
async fn answered(request: Request) -> Result<Response, String> {
    let response = request.send().await.map_err(|err| err.to_string())?;
    if response.ok() {
        Ok(response)
    } else {
        Err(failure(response).await)
    }
}

async fn sign_in_dev(context: CreditContext, controls: UnboundedSender<Control>, user_id: String) {
    match post_json(
        paths::DEV_LOGIN,
        &DevLoginRequest {
            user_id: user_id.clone(),
        },
    )
    .await
    {
        Ok(_) => {
            let _ = controls.unbounded_send(Control::SignedIn(user_id));
        }
        Err(message) => context.notice.set(Some(message)),
    }
}

/// A fresh token for the signed-in user, with the session cookie renewed: from the embedding
/// app's token source, or in dev mode by signing the same user in again.
async fn fresh_token(
    context: CreditContext,
    source: Option<TokenSource>,
) -> Result<String, String> {
    if let Some(source) = source {
        let token = source.token().await?;
        post_json(
            paths::SESSION,
            &SessionRequest {
                token: token.clone(),
            },
        )
        .await?;
        return Ok(token);
    }
    let user_id = context.user.get_untracked().ok_or("signed out")?;
    if !context.dev_login {
        return Err("no token source to renew the session".into());
    }
    let response = post_json(paths::DEV_LOGIN, &DevLoginRequest { user_id }).await?;
    let session = response
        .json::<DevLoginResponse>()
        .await
        .map_err(|err| err.to_string())?;
    Ok(session.token)
}

/// Answers `auth_expiring`: sends a fresh token on the open WebSocket (SPEC §11).
async fn refresh_in_place(
    context: CreditContext,
    source: Option<TokenSource>,
    frames: UnboundedSender<WsClientMsg>,
) {
    match fresh_token(context, source).await {
        Ok(token) => {
            let _ = frames.unbounded_send(WsClientMsg::Auth { token });
        }
        Err(message) => context.note(format!("cannot refresh the token: {message}")),
    }
}

/// After an expiry (4001, or SSE's and polling's equivalents): renew the session and
/// connect again, or sign every tab out.
async fn reauthenticate(
    context: CreditContext,
    source: Option<TokenSource>,
    controls: UnboundedSender<Control>,
) {
    let next = match fresh_token(context, source).await {
        Ok(_) => Control::Reauthenticated,
        Err(_) => Control::Expired,
    };
    let _ = controls.unbounded_send(next);
}

async fn sign_in_token(context: CreditContext, controls: UnboundedSender<Control>, token: String) {
    let answer = match post_json(paths::SESSION, &SessionRequest { token }).await {
        Ok(response) => response
            .json::<SessionInfo>()
            .await
            .map_err(|err| err.to_string()),
        Err(message) => Err(message),
    };
    match answer {
        Ok(session) => {
            let _ = controls.unbounded_send(Control::SignedIn(session.user_id));
        }
        Err(message) => context.notice.set(Some(message)),
    }
}

async fn sign_out() {
    let _ = Request::delete(paths::SESSION).send().await;
}

async fn simulate(context: CreditContext, amount: i64, kind: String) {
    let request = DevCreditRequest {
        amount,
        kind,
        metadata: None,
    };
    let notice = post_json(paths::DEV_CREDITS, &request).await.err();
    context.notice.set(notice);
}

async fn load_ledger(context: CreditContext, before: Option<i64>) {
    let mut url = format!("{}?limit={LEDGER_PAGE}", paths::TRANSACTIONS);
    if let Some(before) = before {
        url.push_str(&format!("&before={before}"));
    }
    if let Ok(response) = Request::get(&url).send().await
        && response.ok()
        && let Ok(page) = response.json::<TransactionPage>().await
    {
        context.ledger.set(Some(page));
    }
}

async fn load_holds(context: CreditContext) {
    if let Ok(response) = Request::get(paths::HOLDS).send().await
        && response.ok()
        && let Ok(list) = response.json::<HoldList>().await
    {
        context.holds.set(Some(list.items));
    }
}

async fn hold(context: CreditContext, action: HoldAction) {
    let sent = match action {
        HoldAction::Place { amount, ttl_s } => {
            let request = DevHoldRequest {
                amount,
                ttl_s: Some(ttl_s),
            };
            post_json(paths::DEV_HOLDS, &request).await
        }
        HoldAction::Capture { id } => {
            post_json(
                &paths::with_id(paths::DEV_HOLD_CAPTURE, &id),
                &CaptureRequest::default(),
            )
            .await
        }
        HoldAction::Release { id } => {
            post_empty(&paths::with_id(paths::DEV_HOLD_RELEASE, &id)).await
        }
    };
    context.notice.set(sent.err());
}
