//! The start page.

use leptos::prelude::*;

/// Explains what the app shows and where to go next.
#[component]
pub fn HomePage() -> impl IntoView {
    view! {
        <section class="card">
            <h1>"Your credits, live"</h1>
            <p>
                "The balance in the bar above follows every change the moment it is committed, "
                "over WebSocket, Server-Sent Events or polling, whichever your network allows."
            </p>
            <p>
                <a href="/login">"Sign in"</a>
                " to see your balance, or open the "
                <a href="/debug">"debug page"</a>
                " to watch the connection and the ledger."
            </p>
        </section>
    }
}
