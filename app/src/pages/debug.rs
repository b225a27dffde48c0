//! The debug page: the connection as the client sees it, buttons that force each transport,
//! the user's ledger (积分明细) and the connection log; in dev mode, simulated changes.

use leptos::prelude::*;

use crate::credits::{
    Control, CreditContext,
    format::{signed, thousands},
    machine::{Input, Mode, Transport},
    use_credits,
};

/// Connection state, transport controls, ledger and event log.
#[component]
pub fn DebugPage() -> impl IntoView {
    let credits = use_credits();
    view! {
        <section class="card">
            <h1>"Debug"</h1>
            <Connection credits />
            <Controls credits />
        </section>
        <Show when=move || credits.dev_login>
            <Simulate credits />
        </Show>
        <Ledger credits />
        <EventLog credits />
    }
}

#[component]
fn Connection(credits: CreditContext) -> impl IntoView {
    let mode = move || match credits.mode.get() {
        Mode::Auto => "automatic".to_owned(),
        Mode::Only(transport) => format!("{} only", transport.label()),
        Mode::Off => "disconnected".to_owned(),
    };
    let last_event = move || {
        credits
            .last_event
            .get()
            .and_then(|event| serde_json::to_string_pretty(&event).ok())
            .unwrap_or_else(|| "none yet".into())
    };
    view! {
        <dl class="facts">
            <dt>"User"</dt>
            <dd data-testid="debug-user">{move || credits.user.get().unwrap_or_else(|| "signed out".into())}</dd>
            <dt>"Transport"</dt>
            <dd data-testid="debug-transport">
                {move || credits.transport.get().map_or("none", Transport::label)}
            </dd>
            <dt>"Status"</dt>
            <dd data-testid="debug-status">{move || credits.status.get().label()}</dd>
            <dt>"Mode"</dt>
            <dd data-testid="debug-mode">{mode}</dd>
            <dt>"Version"</dt>
            <dd data-testid="debug-version">{move || credits.version.get()}</dd>
            <dt>"Failed attempts"</dt>
            <dd data-testid="debug-attempts">{move || credits.attempts.get()}</dd>
        </dl>
        <details>
            <summary>"Last event"</summary>
            <pre data-testid="debug-last-event">{last_event}</pre>
        </details>
    }
}

#[component]
fn Controls(credits: CreditContext) -> impl IntoView {
    let set = move |mode: Mode| move |_| credits.send(Control::Machine(Input::SetMode(mode)));
    view! {
        <div class="buttons" role="group" aria-label="Transport">
            <button on:click=set(Mode::Only(Transport::WebSocket))>"Connect WebSocket"</button>
            <button on:click=set(Mode::Only(Transport::Sse))>"Connect SSE"</button>
            <button on:click=set(Mode::Only(Transport::Polling))>"Start polling"</button>
            <button on:click=set(Mode::Off)>"Disconnect"</button>
            <button on:click=set(Mode::Auto)>"Automatic"</button>
        </div>
    }
}

#[component]
fn Simulate(credits: CreditContext) -> impl IntoView {
    let amount = RwSignal::new("100".to_owned());
    let kind = RwSignal::new("grant".to_owned());
    let submit = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        match amount.get_untracked().trim().parse::<i64>() {
            Ok(amount) => credits.send(Control::Simulate {
                amount,
                kind: kind.get_untracked().trim().to_owned(),
            }),
            Err(_) => credits
                .notice
                .set(Some("The amount must be a whole number.".into())),
        }
    };
    view! {
        <section class="card">
            <h2>"Simulate a change"</h2>
            <form class="inline" on:submit=submit>
                <label for="sim-amount">"Amount"</label>
                <input id="sim-amount" inputmode="numeric" bind:value=amount />
                <label for="sim-type">"Type"</label>
                <input id="sim-type" bind:value=kind />
                <button type="submit">"Apply"</button>
            </form>
            <p class="notice" role="status">{move || credits.notice.get()}</p>
        </section>
    }
}

/// The ledger, newest first, ten rows a page; refreshed whenever a new version arrives.
#[component]
fn Ledger(credits: CreditContext) -> impl IntoView {
    let before = RwSignal::new(None::<i64>);
    let newer = RwSignal::new(Vec::<Option<i64>>::new());
    Effect::new(move |_| {
        credits.version.track();
        if credits.user.get().is_some() {
            credits.send(Control::LoadLedger {
                before: before.get(),
            });
        }
    });
    let older = move |_| {
        if let Some(next) = credits
            .ledger
            .get_untracked()
            .and_then(|page| page.next_before)
        {
            newer.update(|stack| stack.push(before.get_untracked()));
            before.set(Some(next));
        }
    };
    let back = move |_| {
        if let Some(previous) = newer.try_update(Vec::pop).flatten() {
            before.set(previous);
        }
    };
    let rows = move || {
        credits.ledger.get().map(|page| {
            page.items
                .into_iter()
                .map(|row| {
                    view! {
                        <tr>
                            <td>{row.version}</td>
                            <td>{row.created_at.format("%Y-%m-%d %H:%M:%S").to_string()}</td>
                            <td>{row.kind}</td>
                            <td class="num">{signed(row.amount)}</td>
                            <td class="num">{thousands(row.balance_after)}</td>
                        </tr>
                    }
                })
                .collect_view()
        })
    };
    view! {
        <section class="card">
            <h2>"Ledger (积分明细)"</h2>
            <div class="table-wrap">
                <table data-testid="ledger">
                    <thead>
                        <tr>
                            <th>"Version"</th>
                            <th>"Time (UTC)"</th>
                            <th>"Type"</th>
                            <th class="num">"Amount"</th>
                            <th class="num">"Balance"</th>
                        </tr>
                    </thead>
                    <tbody>{rows}</tbody>
                </table>
            </div>
            <div class="buttons">
                <button on:click=back disabled=move || newer.with(Vec::is_empty)>"Newer"</button>
                <button
                    on:click=older
                    disabled=move || {
                        credits.ledger.with(|page| page.as_ref().is_none_or(|p| p.next_before.is_none()))
                    }
                >
                    "Older"
                </button>
            </div>
        </section>
    }
}

#[component]
fn EventLog(credits: CreditContext) -> impl IntoView {
    view! {
        <section class="card">
            <h2>"Connection log"</h2>
            <ol class="log" data-testid="event-log">
                {move || {
                    credits
                        .log
                        .get()
                        .into_iter()
                        .map(|entry| {
                            view! {
                                <li>
                                    <time>{entry.at.format("%H:%M:%S%.3f").to_string()}</time>
                                    " "
                                    {entry.text}
                                </li>
                            }
                        })
                        .collect_view()
                }}
            </ol>
        </section>
    }
}
