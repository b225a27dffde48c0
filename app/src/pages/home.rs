//! The start page.

use leptos::prelude::*;

use crate::credits::use_credits;

/// Explains what the app shows and where to go next: to sign in, or, once signed in, who
/// the balance belongs to.
#[component]
pub fn HomePage() -> impl IntoView {
    let credits = use_credits();
    let next = move || {
        match credits.user.get() {
        Some(user) => view! {
            <p data-testid="home-user">
                "Signed in as " <strong>{user}</strong> ". Open the " <a href="/debug">"debug page"</a>
                " to watch the connection, your holds and the ledger."
            </p>
        }
        .into_any(),
        None => view! {
            <p data-testid="home-user">
                <a href="/login">"Sign in"</a> " to see your balance, or open the "
                <a href="/debug">"debug page"</a> " to watch the connection and the ledger."
            </p>
        }
        .into_any(),
    }
    };
    view! {
        <section class="card">
            <h1>"Your credits, live"</h1>
            <p>
                "The balance in the bar above follows every change the moment it is committed, "
                "over WebSocket, Server-Sent Events or polling, whichever your network allows."
            </p>
            {next}
        </section>
    }
}
