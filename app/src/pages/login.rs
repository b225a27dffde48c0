//! The sign-in page.

use leptos::prelude::*;

/// Sign-in: in dev mode by user id, otherwise by pasting a JWT.
#[component]
pub fn LoginPage() -> impl IntoView {
    view! {
        <section class="card">
            <h1>"Sign in"</h1>
            <p>"Sign in with a user id (dev mode) or paste a JWT issued by your identity provider."</p>
        </section>
    }
}
