//! Who is connected on this instance, per user, across every transport. The bus delivers each
//! committed change here once; every connection of that user gets it from its
//! [`Subscription`], which keeps that connection's versions in order.
//!
//! Each connected user has one bounded `broadcast` channel, created by the first subscription
//! and removed with the last, so a user with no open connection costs nothing. A connection
//! that falls behind skips to the newest event (balances are absolute), never buffers.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use app::wire::BalanceSnapshot;
use futures::future::BoxFuture;
use tokio::sync::broadcast;

use super::{Update, subscription::Subscription};
use crate::{
    metrics::Metrics,
    store::{Store, StoreError},
};

/// Events buffered per user before a slow connection is coalesced to the newest; also the
/// most changes a connection holds back behind a gap. Every connected user pays for these
/// slots, idle or not.
pub(super) const USER_BACKLOG: usize = 8;

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

/// Why [`Hub::open`] gave no connection.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The hub took no more connections (see [`Refused`]).
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The snapshot could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the bus learns of the users connected here: with Redis it listens to a user's
/// channel only while that user has a connection on this instance (SPEC §6.1).
pub trait Interest: Send + Sync {
    /// A connection of `user_id` opens. Resolves once the other instances' events for that
    /// user reach this hub, or sooner when they cannot for now (a resync heals them then).
    fn ready<'a>(&'a self, user_id: &'a str) -> BoxFuture<'a, ()>;
    /// The last connection of `user_id` here closed.
    fn idle(&self, user_id: &str);
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
    interest: OnceLock<Arc<dyn Interest>>,
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
                interest: OnceLock::new(),
            }),
        }
    }

    /// Tells `interest` who connects and who is gone from now on; set once, by the bus.
    pub fn report_to(&self, interest: Arc<dyn Interest>) {
        let _ = self.inner.interest.set(interest);
    }

    fn users(&self) -> std::sync::MutexGuard<'_, Users> {
        self.inner.users.lock().expect("hub lock poisoned")
    }

    /// Subscribes a new connection of `user_id`; transports use [`Hub::open`], which also
    /// reads the snapshot.
    ///
    /// # Errors
    /// `TooMany` when the user is at the limit for this kind of transport, `Closed` once the
    /// server is shutting down.
    pub(super) fn subscribe(
        &self,
        user_id: &str,
        transport: Transport,
    ) -> Result<Subscription, Refused> {
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
        Ok(Subscription::new(
            self.clone(),
            user_id,
            transport,
            receiver,
        ))
    }

    /// Opens a connection of `user_id`: subscribes, then reads the snapshot from `store`,
    /// which the connection sends first; nothing at or below its version follows.
    ///
    /// # Errors
    /// `Refused(TooMany)` when the user is at the limit for this kind of transport,
    /// `Refused(Closed)` once the server is shutting down; `Store` when the snapshot cannot
    /// be read.
    pub async fn open(
        &self,
        store: &Store,
        user_id: &str,
        transport: Transport,
    ) -> Result<(Subscription, BalanceSnapshot), OpenError> {
        // Subscribe before reading the snapshot, here and on the bus, so no change can fall
        // between the two: one committed in between arrives on the subscription, and one
        // already in the snapshot is dropped there as not newer.
        let mut subscription = self.subscribe(user_id, transport)?;
        if let Some(interest) = self.inner.interest.get() {
            interest.ready(user_id).await;
        }
        let snapshot = store.snapshot(user_id).await?;
        subscription.sent(snapshot.version);
        Ok((subscription, snapshot))
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

    /// The highest version delivered to `user_id`, for a subscription that skips ahead.
    pub(super) fn newest(&self, user_id: &str) -> Option<Arc<Update>> {
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

    /// Frees the slot of a dropped subscription; the last one removes the user.
    pub(super) fn release(&self, user_id: &str, transport: Transport) {
        let mut users = self.users();
        if let Some(entry) = users.channels.get_mut(user_id) {
            match transport {
                Transport::Poll => entry.polls -= 1,
                Transport::WebSocket | Transport::Sse => entry.live -= 1,
            }
            if entry.live + entry.polls == 0 {
                users.channels.remove(user_id);
                // Under the lock: a new first connection cannot be reported before this.
                if let Some(interest) = self.inner.interest.get() {
                    interest.idle(user_id);
                }
            }
        }
        self.inner.metrics.closed(transport);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use super::*;
    use app::wire::{BalanceEvent, Change};

    pub(in crate::realtime) fn hub(live: usize, polls: usize) -> Hub {
        Hub::new(
            Limits {
                live_per_user: live,
                polls_per_user: polls,
            },
            Metrics::default(),
        )
    }

    /// A snapshot (resync) of `user` at `version`.
    pub(in crate::realtime) fn update(user: &str, version: i64) -> Arc<Update> {
        Arc::new(Update::new(BalanceEvent::snapshot(BalanceSnapshot::new(
            user,
            version * 10,
            0,
            version,
            None,
        ))))
    }

    /// A change of `user` to `version`.
    pub(in crate::realtime) fn change(user: &str, version: i64) -> Arc<Update> {
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

    /// Each connection of a user gets each change once; other users get nothing.
    #[tokio::test(start_paused = true)]
    async fn fan_out_per_user() {
        let hub = hub(4, 4);
        let mut a1 = hub.subscribe("a", Transport::WebSocket).unwrap();
        let mut a2 = hub.subscribe("a", Transport::Sse).unwrap();
        let mut b = hub.subscribe("b", Transport::WebSocket).unwrap();
        hub.deliver(update("a", 1));
        assert_eq!(a1.next().await.unwrap().event.version, 1);
        assert_eq!(a2.next().await.unwrap().event.version, 1);
        let quiet = Duration::from_secs(60);
        assert!(tokio::time::timeout(quiet, b.next()).await.is_err());
        assert!(tokio::time::timeout(quiet, a1.next()).await.is_err());
    }

    /// Limits are per user and per kind; a freed slot can be reused; the last drop removes
    /// the user.
    #[test]
    fn limits_and_cleanup() {
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
    #[tokio::test(start_paused = true)]
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
