//! One connection's ordering of its user's changes, on top of the hub's per-user channel:
//! the versions it has sent, changes held back while an earlier version is still on its way,
//! and the skip to the newest event after falling behind. Transports read it with
//! [`Subscription::next`]; [`super::hub::Hub`] creates it and is told when it is dropped.

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::broadcast::{self, error::RecvError},
    time::{Instant, timeout_at},
};

use super::{
    Update,
    hub::{Hub, Transport, USER_BACKLOG},
};

/// How long a connection holds back a change that arrived before an earlier version of the
/// same user. Versions are consecutive per user, so a gap is a change still on its way:
/// typically one committed on another instance and still crossing Redis, while a later one
/// committed here has already arrived.
const GAP_WAIT: Duration = Duration::from_millis(100);

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
    /// Held changes, lowest version first; never more than [`USER_BACKLOG`], the most the
    /// user's channel would have buffered for a connection that does not keep up.
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
    /// A subscription reading `receiver`, counted by `hub` against `user_id`'s limit for
    /// `transport` until dropped.
    pub(super) fn new(
        hub: Hub,
        user_id: Arc<str>,
        transport: Transport,
        receiver: broadcast::Receiver<Arc<Update>>,
    ) -> Self {
        Self {
            hub,
            user_id,
            transport,
            receiver,
            last_version: 0,
            gap: None,
        }
    }

    /// The user whose changes this subscription receives.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// Records that the connection already has `version` (e.g. from the snapshot), so
    /// nothing at or below it is sent again.
    pub fn sent(&mut self, version: i64) {
        self.last_version = self.last_version.max(version);
    }

    /// The next change newer than anything this connection has seen, in version order: a
    /// change that overtook an earlier one is held up to [`GAP_WAIT`] for it. After falling
    /// behind, or with more changes held than the channel would buffer, it skips to the
    /// highest version delivered.
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
            let (mut update, may_wait) = match received {
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
                match self.hold(update) {
                    None => continue,
                    Some(newest) => update = newest,
                }
            }
            self.last_version = update.event.version;
            return Some(update);
        }
    }

    async fn receive(&mut self) -> Option<Received> {
        loop {
            match self.receiver.recv().await {
                Ok(update) => return Some(Received::InTurn(update)),
                Err(RecvError::Lagged(_)) => {
                    if let Some(update) = self.skip_to_newest() {
                        return Some(Received::AfterLag(update));
                    }
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }

    /// Drops everything buffered or held and takes the newest event the hub has seen.
    fn skip_to_newest(&mut self) -> Option<Arc<Update>> {
        self.receiver = self.receiver.resubscribe();
        self.gap = None;
        self.hub.newest(&self.user_id)
    }

    /// Holds `update` until the gap before it closes. With the early buffer full, this is
    /// falling behind like any other: the gap is given up and the newest event returned.
    fn hold(&mut self, update: Arc<Update>) -> Option<Arc<Update>> {
        let gap = self.gap.get_or_insert_with(|| {
            Box::new(Gap {
                early: Vec::new(),
                deadline: Instant::now() + GAP_WAIT,
            })
        });
        let version = update.event.version;
        match gap
            .early
            .binary_search_by_key(&version, |held| held.event.version)
        {
            Ok(_) => None,
            Err(at) if gap.early.len() < USER_BACKLOG => {
                gap.early.insert(at, update);
                None
            }
            // The hub's newest is at least `update`, which it delivered; `update` stands in
            // only if the user's entry is somehow gone.
            Err(_) => Some(
                self.skip_to_newest()
                    .filter(|newest| newest.event.version > version)
                    .unwrap_or(update),
            ),
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
    use futures::FutureExt;

    use super::*;
    use crate::realtime::hub::tests::{change, hub, update};

    /// The per-connection state every idle connection carries stays at its measured size.
    #[test]
    fn an_idle_subscription_stays_small() {
        assert!(std::mem::size_of::<Subscription>() <= 64);
    }

    /// A change that overtakes an earlier one (committed here while the earlier one still
    /// crosses Redis) waits for it, so the connection sees every version in order; a gap
    /// that never closes delays the next change by exactly `GAP_WAIT`.
    #[tokio::test(start_paused = true)]
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
        let started = Instant::now();
        assert_eq!(sub.next().await.unwrap().event.version, 6);
        assert_eq!(started.elapsed(), GAP_WAIT);
        // Version 5 turning up late is not sent after 6.
        hub.deliver(change("a", 5));
        hub.deliver(change("a", 7));
        assert_eq!(sub.next().await.unwrap().event.version, 7);
        // A resync snapshot is never held back.
        hub.deliver(update("a", 20));
        let started = Instant::now();
        assert_eq!(sub.next().await.unwrap().event.version, 20);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// Versions at or below what a connection has seen are dropped.
    #[tokio::test(start_paused = true)]
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
    #[tokio::test(start_paused = true)]
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
    #[tokio::test(start_paused = true)]
    async fn lagging_connection_skips_to_the_highest_version() {
        let hub = hub(4, 4);
        let mut sub = hub.subscribe("a", Transport::WebSocket).unwrap();
        let top = USER_BACKLOG as i64 * 3;
        for version in 1..top - 1 {
            hub.deliver(change("a", version));
        }
        hub.deliver(change("a", top));
        hub.deliver(change("a", top - 1));
        let started = Instant::now();
        assert_eq!(sub.next().await.unwrap().event.version, top);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// The changes held behind a gap are capped at the channel's backlog: a full buffer
    /// waits for the gap as usual, one more is falling behind, and skips at once to the
    /// newest, never to send the skipped versions afterwards.
    #[tokio::test(start_paused = true)]
    async fn a_full_early_buffer_skips_to_the_newest() {
        let hub = hub(4, 4);
        let mut sub = hub.subscribe("a", Transport::WebSocket).unwrap();
        sub.sent(1);
        let full = 2 + USER_BACKLOG as i64;
        for version in 3..=full {
            hub.deliver(change("a", version));
        }
        assert!(sub.next().now_or_never().is_none(), "all held for 2");
        assert_eq!(
            sub.gap.as_ref().map(|gap| gap.early.len()),
            Some(USER_BACKLOG)
        );

        hub.deliver(change("a", full + 1));
        let started = Instant::now();
        assert_eq!(sub.next().await.unwrap().event.version, full + 1);
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(sub.gap.is_none(), "nothing left held");
        hub.deliver(change("a", 2));
        hub.deliver(change("a", full + 2));
        assert_eq!(sub.next().await.unwrap().event.version, full + 2);
    }
}
