//! What this instance owes the others: the users whose latest change could not be published
//! to Redis, with that change's version, and the task that publishes their snapshots once
//! Redis answers. Balances are absolute, so one snapshot at least that new heals every
//! connection elsewhere, and the other hubs drop a snapshot they already have.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use app::wire::BalanceEvent;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::redis::RedisLink;
use crate::{metrics::Metrics, realtime::Update, store::Store};

/// Users remembered at most (~100 bytes each). Past it the heal asks every instance to resync
/// everyone it serves, which heals the users not remembered too, at the price of one batched
/// re-read per instance; healing only the users kept would leave the others stale.
pub const MAX_USERS: usize = 100_000;
/// How often owed balances are retried while any are left.
const HEAL_INTERVAL: Duration = Duration::from_secs(1);
/// Owed users whose snapshots are read, and published, at once.
const HEAL_BATCH: usize = 500;

/// The changes owed, noted by the publisher and paid by the heal task.
pub struct Unpublished {
    /// A std mutex: every section is short and none spans an `.await`.
    owed: Mutex<Owed>,
    /// Wakes the heal task when something is noted.
    noted: Notify,
    metrics: Metrics,
}

impl Unpublished {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            owed: Mutex::default(),
            noted: Notify::new(),
            metrics,
        }
    }

    /// Remembers changes that may not have reached the other instances.
    pub fn note<'a>(&self, events: impl ExactSizeIterator<Item = &'a BalanceEvent>) {
        self.metrics.publishes_failed(events.len());
        let mut owed = self.lock();
        for event in events {
            owed.note(&event.user_id, event.version);
        }
        drop(owed);
        self.noted.notify_one();
    }

    /// Publishes the current snapshots of the users owed, every [`HEAL_INTERVAL`] while any
    /// are left and the publisher is connected, until `shutdown`.
    pub async fn heal(&self, link: &RedisLink, store: &Store, shutdown: &CancellationToken) {
        loop {
            tokio::select! {
                () = self.noted.notified() => {}
                () = shutdown.cancelled() => return,
            }
            while !self.lock().is_empty() {
                tokio::select! {
                    () = tokio::time::sleep(HEAL_INTERVAL) => {}
                    () = shutdown.cancelled() => return,
                }
                if link.can_publish() {
                    self.heal_once(link, store).await;
                }
            }
        }
    }

    /// One attempt to publish everything owed; what fails stays owed.
    async fn heal_once(&self, link: &RedisLink, store: &Store) {
        let (users, everyone) = {
            let mut owed = self.lock();
            (owed.users(), owed.take_everyone())
        };
        if everyone {
            if let Err(err) = link.send_resync().await {
                tracing::warn!(%err, "cannot ask the other instances to resync; retrying");
                self.lock().owe_everyone();
                return;
            }
            tracing::warn!("too many unpublished changes to track: asked every instance to resync");
            // Each instance re-reads after this message, so every change noted so far is healed.
            let mut owed = self.lock();
            for (user, version) in &users {
                owed.published(user, *version);
            }
            return;
        }
        for batch in users.chunks(HEAL_BATCH) {
            let ids: Vec<String> = batch.iter().map(|(user, _)| user.clone()).collect();
            let snapshots = match store.snapshots(&ids).await {
                Ok(snapshots) => snapshots,
                Err(err) => {
                    tracing::warn!(%err, "cannot read unpublished balances; retrying");
                    return;
                }
            };
            let updates: Vec<Update> = snapshots
                .into_iter()
                .map(|snapshot| Update::new(BalanceEvent::snapshot(snapshot)))
                .collect();
            if let Err(err) = link.send(updates.iter()).await {
                tracing::debug!(%err, "unpublished balances not healed yet; retrying");
                return;
            }
            self.metrics.heals_published(updates.len());
            let mut owed = self.lock();
            for update in &updates {
                owed.published(&update.event.user_id, update.event.version);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Owed> {
        self.owed
            .lock()
            .expect("no code panics while holding the unpublished lock")
    }
}

/// The latest version owed per user, and whether some user could not be remembered.
#[derive(Debug, Default)]
struct Owed {
    users: HashMap<String, i64>,
    /// A user could not be remembered: the next heal resyncs everyone.
    everyone: bool,
}

impl Owed {
    fn note(&mut self, user: &str, version: i64) {
        if let Some(owed) = self.users.get_mut(user) {
            *owed = (*owed).max(version);
        } else if self.users.len() < MAX_USERS {
            self.users.insert(user.to_owned(), version);
        } else {
            self.everyone = true;
        }
    }

    fn is_empty(&self) -> bool {
        self.users.is_empty() && !self.everyone
    }

    fn users(&self) -> Vec<(String, i64)> {
        self.users
            .iter()
            .map(|(user, version)| (user.clone(), *version))
            .collect()
    }

    /// Taken *before* the resync message is sent, so an overflow while it is under way is
    /// owed again rather than wiped; given back with `owe_everyone` if sending fails.
    fn take_everyone(&mut self) -> bool {
        std::mem::take(&mut self.everyone)
    }

    fn owe_everyone(&mut self) {
        self.everyone = true;
    }

    /// Forgets `user` once a snapshot at `version` reaches the change owed for it.
    fn published(&mut self, user: &str, version: i64) {
        if self.users.get(user).is_some_and(|&owed| owed <= version) {
            self.users.remove(user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_latest_version_and_forgets_only_when_reached() {
        let mut owed = Owed::default();
        owed.note("u", 3);
        owed.note("u", 2);
        owed.published("u", 2);
        assert_eq!(owed.users(), vec![("u".to_owned(), 3)]);
        owed.published("u", 3);
        assert!(owed.is_empty());
    }

    #[test]
    fn past_the_cap_owes_a_resync_of_everyone() {
        let mut owed = Owed::default();
        for user in 0..MAX_USERS {
            owed.note(&user.to_string(), 1);
        }
        assert!(!owed.take_everyone());
        owed.note("one more", 1);
        owed.note("0", 2);
        assert_eq!(owed.users().len(), MAX_USERS);
        assert!(owed.take_everyone());
        assert!(!owed.take_everyone(), "taken once");
        owed.owe_everyone();
        assert!(!owed.is_empty());
    }
}
