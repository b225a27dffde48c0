//! Who is connected on this instance, per user, across every transport. The bus delivers each
//! committed change here once; every connection of that user gets it from its subscription.
//!
//! Each connected user has one bounded `broadcast` channel, created by the first subscription
//! and removed with the last, so a user with no open connection costs nothing. A connection
//! that falls behind skips to the newest event (balances are absolute), never buffers.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::broadcast::{self, error::RecvError},
    time::{Instant, timeout_at},
};

use super::Update;
use crate::metrics::Metrics;

/// Events buffered per user before a slow connection is coalesced to the newest. Every
/// connected user pays for these slots, idle or not.
const USER_BACKLOG: usize = 8;
/// How long a connection holds back a change that arrived before an earlier version of the
/// same user. Versions are consecutive per user, so a gap is a change still on its way:
/// typically one committed on another instance and still crossing Redis, while a later one
/// committed here has already arrived.
const GAP_WAIT: Duration = Duration::from_millis(100);

/// The transport a subscription serves; live ones (WebSocket, SSE) and long-polls have
/// separate per-user limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    WebSocket,
    Sse,
    Poll,
}

impl Transport {
    /// The label used in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::WebSocket => "websocket",
            Self::Sse => "sse",
            Self::Poll => "poll",
        }
    }
}

/// Per-user connection limits (SPEC §5).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// WebSocket and SSE connections together.
    pub live_per_user: usize,
    /// Concurrent long-polls.
    pub polls_per_user: usize,
}

/// Why a subscription was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The user already has as many as allowed.
    #[error("too many {transport} connections for this user (limit {limit})")]
    TooMany {
        transport: &'static str,
        limit: usize,
    },
    /// The server is shutting down.
    #[error("the server is shutting down")]
    Closed,
}

/// The hub of one instance; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    // A std mutex: every critical section is a map operation or a non-blocking send.
    users: Mutex<Users>,
    limits: Limits,
    metrics: Metrics,
}

/// The users' channels, and whether the hub was closed for shutdown.
#[derive(Default)]
struct Users {
    /// Keyed by user id, shared with the user's subscriptions.
    channels: HashMap<Arc<str>, UserEntry>,
    closed: bool,
}

struct UserEntry {
    sender: broadcast::Sender<Arc<Update>>,
    /// The highest version delivered, for connections that fell behind: updates from this
    /// instance and from the bus interleave out of version order, so the channel's last
    /// slots need not hold it.
    newest: Option<Arc<Update>>,
    live: usize,
    polls: usize,
}

impl Hub {
    /// An empty hub enforcing `limits`.
    pub fn new(limits: Limits, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                users: Mutex::default(),
                limits,
                metrics,
            }),
        }
    }

    fn users(&self) -> std::sync::MutexGuard<'_, Users> {
        self.inner.users.lock().expect("hub lock poisoned")
    }

    /// Subscribes a new connection of `user_id`. Subscribe *before* reading the snapshot, so
    /// no change can fall between the two.
    ///
    /// # Errors
    /// `TooMany` when the user is at the limit for this kind of transport, `Closed` once the
    /// server is shutting down.
    pub fn subscribe(&self, user_id: &str, transport: Transport) -> Result<Subscription, Refused> {
        let mut users = self.users();
        if users.closed {
            return Err(Refused::Closed);
        }
        let user_id: Arc<str> = match users.channels.get_key_value(user_id) {
            Some((key, _)) => Arc::clone(key),
            None => user_id.into(),
        };
        let entry = users
            .channels
            .entry(Arc::clone(&user_id))
            .or_insert_with(|| UserEntry {
                sender: broadcast::channel(USER_BACKLOG).0,
                newest: None,
                live: 0,
                polls: 0,
            });
        let (count, limit) = match transport {
            Transport::Poll => (&mut entry.polls, self.inner.limits.polls_per_user),
            Transport::WebSocket | Transport::Sse => {
                (&mut entry.live, self.inner.limits.live_per_user)
            }
        };
        if *count >= limit {
            if entry.live + entry.polls == 0 {
                users.channels.remove(&user_id);
            }
            self.inner.metrics.refused("too_many_connections");
            return Err(Refused::TooMany {
                transport: transport.name(),
                limit,
            });
        }
        *count += 1;
        let receiver = entry.sender.subscribe();
        self.inner.metrics.opened(transport);
        Ok(Subscription {
            hub: self.clone(),
            user_id,
            transport,
            receiver,
            last_version: 0,
            gap: None,
        })
    }

    /// Hands a committed change to every local connection of its user; a user with no
    /// connection here costs one map lookup.
    pub fn deliver(&self, update: Arc<Update>) {
        let mut users = self.users();
        if let Some(entry) = users.channels.get_mut(update.event.user_id.as_str()) {
            if entry
                .newest
                .as_ref()
                .is_none_or(|newest| update.event.version > newest.event.version)
            {
                entry.newest = Some(Arc::clone(&update));
            }
            // An error only means every receiver is gone, which the last drop cleans up.
            let _ = entry.sender.send(update);
        }
    }

    fn newest(&self, user_id: &str) -> Option<Arc<Update>> {
        self.users()
            .channels
            .get(user_id)
            .and_then(|entry| entry.newest.clone())
    }

    /// The users with at least one connection here, for re-sending snapshots after a bus
    /// outage.
    pub fn connected_users(&self) -> Vec<String> {
        self.users()
            .channels
            .keys()
            .map(|key| key.to_string())
            .collect()
    }

    /// How many users have a connection here.
    pub fn user_count(&self) -> usize {
        self.users().channels.len()
    }

    /// Ends every subscription (their `next` returns `None`) and refuses new ones: the
    /// transports' cue to close their connections when the server shuts down.
    pub fn close(&self) {
        let mut users = self.users();
        users.closed = true;
        for entry in users.channels.values_mut() {
            // Replacing the sender drops the old one, which closes its receivers.
            entry.sender = broadcast::channel(1).0;
        }
    }

    fn release(&self, user_id: &str, transport: Transport) {
        let mut users = self.users();
        if let Some(entry) = users.channels.get_mut(user_id) {
            match transport {
                Transport::Poll => entry.polls -= 1,
                Transport::WebSocket | Transport::Sse => entry.live -= 1,
            }
            if entry.live + entry.polls == 0 {
                users.channels.remove(user_id);
            }
        }
        self.inner.metrics.closed(transport);
    }
}

/// One connection's view of its user's changes; dropping it unsubscribes.
pub struct Subscription {
    hub: Hub,
    user_id: Arc<str>,
    transport: Transport,
    receiver: broadcast::Receiver<Arc<Update>>,
    last_version: i64,
    /// Changes that arrived ahead of a missing version; boxed, as it exists only while a
    /// gap is open and every idle connection holds a subscription.
    gap: Option<Box<Gap>>,
}

struct Gap {
    /// Held changes, lowest version first.
    early: Vec<Arc<Update>>,
    /// When to stop waiting for the missing versions and go on without them.
    deadline: Instant,
}

/// What a subscription took from its channel.
enum Received {
    /// The next event in the channel.
    InTurn(Arc<Update>),
    /// The newest event, after falling behind and skipping the rest.
    AfterLag(Arc<Update>),
}

impl Subscription {
    /// Records that the connection already has `version` (e.g. from the snapshot), so
    /// nothing at or below it is sent again.
    pub fn sent(&mut self, version: i64) {
        self.last_version = self.last_version.max(version);
    }

    /// The next change newer than anything this connection has seen, in version order: a
    /// change that overtook an earlier one is held up to [`GAP_WAIT`] for it. After falling
    /// behind, it skips to the highest version delivered.
    pub async fn next(&mut self) -> Option<Arc<Update>> {
        loop {
            if let Some(update) = self.release_early() {
                return Some(update);
            }
            let deadline = self.gap.as_ref().map(|gap| gap.deadline);
            let received = match deadline {
                None => self.receive().await?,
                // Boxed so that idle connections, which never wait here, don't carry a timer.
                Some(deadline) => match Box::pin(timeout_at(deadline, self.receive())).await {
                    Ok(received) => received?,
                    Err(_elapsed) => continue,
                },
            };
            // Having skipped ahead after falling behind, there is no gap worth waiting for;
            // snapshots (resyncs) state the balance outright. Only changes in turn wait.
            let (update, may_wait) = match received {
                Received::InTurn(update) => {
                    let is_change = update.event.change.is_some();
                    (update, is_change)
                }
                Received::AfterLag(update) => {
                    self.gap = None;
                    (update, false)
                }
            };
            let version = update.event.version;
            if version <= self.last_version {
                continue;
            }
            if may_wait && version > self.last_version + 1 {
                self.hold(update);
                continue;
            }
            self.last_version = version;
            return Some(update);
        }
    }

    async fn receive(&mut self) -> Option<Received> {
        loop {
            match self.receiver.recv().await {
                Ok(update) => return Some(Received::InTurn(update)),
                Err(RecvError::Lagged(_)) => {
                    // Skip everything buffered and take the newest the hub has seen.
                    self.receiver = self.receiver.resubscribe();
                    if let Some(update) = self.hub.newest(&self.user_id) {
                        return Some(Received::AfterLag(update));
                    }
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }

    fn hold(&mut self, update: Arc<Update>) {
        let gap = self.gap.get_or_insert_with(|| {
            Box::new(Gap {
                early: Vec::new(),
                deadline: Instant::now() + GAP_WAIT,
            })
        });
        let version = update.event.version;
        if let Err(at) = gap
            .early
            .binary_search_by_key(&version, |held| held.event.version)
        {
            gap.early.insert(at, update);
        }
    }

    /// The lowest held change, once the gap before it has closed or its wait is over.
    fn release_early(&mut self) -> Option<Arc<Update>> {
        let last = self.last_version;
        let gap = self.gap.as_mut()?;
        gap.early.retain(|held| held.event.version > last);
        let due = gap
            .early
            .first()
            .map(|first| first.event.version == last + 1 || Instant::now() >= gap.deadline);
        match due {
            None => {
                self.gap = None;
                None
            }
            Some(false) => None,
            Some(true) => {
                let update = gap.early.remove(0);
                self.last_version = update.event.version;
                Some(update)
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.release(&self.user_id, self.transport);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use app::wire::{BalanceEvent, BalanceSnapshot, Change};

    fn hub(live: usize, polls: usize) -> Hub {
        Hub::new(
            Limits {
                live_per_user: live,
                polls_per_user: polls,
            },
            Metrics::default(),
        )
    }

    fn update(user: &str, version: i64) -> Arc<Update> {
        Arc::new(Update::new(BalanceEvent::snapshot(BalanceSnapshot {
            user_id: user.into(),
            balance: version * 10,
            version,
            updated_at: None,
        })))
    }

    fn change(user: &str, version: i64) -> Arc<Update> {
        let snapshot = update(user, version);
        let mut event = snapshot.event.clone();
        event.change = Some(Change {
            id: format!("c{version}"),
            amount: 10,
            kind: "grant".into(),
            metadata: Default::default(),
            created_at: chrono::Utc::now(),
        });
        Arc::new(Update::new(event))
    }

    /// A change that overtakes an earlier one (committed here while the earlier one still
    /// crosses Redis) waits for it, so the connection sees every version in order; a gap
    /// that never closes delays the next change by at most `GAP_WAIT`.
    #[tokio::test]
    async fn overtaken_changes_are_put_back_in_order() {
        let hub = hub(4, 4);
        let mut sub = hub.subscribe("a", Transport::WebSocket).unwrap();
        sub.sent(1);
        hub.deliver(change("a", 3));
        hub.deliver(change("a", 4));
        hub.deliver(change("a", 2));
        for expected in 2..=4 {
            assert_eq!(sub.next().await.unwrap().event.version, expected);
        }

        hub.deliver(change("a", 6));
        let started = std::time::Instant::now();
        assert_eq!(sub.next().await.unwrap().event.version, 6);
        assert!(started.elapsed() >= GAP_WAIT - Duration::from_millis(5));
        // Version 5 turning up late is not sent after 6.
        hub.deliver(change("a", 5));
        hub.deliver(change("a", 7));
        assert_eq!(sub.next().await.unwrap().event.version, 7);
        // A resync snapshot is never held back.
        hub.deliver(update("a", 20));
        let started = std::time::Instant::now();
        assert_eq!(sub.next().await.unwrap().event.version, 20);
        assert!(started.elapsed() < GAP_WAIT);
    }

    /// Each connection of a user gets each change once; other users get nothing.
    #[tokio::test]
    async fn fan_out_per_user() {
        let hub = hub(4, 4);
        let mut a1 = hub.subscribe("a", Transport::WebSocket).unwrap();
        let mut a2 = hub.subscribe("a", Transport::Sse).unwrap();
        let mut b = hub.subscribe("b", Transport::WebSocket).unwrap();
        hub.deliver(update("a", 1));
        assert_eq!(a1.next().await.unwrap().event.version, 1);
        assert_eq!(a2.next().await.unwrap().event.version, 1);
        assert!(b.receiver.try_recv().is_err());
    }

    /// Versions at or below what a connection has seen are dropped.
    #[tokio::test]
    async fn stale_versions_are_dropped() {
        let hub = hub(4, 4);
        let mut sub = hub.subscribe("a", Transport::WebSocket).unwrap();
        sub.sent(5);
        for version in [3, 5, 6, 4, 7] {
            hub.deliver(update("a", version));
        }
        assert_eq!(sub.next().await.unwrap().event.version, 6);
        assert_eq!(sub.next().await.unwrap().event.version, 7);
    }

    /// A connection that falls far behind skips to the newest event.
    #[tokio::test]
    async fn lagging_connection_is_coalesced() {
        let hub = hub(4, 4);
        let mut sub = hub.subscribe("a", Transport::WebSocket).unwrap();
        for version in 1..=(USER_BACKLOG as i64 * 3) {
            hub.deliver(update("a", version));
        }
        let first = sub.next().await.unwrap().event.version;
        assert_eq!(first, USER_BACKLOG as i64 * 3);
    }

    /// Skipping ahead takes the highest version waiting, not the last to arrive: local
    /// commits and the bus interleave out of version order. It does so at once, without
    /// waiting for the versions skipped.
    #[tokio::test]
    async fn lagging_connection_skips_to_the_highest_version() {
        let hub = hub(4, 4);
        let mut sub = hub.subscribe("a", Transport::WebSocket).unwrap();
        let top = USER_BACKLOG as i64 * 3;
        for version in 1..top - 1 {
            hub.deliver(change("a", version));
        }
        hub.deliver(change("a", top));
        hub.deliver(change("a", top - 1));
        let started = std::time::Instant::now();
        assert_eq!(sub.next().await.unwrap().event.version, top);
        assert!(started.elapsed() < GAP_WAIT);
    }

    /// Limits are per user and per kind; a freed slot can be reused; the last drop removes
    /// the user.
    #[tokio::test]
    async fn limits_and_cleanup() {
        let hub = hub(2, 1);
        let live: Vec<_> = (0..2)
            .map(|_| hub.subscribe("a", Transport::WebSocket).unwrap())
            .collect();
        assert!(hub.subscribe("a", Transport::Sse).is_err());
        let poll = hub.subscribe("a", Transport::Poll).unwrap();
        assert!(hub.subscribe("a", Transport::Poll).is_err());
        assert!(hub.subscribe("b", Transport::Sse).is_ok());
        drop(live);
        assert_eq!(hub.user_count(), 1, "a is kept alive by its poll");
        drop(poll);
        assert_eq!(hub.user_count(), 0);
        assert!(hub.subscribe("c", Transport::Poll).is_ok());
        assert_eq!(hub.user_count(), 0);
    }

    /// Closing ends every subscription and refuses new ones.
    #[tokio::test]
    async fn close_ends_subscriptions() {
        let hub = hub(4, 4);
        let mut sub = hub.subscribe("a", Transport::Sse).unwrap();
        hub.close();
        assert!(sub.next().await.is_none());
        assert!(matches!(
            hub.subscribe("b", Transport::WebSocket),
            Err(Refused::Closed)
        ));
    }
}
