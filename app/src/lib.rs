//! The livecredits user interface, rendered on the server and hydrated in the browser, and
//! the wire types every part of the system speaks.
//!
//! `shell` is the HTML document the server renders around `App`; `frontend` hydrates `App`.

// Leptos views are nested types; the debug page's outgrows rustc's default query depth
// when hydrating.
#![recursion_limit = "256"]

pub mod components;
pub mod credits;
pub mod pages;
pub mod wire;

use leptos::prelude::*;
use leptos_meta::{MetaTags, Stylesheet, Title, provide_meta_context};
use leptos_router::{
    StaticSegment,
    components::{Route, Router, Routes},
};

use components::Navbar;
use credits::{CreditProvider, PAGE_CONTEXT_ID, page_context, page_context_json};
use pages::{DebugPage, HomePage, LoginPage, NotFound};

/// The whole HTML document, rendered by the server for every page request. The page
/// context travels in a JSON script so the browser hydrates from the state the server
/// rendered.
pub fn shell(options: LeptosOptions) -> impl IntoView {
    let page = page_context_json(&page_context());
    // The server makes a nonce for each page and names it in the Content-Security-Policy;
    // the hydration scripts carry it.
    #[cfg(feature = "ssr")]
    if let Some(nonce) = use_context::<http::request::Parts>()
        .and_then(|parts| parts.extensions.get::<leptos::nonce::Nonce>().cloned())
    {
        provide_context(nonce);
    }
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8" />
                <meta name="viewport" content="width=device-width, initial-scale=1" />
                <script id=PAGE_CONTEXT_ID type="application/json" inner_html=page></script>
                <AutoReload options=options.clone() />
                <HydrationScripts options />
                <MetaTags />
            </head>
            <body>
                <App />
            </body>
        </html>
    }
}

/// The application root: navigation bar and routed pages.
#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    // Effects run only in the browser, so this flips once the page has hydrated; tests and
    // styles use it to tell a live page from server-rendered HTML.
    let hydrated = RwSignal::new(false);
    Effect::new(move |_| hydrated.set(true));

    view! {
        <Stylesheet id="leptos" href="/pkg/livecredits.css" />
        <Title text="livecredits" />
        <Router>
            <CreditProvider>
                <div class="app" data-hydrated=move || hydrated.get().to_string()>
                    <Navbar />
                    <main class="page">
                        <Routes fallback=NotFound>
                            <Route path=StaticSegment("") view=HomePage />
                            <Route path=StaticSegment("login") view=LoginPage />
                            <Route path=StaticSegment("debug") view=DebugPage />
                        </Routes>
                    </main>
                </div>
            </CreditProvider>
        </Router>
    }
}
