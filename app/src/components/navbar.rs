//! The top navigation bar: brand, page links and the live balance.

use leptos::prelude::*;
use leptos_router::components::A;

use crate::credits::{
    format::{signed, thousands},
    machine::{Status, Transport},
    use_credits,
};

/// The navigation bar shown on every page. On narrow screens the links fold behind a menu
/// button.
#[component]
pub fn Navbar() -> impl IntoView {
    let menu_open = RwSignal::new(false);
    let close_menu = move |_| menu_open.set(false);
    let credits = use_credits();
    let signed_in = move || credits.user.get().is_some();

    view! {
        <header class="navbar">
            <A href="/" attr:class="brand">"livecredits"</A>
            <button
                class="menu-toggle"
                aria-controls="nav-links"
                aria-expanded=move || menu_open.get().to_string()
                on:click=move |_| menu_open.update(|open| *open = !*open)
            >
                "Menu"
            </button>
            <nav id="nav-links" class="nav-links" class:open=move || menu_open.get()>
                <A href="/" on:click=close_menu>"Home"</A>
                <A href="/debug" on:click=close_menu>"Debug"</A>
                <A href="/login" on:click=close_menu>
                    {move || if signed_in() { "Account" } else { "Sign in" }}
                </A>
            </nav>
            <Balance />
        </header>
    }
}

/// The available credits (the balance less any held) with the held amount beside them when
/// there is one, the connection indicator, a flash per change, and a polite live region so
/// screen readers hear each change.
#[component]
fn Balance() -> impl IntoView {
    let credits = use_credits();
    let health = move || Health::of(credits.status.get(), credits.transport.get());
    let text = move || {
        credits
            .available()
            .map_or_else(|| "—".to_owned(), thousands)
    };
    let held = move || {
        let held = credits.held.get();
        (held > 0).then(|| {
            view! {
                <span class="balance-held" data-testid="held" title="Reserved by active holds">
                    {format!("{} held", thousands(held))}
                </span>
            }
        })
    };
    let announcement = move || match (credits.available(), credits.last_change.get()) {
        (Some(available), Some((amount, _))) => {
            format!(
                "{} credits available ({})",
                thousands(available),
                signed(amount)
            )
        }
        _ => String::new(),
    };

    view! {
        <span class="balance" title="Available credits">
            <span class="balance-label">"Credits"</span>
            <span class="balance-value" data-testid="balance">{text}</span>
            {held}
            {move || {
                credits
                    .last_change
                    .get()
                    .map(|(amount, seq)| {
                        let direction = if amount < 0 { "down" } else { "up" };
                        view! {
                            <span
                                class=format!("balance-change {direction}")
                                data-seq=seq.to_string()
                                data-testid="balance-change"
                            >
                                {signed(amount)}
                            </span>
                        }
                    })
            }}
            <span
                class=move || format!("connection {}", health().class())
                data-testid="connection"
                data-transport=move || credits.transport.get().map_or("none", Transport::label)
            >
                <span class="dot" aria-hidden="true"></span>
                {move || health().label()}
            </span>
            <span class="visually-hidden" aria-live="polite" aria-atomic="true">
                {announcement}
            </span>
        </span>
    }
}

/// The indicator's three states: live (push), degraded (polling or reconnecting), offline.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Health {
    Live,
    Degraded,
    Offline,
}

impl Health {
    fn of(status: Status, transport: Option<Transport>) -> Self {
        match (status, transport) {
            (Status::Live, Some(Transport::WebSocket | Transport::Sse)) => Self::Live,
            (Status::Live | Status::Connecting | Status::Reconnecting, _) => Self::Degraded,
            (Status::Offline | Status::SignedOut | Status::Forbidden, _) => Self::Offline,
        }
    }

    fn class(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Degraded => "degraded",
            Self::Offline => "offline",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Live => "Live",
            Self::Degraded => "Degraded",
            Self::Offline => "Offline",
        }
    }
}
