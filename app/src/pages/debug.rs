//! The debug page: the connection as the client sees it (and whether this tab leads it),
//! buttons that force each transport on the connection the tabs share,
//! the user's active holds, ledger (积分明细) and the connection log; in dev mode, simulated
//! changes and holds.

use leptos::prelude::*;

use crate::credits::{
    Control, CreditContext, HoldAction,
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
        <Holds credits />
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
            <dt>"This tab"</dt>
            <dd data-testid="debug-role">{move || credits.role.get().label()}</dd>
            <dt>"Tabs sharing it"</dt>
            <dd data-testid="debug-tabs">{move || credits.tabs.get()}</dd>
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

/// The active holds with a live countdown to their expiry, reloaded with every version; in
/// dev mode, a form to place one and buttons to capture or release each.
#[component]
fn Holds(credits: CreditContext) -> impl IntoView {
    let now = RwSignal::new(chrono::Utc::now());
    Effect::new(move |_| {
        set_interval(
            move || now.set(chrono::Utc::now()),
            std::time::Duration::from_secs(1),
        );
    });
    Effect::new(move |_| {
        credits.version.track();
        if credits.user.get().is_some() {
            credits.send(Control::LoadHolds);
        }
    });
    let amount = RwSignal::new("50".to_owned());
    let ttl = RwSignal::new("60".to_owned());
    let place = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        let amount = amount.get_untracked().trim().parse::<i64>();
        let ttl_s = ttl.get_untracked().trim().parse::<i64>();
        match (amount, ttl_s) {
            (Ok(amount), Ok(ttl_s)) => {
                credits.send(Control::Hold(HoldAction::Place { amount, ttl_s }))
            }
            _ => credits.notice.set(Some(
                "The amount and lifetime must be whole numbers.".into(),
            )),
        }
    };
    let rows = move || {
        let now = now.get();
        credits.holds.get().map(|holds| {
            holds
                .into_iter()
                .map(|hold| {
                    let left = (hold.expires_at - now).num_seconds().max(0);
                    let (capture, release) = (hold.id.clone(), hold.id.clone());
                    view! {
                        <tr data-testid="hold">
                            <td class="num">{thousands(hold.amount)}</td>
                            <td>{hold.expires_at.format("%H:%M:%S").to_string()}</td>
                            <td class="num" data-testid="hold-countdown">{format!("{left} s")}</td>
                            <td>
                                <Show when=move || credits.dev_login>
                                    <button on:click={
                                        let id = capture.clone();
                                        move |_| credits.send(Control::Hold(HoldAction::Capture { id: id.clone() }))
                                    }>"Capture"</button>
                                    <button on:click={
                                        let id = release.clone();
                                        move |_| credits.send(Control::Hold(HoldAction::Release { id: id.clone() }))
                                    }>"Release"</button>
                                </Show>
                            </td>
                        </tr>
                    }
                })
                .collect_view()
        })
    };
    view! {
        <section class="card">
            <h2>"Holds"</h2>
            <p>
                "Held: " <span data-testid="debug-held">{move || thousands(credits.held.get())}</span>
            </p>
            <Show when=move || credits.dev_login>
                <form class="inline" on:submit=place>
                    <label for="hold-amount">"Hold amount"</label>
                    <input id="hold-amount" inputmode="numeric" bind:value=amount />
                    <label for="hold-ttl">"Lifetime (s)"</label>
                    <input id="hold-ttl" inputmode="numeric" bind:value=ttl />
                    <button type="submit">"Place hold"</button>
                </form>
            </Show>
            <div class="table-wrap">
                <table data-testid="holds">
                    <thead>
                        <tr>
                            <th class="num">"Amount"</th>
                            <th>"Expires (UTC)"</th>
                            <th class="num">"Left"</th>
                            <th></th>
                        </tr>
                    </thead>
                    <tbody>{rows}</tbody>
                </table>
            </div>
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
