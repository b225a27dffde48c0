//! One connection per browser (SPEC §11): the tabs of one user form a group in which one tab
//! leads and runs the connection [`machine`](super::machine) while the others follow what it
//! relays. This is the group's logic as a pure machine like the connection's: what the
//! browser reports (elected, a relay heard, an event applied) goes in, duties come out, and
//! `browser.rs` carries them out with a Web Lock and a `BroadcastChannel`.

use serde::{Deserialize, Serialize};

use super::machine::{Input, Mode, Status, Transport};
use crate::wire::BalanceEvent;

/// This tab's part in its user's group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Not in a group: signed out, or the browser lacks Web Locks or `BroadcastChannel`, so
    /// the tab connects on its own.
    Alone,
    /// Holds the user's lock and the connection.
    Leader,
    /// Waits for the lock and shows what the leader relays.
    Follower,
}

impl Role {
    pub fn label(self) -> &'static str {
        match self {
            Self::Alone => "alone",
            Self::Leader => "leader",
            Self::Follower => "follower",
        }
    }
}

/// The leader's connection as every tab of the group shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shared {
    pub status: Status,
    pub transport: Option<Transport>,
    pub mode: Mode,
    pub attempts: u32,
    /// Tabs in the group, the leader included.
    pub tabs: u32,
}

/// A message between the tabs of a group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Relay {
    /// A tab joined and wants the leader's state and last event.
    Hello,
    State(Shared),
    Event(Box<BalanceEvent>),
    /// A follower's transport button, for the leader's machine.
    SetMode {
        mode: Mode,
    },
    /// One tab signed out, or the session expired with no way to renew it: every tab signs
    /// out, showing `notice` if any.
    SignedOut {
        notice: Option<String>,
    },
}

/// What the browser must do for the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Duty {
    /// Send to the other tabs.
    Post(Relay),
    /// Give this input to this tab's connection machine.
    Feed(Input),
    /// Apply a relayed event as if this tab had received it.
    Apply(Box<BalanceEvent>),
    /// Show the leader's connection.
    Show(Shared),
    /// Sign out here too (stop, clear, leave the group), showing `notice` if any.
    SignOut { notice: Option<String> },
}

/// The group state of one tab.
#[derive(Clone, Debug)]
pub struct Tabs {
    role: Role,
    /// Whether the tab is in a group (else it runs alone).
    grouped: bool,
    /// What a leader last relayed, for tabs that join later.
    shared: Option<Shared>,
    last_event: Option<Box<BalanceEvent>>,
    tabs: u32,
}

impl Default for Tabs {
    fn default() -> Self {
        Self {
            role: Role::Alone,
            grouped: false,
            shared: None,
            last_event: None,
            tabs: 1,
        }
    }
}

impl Tabs {
    pub fn role(&self) -> Role {
        self.role
    }

    /// Signed in: follow until elected when grouped (a lock and a channel exist), else
    /// connect at once.
    pub fn join(&mut self, grouped: bool) -> Vec<Duty> {
        *self = Self {
            grouped,
            ..Self::default()
        };
        if grouped {
            self.role = Role::Follower;
            vec![Duty::Post(Relay::Hello)]
        } else {
            vec![Duty::Feed(Input::Start)]
        }
    }

    /// This tab got the user's lock: the previous leader is gone, so connect. The first
    /// snapshot heals whatever was missed in between.
    pub fn elected(&mut self) -> Vec<Duty> {
        if self.role != Role::Follower {
            return Vec::new();
        }
        self.role = Role::Leader;
        vec![Duty::Feed(Input::Start)]
    }

    /// A message from another tab.
    pub fn heard(&mut self, relay: Relay) -> Vec<Duty> {
        match (self.role, relay) {
            (_, Relay::SignedOut { notice }) if self.grouped => {
                *self = Self::default();
                vec![Duty::SignOut { notice }]
            }
            (Role::Leader, Relay::Hello) => {
                let mut duties: Vec<Duty> = self
                    .shared
                    .map(|shared| Duty::Post(Relay::State(shared)))
                    .into_iter()
                    .collect();
                duties.extend(self.last_event.clone().map(|e| Duty::Post(Relay::Event(e))));
                duties
            }
            (Role::Leader, Relay::SetMode { mode }) => vec![Duty::Feed(Input::SetMode(mode))],
            (Role::Follower, Relay::State(shared)) => vec![Duty::Show(shared)],
            (Role::Follower, Relay::Event(event)) => vec![Duty::Apply(event)],
            _ => Vec::new(),
        }
    }

    /// A transport button on this tab: the leader's machine acts on it, wherever it runs.
    pub fn set_mode(&self, mode: Mode) -> Vec<Duty> {
        match self.role {
            Role::Follower => vec![Duty::Post(Relay::SetMode { mode })],
            Role::Alone | Role::Leader => vec![Duty::Feed(Input::SetMode(mode))],
        }
    }

    /// This tab's machine applied `event` (a leader relays it).
    pub fn applied(&mut self, event: &BalanceEvent) -> Vec<Duty> {
        if self.role != Role::Leader {
            return Vec::new();
        }
        let event = Box::new(event.clone());
        self.last_event = Some(event.clone());
        vec![Duty::Post(Relay::Event(event))]
    }

    /// This tab's connection changed (a leader relays it, with the tab count).
    pub fn connection(
        &mut self,
        status: Status,
        transport: Option<Transport>,
        mode: Mode,
        attempts: u32,
    ) -> Vec<Duty> {
        self.relay_state(Shared {
            status,
            transport,
            mode,
            attempts,
            tabs: self.tabs,
        })
    }

    /// The group's size as the lock manager counts it (a leader relays it).
    pub fn counted(&mut self, tabs: u32) -> Vec<Duty> {
        self.tabs = tabs;
        match self.shared {
            Some(shared) if shared.tabs != tabs => self.relay_state(Shared { tabs, ..shared }),
            _ => Vec::new(),
        }
    }

    fn relay_state(&mut self, shared: Shared) -> Vec<Duty> {
        if self.role != Role::Leader || self.shared == Some(shared) {
            return Vec::new();
        }
        self.shared = Some(shared);
        vec![Duty::Post(Relay::State(shared))]
    }

    /// Signing out here (or an expiry nothing can renew) signs out every tab of the group.
    pub fn sign_out(&mut self, notice: Option<String>) -> Vec<Duty> {
        let grouped = self.grouped;
        *self = Self::default();
        let mut duties = Vec::new();
        if grouped {
            duties.push(Duty::Post(Relay::SignedOut {
                notice: notice.clone(),
            }));
        }
        duties.push(Duty::SignOut { notice });
        duties
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::BalanceSnapshot;

    fn event(version: i64) -> BalanceEvent {
        BalanceEvent::snapshot(BalanceSnapshot::new("u", 10, 0, version, None))
    }

    fn leader() -> Tabs {
        let mut tabs = Tabs::default();
        tabs.join(true);
        tabs.elected();
        tabs
    }

    /// Without a group the tab connects at once; in one it only says hello until elected.
    #[test]
    fn joining_connects_alone_or_waits_for_the_lock() {
        let mut alone = Tabs::default();
        assert_eq!(alone.join(false), [Duty::Feed(Input::Start)]);
        assert_eq!(alone.role(), Role::Alone);
        assert!(alone.elected().is_empty(), "a lone tab has no lock to get");

        let mut tab = Tabs::default();
        assert_eq!(tab.join(true), [Duty::Post(Relay::Hello)]);
        assert_eq!(tab.role(), Role::Follower);
        assert_eq!(tab.elected(), [Duty::Feed(Input::Start)]);
        assert_eq!(tab.role(), Role::Leader);
        assert!(tab.elected().is_empty(), "elected once");
    }

    /// The leader relays each applied event and each connection change; followers relay
    /// nothing of their own.
    #[test]
    fn the_leader_relays_events_and_state() {
        let mut tabs = leader();
        assert_eq!(
            tabs.applied(&event(3)),
            [Duty::Post(Relay::Event(Box::new(event(3))))]
        );
        let live = tabs.connection(Status::Live, Some(Transport::WebSocket), Mode::Auto, 0);
        let shared = Shared {
            status: Status::Live,
            transport: Some(Transport::WebSocket),
            mode: Mode::Auto,
            attempts: 0,
            tabs: 1,
        };
        assert_eq!(live, [Duty::Post(Relay::State(shared))]);
        assert!(
            tabs.connection(Status::Live, Some(Transport::WebSocket), Mode::Auto, 0)
                .is_empty(),
            "an unchanged state is not relayed again"
        );
        assert_eq!(
            tabs.counted(3),
            [Duty::Post(Relay::State(Shared { tabs: 3, ..shared }))]
        );
        assert!(tabs.counted(3).is_empty());

        let mut follower = Tabs::default();
        follower.join(true);
        assert!(follower.applied(&event(4)).is_empty());
        assert!(
            follower
                .connection(Status::Live, None, Mode::Auto, 0)
                .is_empty()
        );
    }

    /// A tab that joins late gets the leader's state and last event in answer to its hello.
    #[test]
    fn hello_is_answered_with_state_and_last_event() {
        let mut tabs = leader();
        tabs.connection(Status::Live, Some(Transport::Sse), Mode::Auto, 0);
        tabs.applied(&event(7));
        let answer = tabs.heard(Relay::Hello);
        assert!(matches!(&answer[..], [
            Duty::Post(Relay::State(Shared { transport: Some(Transport::Sse), .. })),
            Duty::Post(Relay::Event(e)),
        ] if e.version == 7));

        let mut follower = Tabs::default();
        follower.join(true);
        assert!(
            follower.heard(Relay::Hello).is_empty(),
            "only the leader answers"
        );
    }

    /// Followers show what the leader relays; the leader ignores relays meant for followers.
    #[test]
    fn followers_show_and_apply_what_is_relayed() {
        let mut follower = Tabs::default();
        follower.join(true);
        let shared = Shared {
            status: Status::Reconnecting,
            transport: None,
            mode: Mode::Auto,
            attempts: 2,
            tabs: 4,
        };
        assert_eq!(follower.heard(Relay::State(shared)), [Duty::Show(shared)]);
        assert_eq!(
            follower.heard(Relay::Event(Box::new(event(9)))),
            [Duty::Apply(Box::new(event(9)))]
        );

        let mut tabs = leader();
        assert!(tabs.heard(Relay::State(shared)).is_empty());
        assert!(tabs.heard(Relay::Event(Box::new(event(9)))).is_empty());
    }

    /// A transport button acts on the leader's machine from any tab.
    #[test]
    fn transport_buttons_drive_the_leaders_machine() {
        let mode = Mode::Only(Transport::Polling);
        let mut follower = Tabs::default();
        follower.join(true);
        assert_eq!(
            follower.set_mode(mode),
            [Duty::Post(Relay::SetMode { mode })]
        );
        assert!(follower.heard(Relay::SetMode { mode }).is_empty());

        let mut tabs = leader();
        assert_eq!(tabs.set_mode(mode), [Duty::Feed(Input::SetMode(mode))]);
        assert_eq!(
            tabs.heard(Relay::SetMode { mode }),
            [Duty::Feed(Input::SetMode(mode))]
        );
    }

    /// Every relay survives the trip through the channel as JSON.
    #[test]
    fn relays_round_trip_as_json() {
        let relays = [
            Relay::Hello,
            Relay::State(Shared {
                status: Status::Live,
                transport: Some(Transport::Polling),
                mode: Mode::Only(Transport::Polling),
                attempts: 1,
                tabs: 2,
            }),
            Relay::Event(Box::new(event(5))),
            Relay::SetMode {
                mode: Mode::Only(Transport::Sse),
            },
            Relay::SignedOut {
                notice: Some("gone".into()),
            },
        ];
        for relay in relays {
            let text = serde_json::to_string(&relay).expect("serializes");
            assert_eq!(
                serde_json::from_str::<Relay>(&text).ok(),
                Some(relay),
                "{text}"
            );
        }
    }

    /// Signing out in one tab reaches every tab, with the expiry notice if there is one.
    #[test]
    fn signing_out_reaches_every_tab() {
        let notice = Some("Your session expired. Sign in again.".to_owned());
        let mut tabs = leader();
        assert_eq!(
            tabs.sign_out(notice.clone()),
            [
                Duty::Post(Relay::SignedOut {
                    notice: notice.clone()
                }),
                Duty::SignOut {
                    notice: notice.clone()
                },
            ]
        );
        assert_eq!(tabs.role(), Role::Alone);

        let mut follower = Tabs::default();
        follower.join(true);
        assert_eq!(
            follower.heard(Relay::SignedOut {
                notice: notice.clone()
            }),
            [Duty::SignOut { notice }]
        );
        assert_eq!(follower.role(), Role::Alone);
        assert!(
            follower.heard(Relay::SignedOut { notice: None }).is_empty(),
            "a tab out of the group ignores it"
        );

        let mut alone = Tabs::default();
        alone.join(false);
        assert_eq!(
            alone.sign_out(None),
            [Duty::SignOut { notice: None }],
            "a lone tab has nobody to tell"
        );
    }
}
