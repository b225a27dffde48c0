//! The browser half of the live balance (hydrate only): runs the connection machine with
//! real WebSockets, EventSources, fetches and timers, feeds what happens back into it, and
//! writes the results into the [`CreditContext`] signals.

use std::{cell::RefCell, rc::Rc, time::Duration};

use futures::{
    FutureExt, StreamExt,
    channel::mpsc::{self, UnboundedSender},
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
    Control, CreditContext, HoldAction, PAGE_CONTEXT_ID,
    machine::{Command, Ending, Input, Machine, Transport, Tuning},
};
use crate::wire::{
    ApiError, BalanceEvent, CaptureRequest, DevCreditRequest, DevHoldRequest, DevLoginRequest,
    HoldList, PageContext, PollResponse, SessionInfo, SessionRequest, TransactionPage, WsServerMsg,
    close, paths,
};

/// How long a long-poll is held by the server.
const LONG_POLL_WAIT_SECS: u32 = 25;
/// Ledger rows per page on the debug page.
const LEDGER_PAGE: u32 = 10;
/// Polling slows down this much while the tab is hidden.
const HIDDEN_SLOWDOWN: u32 = 3;

/// The page context the server embedded in the page.
pub fn embedded_page_context() -> Option<PageContext> {
    let element = document().get_element_by_id(PAGE_CONTEXT_ID)?;
    serde_json::from_str(&element.text_content()?).ok()
}

/// Starts the driver for `context` and connects if someone is signed in.
pub fn start(context: CreditContext) {
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
    if context.user.get_untracked().is_some() {
        let _ = controls.unbounded_send(Control::Machine(Input::Start));
    }
    let driver = Driver {
        context,
        controls,
        machine: Rc::new(RefCell::new(Machine::new(tuning(context)))),
        running: Vec::new(),
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
}

impl Driver {
    async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<Control>) {
        while let Some(control) = inbox.next().await {
            self.handle(control);
        }
    }

    fn handle(&mut self, control: Control) {
        match control {
            Control::Machine(input) => self.feed(input),
            Control::Event(event) => self.apply(*event),
            Control::Refresh => spawn_local(refresh(self.controls.clone())),
            Control::SignInDev(user_id) => {
                spawn_local(sign_in_dev(self.context, self.controls.clone(), user_id));
            }
            Control::SignInToken(token) => {
                spawn_local(sign_in_token(self.context, self.controls.clone(), token));
            }
            Control::SignedIn(user_id) => {
                // A new user starts from scratch: no version of theirs has been seen.
                *self.machine.borrow_mut() = Machine::new(tuning(self.context));
                self.context.user.set(Some(user_id));
                self.context.notice.set(None);
                self.feed(Input::Start);
            }
            Control::SignOut => {
                self.feed(Input::Stop);
                self.context.user.set(None);
                self.context.balance.set(None);
                self.context.held.set(0);
                self.context.ledger.set(None);
                self.context.holds.set(None);
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

    /// Steps the machine and carries out its commands.
    fn feed(&mut self, input: Input) {
        let commands = self
            .machine
            .borrow_mut()
            .step(input, js_sys::Math::random());
        for command in commands {
            self.execute(command);
        }
        let machine = self.machine.borrow();
        let context = self.context;
        let (status, transport) = (machine.status(), machine.transport());
        if context.status.get_untracked() != status
            || context.transport.get_untracked() != transport
        {
            let via = transport.map_or("", Transport::label);
            context.note(format!("{} {via}", status.label()));
        }
        context.status.set(status);
        context.transport.set(transport);
        context.mode.set(machine.mode());
        context.attempts.set(machine.failures());
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
                    Transport::WebSocket => websocket(controls, attempt).boxed_local(),
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
                let user = self.context.user.get_untracked();
                match user {
                    Some(user_id) if self.context.dev_login => {
                        self.context
                            .note("token expired: signing in again (dev mode)");
                        spawn_local(sign_in_dev(self.context, controls, user_id));
                    }
                    _ => self
                        .context
                        .notice
                        .set(Some("Your session expired. Sign in again.".into())),
                }
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
async fn websocket(controls: UnboundedSender<Control>, attempt: u64) {
    let Ok(socket) = WebSocket::open(&ws_url()) else {
        return send(
            &controls,
            Input::Ended {
                attempt,
                ending: Ending::Refused,
            },
        );
    };
    let (_write, mut read) = socket.split();
    let mut opened = false;
    let ending = loop {
        match read.next().await {
            Some(Ok(Message::Text(text))) => {
                if let Ok(WsServerMsg::Balance(event)) = serde_json::from_str(&text) {
                    if !opened {
                        opened = true;
                        send(&controls, Input::Opened { attempt });
                    }
                    deliver(&controls, event);
                }
            }
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
