//! The live balance in the browser: [`CreditContext`] holds it as reactive signals,
//! [`CreditProvider`] fills it from the page context on the server (first paint) and keeps it
//! live in the browser through the connection [`machine`] and its driver, one connection per
//! browser shared by the user's [`tabs`].

#[cfg(feature = "hydrate")]
mod browser;
pub mod format;
#[cfg(feature = "hydrate")]
mod group;
pub mod machine;
pub mod tabs;

use std::{collections::VecDeque, future::Future, rc::Rc};

use chrono::{DateTime, Utc};
use futures::future::{FutureExt, LocalBoxFuture};
use leptos::prelude::*;

use crate::wire::{BalanceEvent, Hold, PageContext, TransactionPage};
use machine::{Input, Mode, Status, Transport};
use tabs::Role;

/// Connection events kept for the debug page.
pub const LOG_CAPACITY: usize = 50;
/// Id of the script element that carries the [`PageContext`] from server to browser.
pub const PAGE_CONTEXT_ID: &str = "lc-page";

/// One line of the connection log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub at: DateTime<Utc>,
    pub text: String,
}

/// A message to the browser driver, from the UI or from the driver's own tasks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// An input for the connection machine (debug buttons send `SetMode`).
    Machine(Input),
    /// A balance event received by a transport.
    Event(Box<BalanceEvent>),
    /// Read the balance once (the tab became visible).
    Refresh,
    SignInDev(String),
    SignInToken(String),
    /// Sign-in succeeded for this user: connect.
    SignedIn(String),
    SignOut,
    Simulate {
        amount: i64,
        kind: String,
    },
    LoadLedger {
        before: Option<i64>,
    },
    LoadHolds,
    /// Dev mode: place, capture or release a hold on one's own credits.
    Hold(HoldAction),
    /// A message from another tab of this user.
    Relay(tabs::Relay),
    /// This tab now holds the user's lock: it leads.
    Elected,
    /// Time for the leader to count the group's tabs.
    CountTabs,
    Counted(u32),
    /// The WebSocket's credential expires soon: refresh it in place.
    AuthExpiring,
    /// The server took the fresh token; it is valid until then.
    Refreshed(DateTime<Utc>),
    /// An expired session was renewed: connect again as the same user.
    Reauthenticated,
    /// An expired session could not be renewed: every tab signs out.
    Expired,
}

/// Where fresh tokens for the signed-in user come from (SPEC §11): the embedding app's
/// identity client, e.g. a closure around Supabase's `getSession`. The leading tab asks it
/// before its credential expires, refreshes the connection in place and renews the session
/// cookie with the answer.
#[derive(Clone)]
pub struct TokenSource(
    #[cfg_attr(
        not(feature = "hydrate"),
        expect(dead_code, reason = "only the browser asks for tokens")
    )]
    Rc<dyn Fn() -> LocalBoxFuture<'static, Result<String, String>>>,
);

impl TokenSource {
    /// `fetch` answers a fresh token, or why there is none.
    pub fn new<F, Fut>(fetch: F) -> Self
    where
        F: Fn() -> Fut + 'static,
        Fut: Future<Output = Result<String, String>> + 'static,
    {
        Self(Rc::new(move || fetch().boxed_local()))
    }

    #[cfg(feature = "hydrate")]
    async fn token(&self) -> Result<String, String> {
        (self.0)().await
    }
}

/// What the debug page asks of the user's holds in dev mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldAction {
    Place { amount: i64, ttl_s: i64 },
    Capture { id: String },
    Release { id: String },
}

/// The live balance and connection state, provided at the root by [`CreditProvider`].
#[derive(Clone, Copy)]
pub struct CreditContext {
    pub dev_login: bool,
    /// How often to try WebSocket again while on SSE or polling.
    pub climb_interval: std::time::Duration,
    pub user: RwSignal<Option<String>>,
    /// The ledger balance; what may be spent is `balance − held`.
    pub balance: RwSignal<Option<i64>>,
    /// Credits reserved by active holds (SPEC §12).
    pub held: RwSignal<i64>,
    pub version: RwSignal<i64>,
    pub transport: RwSignal<Option<Transport>>,
    pub status: RwSignal<Status>,
    pub mode: RwSignal<Mode>,
    /// When the balance last changed (the change's commit time).
    pub last_update: RwSignal<Option<DateTime<Utc>>>,
    pub last_event: RwSignal<Option<BalanceEvent>>,
    /// The last change's amount and a counter, so the navbar can flash each one.
    pub last_change: RwSignal<Option<(i64, u64)>>,
    pub attempts: RwSignal<u32>,
    /// This tab's part in the user's tab group, and how many tabs share the connection.
    pub role: RwSignal<Role>,
    pub tabs: RwSignal<u32>,
    pub log: RwSignal<VecDeque<LogEntry>>,
    pub ledger: RwSignal<Option<TransactionPage>>,
    /// The user's active holds, newest first, once loaded.
    pub holds: RwSignal<Option<Vec<Hold>>>,
    /// The last action's outcome, for forms.
    pub notice: RwSignal<Option<String>>,
    controls: StoredValue<Option<futures::channel::mpsc::UnboundedSender<Control>>>,
}

impl CreditContext {
    fn new(page: &PageContext) -> Self {
        let session = page.session.as_ref();
        let snapshot = session.and_then(|s| s.balance.as_ref());
        Self {
            dev_login: page.dev_login,
            climb_interval: std::time::Duration::from_millis(u64::from(page.climb_interval_ms)),
            user: RwSignal::new(session.map(|s| s.user_id.clone())),
            balance: RwSignal::new(snapshot.map(|s| s.balance)),
            held: RwSignal::new(snapshot.map_or(0, |s| s.held)),
            version: RwSignal::new(snapshot.map_or(0, |s| s.version)),
            transport: RwSignal::new(None),
            status: RwSignal::new(if session.is_some() {
                Status::Connecting
            } else {
                Status::SignedOut
            }),
            mode: RwSignal::new(Mode::Auto),
            last_update: RwSignal::new(snapshot.and_then(|s| s.updated_at)),
            last_event: RwSignal::new(None),
            last_change: RwSignal::new(None),
            attempts: RwSignal::new(0),
            role: RwSignal::new(Role::Alone),
            tabs: RwSignal::new(1),
            log: RwSignal::new(VecDeque::new()),
            ledger: RwSignal::new(None),
            holds: RwSignal::new(None),
            notice: RwSignal::new(None),
            controls: StoredValue::new(None),
        }
    }

    /// Asks the browser driver to do something; a no-op while rendering on the server.
    pub fn send(&self, control: Control) {
        self.controls.with_value(|controls| {
            if let Some(controls) = controls {
                let _ = controls.unbounded_send(control);
            }
        });
    }

    /// What may be spent or held: the balance less the held credits.
    pub fn available(&self) -> Option<i64> {
        Some(self.balance.get()? - self.held.get())
    }

    /// Appends to the bounded connection log.
    pub fn note(&self, text: impl Into<String>) {
        let entry = LogEntry {
            at: Utc::now(),
            text: text.into(),
        };
        self.log.update(|log| {
            if log.len() == LOG_CAPACITY {
                log.pop_back();
            }
            log.push_front(entry);
        });
    }
}

/// The credit context of the current page.
///
/// # Panics
/// Outside a [`CreditProvider`], which `App` puts at the root.
pub fn use_credits() -> CreditContext {
    expect_context::<CreditContext>()
}

/// Provides [`CreditContext`] to `children`: from the request on the server, from the
/// embedded page context in the browser, where it also starts the live connection.
#[component]
pub fn CreditProvider(
    /// Fresh tokens for the signed-in user. Without one, dev mode signs the same user in
    /// again, and other sessions end at their token's expiry.
    #[prop(optional)]
    token_source: Option<TokenSource>,
    children: Children,
) -> impl IntoView {
    let page = page_context();
    let context = CreditContext::new(&page);
    provide_context(context);
    #[cfg(feature = "hydrate")]
    browser::start(context, token_source);
    #[cfg(not(feature = "hydrate"))]
    drop(token_source);
    children()
}

/// The page context the server put in the request (SSR) or in the page (browser).
pub fn page_context() -> PageContext {
    #[cfg(feature = "ssr")]
    {
        use_context::<http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<PageContext>().cloned())
            .unwrap_or_default()
    }
    #[cfg(all(feature = "hydrate", not(feature = "ssr")))]
    {
        browser::embedded_page_context().unwrap_or_default()
    }
    #[cfg(not(any(feature = "ssr", feature = "hydrate")))]
    {
        PageContext::default()
    }
}

/// The page context as JSON safe to embed in a `<script>` element.
pub fn page_context_json(page: &PageContext) -> String {
    serde_json::to_string(page)
        .unwrap_or_else(|_| "{}".into())
        .replace("</", "<\\/")
}
