//! Remembered remote look-ups, keyed by token: concurrent askers of one token share one
//! look-up (single flight), and its outcome is kept until the deadline the look-up chose.
//! Memory is bounded: entries are keyed by the token's SHA-256 (fixed size, however long the
//! token, and no token is kept); at capacity, stale and abandoned entries go first, then
//! every settled one; look-ups in flight stay, so their waiters keep merging.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

/// An outcome and the instant it stops being trusted.
struct Settled<V> {
    value: V,
    until: Instant,
}

/// Empty while its look-up runs; every asker of the key holds a clone and waits on it.
type Slot<V> = Arc<OnceCell<Settled<V>>>;

/// A key's SHA-256: collision-resistant, so one token never gets another's outcome.
type KeyDigest = [u8; 32];

/// Single-flight look-ups with their outcomes remembered for a time each chooses.
pub struct Lookups<V> {
    // A std mutex: held only to find or insert a slot, never across an `.await`.
    slots: Mutex<HashMap<KeyDigest, Slot<V>>>,
    capacity: usize,
}

impl<V: Clone> Lookups<V> {
    /// An empty memo that keeps about `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self {
            slots: Mutex::default(),
            capacity,
        }
    }

    /// The outcome for `key`: a remembered one that is still fresh, the one another caller is
    /// looking up right now, or else `look_up`'s, remembered until the instant it returns.
    /// `look_up` is only polled when this caller runs the look-up; if it is cancelled, the
    /// next waiter runs its own.
    pub async fn get_or_look_up<F>(&self, key: &str, look_up: F) -> V
    where
        F: Future<Output = (V, Instant)>,
    {
        let slot = self.slot(key);
        let settled = slot
            .get_or_init(|| async move {
                let (value, until) = look_up.await;
                Settled { value, until }
            })
            .await;
        settled.value.clone()
    }

    /// The slot to wait on for `key`, a new one when none is fresh.
    fn slot(&self, key: &str) -> Slot<V> {
        let digest: KeyDigest = Sha256::digest(key.as_bytes()).into();
        let now = Instant::now();
        let mut slots = self.slots.lock().expect("look-up memo lock poisoned");
        if let Some(slot) = slots.get(&digest)
            && slot.get().is_none_or(|settled| settled.until > now)
        {
            return Arc::clone(slot);
        }
        if slots.len() >= self.capacity {
            evict(&mut slots, now, self.capacity);
        }
        let slot = Slot::default();
        slots.insert(digest, Arc::clone(&slot));
        slot
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.lock().expect("look-up memo lock poisoned").len()
    }
}

/// Makes room: drops stale outcomes and look-ups nobody waits for any more; when that is not
/// enough, forgets every settled outcome (a forgotten one costs one look-up again, no more).
fn evict<V>(slots: &mut HashMap<KeyDigest, Slot<V>>, now: Instant, capacity: usize) {
    // A strong count of 1 means only this map holds the slot: every waiter was cancelled.
    slots.retain(|_, slot| {
        slot.get()
            .map_or(Arc::strong_count(slot) > 1, |settled| settled.until > now)
    });
    if slots.len() >= capacity {
        slots.retain(|_, slot| slot.get().is_none() && Arc::strong_count(slot) > 1);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use super::*;

    /// A look-up that counts its runs and answers `value`, fresh for `ttl`.
    async fn counted(runs: &AtomicUsize, value: u32, ttl: Duration) -> (u32, Instant) {
        runs.fetch_add(1, Ordering::SeqCst);
        tokio::task::yield_now().await;
        (value, Instant::now() + ttl)
    }

    /// Concurrent askers of one key share one look-up; a fresh outcome is reused.
    #[tokio::test]
    async fn concurrent_askers_share_one_look_up() {
        let memo = Lookups::new(10);
        let runs = AtomicUsize::new(0);
        let ttl = Duration::from_secs(60);
        let answers = futures::future::join_all(
            (0..20).map(|i| memo.get_or_look_up("k", counted(&runs, i, ttl))),
        )
        .await;
        assert!(answers.iter().all(|&answer| answer == answers[0]));
        assert_eq!(
            memo.get_or_look_up("k", counted(&runs, 99, ttl)).await,
            answers[0]
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    /// A stale outcome is looked up again.
    #[tokio::test]
    async fn stale_outcomes_are_looked_up_again() {
        let memo = Lookups::new(10);
        let runs = AtomicUsize::new(0);
        assert_eq!(
            memo.get_or_look_up("k", counted(&runs, 1, Duration::ZERO))
                .await,
            1
        );
        assert_eq!(
            memo.get_or_look_up("k", counted(&runs, 2, Duration::ZERO))
                .await,
            2
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    /// At capacity, stale entries are dropped first, then fresh ones; the memo never grows
    /// past its capacity through settled outcomes.
    #[tokio::test]
    async fn memory_is_bounded() {
        let memo = Lookups::new(4);
        let runs = AtomicUsize::new(0);
        for key in ["a", "b"] {
            memo.get_or_look_up(key, counted(&runs, 0, Duration::ZERO))
                .await;
        }
        for key in ["c", "d"] {
            memo.get_or_look_up(key, counted(&runs, 0, Duration::from_secs(60)))
                .await;
        }
        memo.get_or_look_up("e", counted(&runs, 0, Duration::from_secs(60)))
            .await;
        assert_eq!(memo.len(), 3, "the two stale entries made room");
        memo.get_or_look_up("f", counted(&runs, 0, Duration::from_secs(60)))
            .await;
        memo.get_or_look_up("g", counted(&runs, 0, Duration::from_secs(60)))
            .await;
        assert!(memo.len() <= 4);
    }
}
