//! One component per route.

mod debug;
mod home;
mod login;

pub use debug::DebugPage;
pub use home::HomePage;
pub use login::LoginPage;

use leptos::prelude::*;

/// Shown for any path no route matches.
#[component]
pub fn NotFound() -> impl IntoView {
    #[cfg(feature = "ssr")]
    if let Some(response) = use_context::<leptos_axum::ResponseOptions>() {
        response.set_status(http::StatusCode::NOT_FOUND);
    }
    view! {
        <section class="card">
            <h1>"Page not found"</h1>
            <p><a href="/">"Back to the start page"</a></p>
        </section>
    }
}
