//! The top navigation bar: brand, page links and the user's balance.

use leptos::prelude::*;
use leptos_router::components::A;

/// The navigation bar shown on every page. On narrow screens the links fold behind a menu
/// button.
#[component]
pub fn Navbar() -> impl IntoView {
    let menu_open = RwSignal::new(false);
    let close_menu = move |_| menu_open.set(false);

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
                <A href="/login" on:click=close_menu>"Sign in"</A>
            </nav>
            <span class="balance" title="Credit balance">
                <span class="balance-label">"Credits"</span>
                <span class="balance-value" data-testid="balance">"—"</span>
            </span>
        </header>
    }
}
