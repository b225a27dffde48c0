//! The sign-in page: dev sign-in by user id (dev mode), or a pasted JWT; sign-out.

use leptos::prelude::*;

use crate::credits::{Control, use_credits};

/// Sign-in and sign-out.
#[component]
pub fn LoginPage() -> impl IntoView {
    let credits = use_credits();
    let user_id = RwSignal::new(String::new());
    let token = RwSignal::new(String::new());

    let dev_form = credits.dev_login.then(|| {
        view! {
            <form
                class="stack"
                on:submit=move |ev| {
                    ev.prevent_default();
                    credits.send(Control::SignInDev(user_id.get_untracked().trim().to_owned()));
                }
            >
                <h2>"Dev sign-in"</h2>
                <label for="dev-user">"User id"</label>
                <input
                    id="dev-user"
                    name="user_id"
                    autocomplete="username"
                    required
                    bind:value=user_id
                />
                <button type="submit">"Sign in as this user"</button>
            </form>
        }
    });

    view! {
        <section class="card">
            <h1>"Sign in"</h1>
            {move || {
                credits
                    .user
                    .get()
                    .map(|user| {
                        view! {
                            <p class="signed-in">
                                "Signed in as " <strong data-testid="user">{user}</strong> ". "
                                <button on:click=move |_| credits.send(Control::SignOut)>
                                    "Sign out"
                                </button>
                            </p>
                        }
                    })
            }}
            <p class="notice" role="status">{move || credits.notice.get()}</p>
            {dev_form}
            <form
                class="stack"
                on:submit=move |ev| {
                    ev.prevent_default();
                    credits.send(Control::SignInToken(token.get_untracked().trim().to_owned()));
                }
            >
                <h2>"Sign in with a token"</h2>
                <label for="jwt">"JWT from your identity provider"</label>
                <textarea id="jwt" name="token" rows="3" required bind:value=token></textarea>
                <button type="submit">"Use this token"</button>
            </form>
        </section>
    }
}
