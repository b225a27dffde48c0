//! The users whose Redis channels this instance listens to (SPEC §6.1): a user's channel is
//! wanted from their first connection here until a linger after their last one closes, so a
//! page reload does not unsubscribe and subscribe again. Only bookkeeping: the link's
//! subscriber task sends the (un)subscriptions this asks for, in batches, one at a time.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// The wanted channels and what is still to be sent for them.
#[derive(Default)]
pub(super) struct Interest {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    users: HashMap<Arc<str>, Wanted>,
    /// Users to subscribe, in arrival order.
    to_subscribe: Vec<Arc<str>>,
    /// Users with a connection that read its snapshot before their channel was subscribed.
    late: Vec<Arc<str>>,
}

struct Wanted {
    /// Whether the subscriber's current connection is subscribed to the user's channel.
    live: bool,
    /// Since when the user has had no connection here.
    idle_since: Option<Instant>,
}

impl Interest {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("interest lock poisoned")
    }

    /// A connection of `user_id` opens: whether its channel must be subscribed first.
    pub fn want(&self, user_id: &str) -> bool {
        let mut state = self.state();
        if let Some(wanted) = state.users.get_mut(user_id) {
            wanted.idle_since = None;
            return !wanted.live;
        }
        let user_id: Arc<str> = user_id.into();
        state.users.insert(
            Arc::clone(&user_id),
            Wanted {
                live: false,
                idle_since: None,
            },
        );
        state.to_subscribe.push(user_id);
        true
    }

    /// The last connection of `user_id` here closed: its linger starts.
    pub fn idle(&self, user_id: &str, now: Instant) {
        if let Some(wanted) = self.state().users.get_mut(user_id) {
            wanted.idle_since = Some(now);
        }
    }

    pub fn is_live(&self, user_id: &str) -> bool {
        self.state().users.get(user_id).is_some_and(|w| w.live)
    }

    /// Up to `max` users waiting to be subscribed.
    pub fn to_subscribe(&self, max: usize) -> Vec<Arc<str>> {
        let mut state = self.state();
        let take = state.to_subscribe.len().min(max);
        state.to_subscribe.drain(..take).collect()
    }

    /// The channels of `users` are subscribed (those still wanted count as live).
    pub fn subscribed(&self, users: &[Arc<str>]) {
        let mut state = self.state();
        for user_id in users {
            if let Some(wanted) = state.users.get_mut(user_id) {
                wanted.live = true;
            }
        }
    }

    /// The subscriber's connection was replaced: nothing is subscribed any more. Returns
    /// every wanted user, to subscribe again; the queue is folded into it.
    pub fn resubscribe_all(&self) -> Vec<Arc<str>> {
        let mut state = self.state();
        state.to_subscribe.clear();
        state
            .users
            .values_mut()
            .for_each(|wanted| wanted.live = false);
        state.users.keys().cloned().collect()
    }

    /// Forgets the users idle for `linger` or longer; their channels are to be unsubscribed.
    pub fn expire(&self, linger: Duration, now: Instant) -> Vec<Arc<str>> {
        let mut state = self.state();
        let expired: Vec<Arc<str>> = state
            .users
            .iter()
            .filter(|(_, w)| w.idle_since.is_some_and(|idle| now - idle >= linger))
            .map(|(user_id, _)| Arc::clone(user_id))
            .collect();
        for user_id in &expired {
            state.users.remove(user_id);
        }
        let State {
            users,
            to_subscribe,
            late,
        } = &mut *state;
        to_subscribe.retain(|user_id| users.contains_key(user_id));
        late.retain(|user_id| users.contains_key(user_id));
        expired
    }

    /// A connection of `user_id` read its snapshot without waiting for the channel.
    pub fn late(&self, user_id: &str) {
        self.state().late.push(user_id.into());
    }

    /// The late users whose channels are now subscribed: what was committed before is to
    /// be re-read for them. The others stay until theirs is.
    pub fn take_late(&self) -> Vec<String> {
        let mut state = self.state();
        let State { users, late, .. } = &mut *state;
        let mut ready = Vec::new();
        late.retain(|user_id| match users.get(user_id) {
            Some(wanted) if !wanted.live => true,
            Some(_) => {
                ready.push(user_id.to_string());
                false
            }
            None => false,
        });
        ready
    }

    /// How many channels are wanted.
    pub fn len(&self) -> usize {
        self.state().users.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINGER: Duration = Duration::from_secs(10);

    fn names(users: &[Arc<str>]) -> Vec<&str> {
        users.iter().map(AsRef::as_ref).collect()
    }

    /// The first connection queues the channel once; once subscribed it is live.
    #[test]
    fn first_connection_subscribes_once() {
        let interest = Interest::default();
        assert!(interest.want("ann"));
        assert!(interest.want("ann"), "still to be subscribed");
        assert!(interest.want("bob"));
        let batch = interest.to_subscribe(10);
        assert_eq!(names(&batch), ["ann", "bob"], "each queued once");
        interest.subscribed(&batch);
        assert!(interest.is_live("ann"));
        assert!(!interest.want("ann"), "live: nothing to wait for");
        assert!(interest.to_subscribe(10).is_empty());
    }

    /// Batches take at most `max`, oldest first.
    #[test]
    fn batches_are_bounded() {
        let interest = Interest::default();
        for user in ["a", "b", "c"] {
            interest.want(user);
        }
        assert_eq!(names(&interest.to_subscribe(2)), ["a", "b"]);
        assert_eq!(names(&interest.to_subscribe(2)), ["c"]);
    }

    /// A channel stays for the linger after the last connection, unless the user returns.
    #[test]
    fn linger_then_unsubscribe() {
        let interest = Interest::default();
        let start = Instant::now();
        interest.want("ann");
        interest.want("bob");
        interest.subscribed(&interest.to_subscribe(10));
        interest.idle("ann", start);
        interest.idle("bob", start);
        assert!(interest.expire(LINGER, start + LINGER / 2).is_empty());
        assert!(!interest.want("bob"), "back within the linger: still live");
        let expired = interest.expire(LINGER, start + LINGER);
        assert_eq!(names(&expired), ["ann"]);
        assert_eq!(interest.len(), 1);
        assert!(interest.want("ann"), "after expiry it is subscribed anew");
    }

    /// After a reconnect every wanted channel is subscribed again, and none counts as live.
    #[test]
    fn resubscribe_all_after_reconnect() {
        let interest = Interest::default();
        interest.want("ann");
        interest.subscribed(&interest.to_subscribe(10));
        interest.want("bob");
        let mut all = interest.resubscribe_all();
        all.sort();
        assert_eq!(names(&all), ["ann", "bob"]);
        assert!(!interest.is_live("ann"));
        assert!(
            interest.to_subscribe(10).is_empty(),
            "folded into the resubscription"
        );
        interest.subscribed(&all);
        assert!(interest.is_live("bob"));
    }

    /// A connection that stopped waiting is re-read for once its channel is subscribed.
    #[test]
    fn late_connections_are_reread_once_subscribed() {
        let interest = Interest::default();
        interest.want("ann");
        interest.late("ann");
        assert!(interest.take_late().is_empty(), "not subscribed yet");
        interest.subscribed(&interest.to_subscribe(10));
        assert_eq!(interest.take_late(), ["ann"]);
        assert!(interest.take_late().is_empty(), "once");
    }

    /// A user forgotten before their batch went out is not subscribed.
    #[test]
    fn expired_users_leave_the_queue() {
        let interest = Interest::default();
        let start = Instant::now();
        interest.want("ann");
        interest.idle("ann", start);
        assert_eq!(names(&interest.expire(LINGER, start + LINGER)), ["ann"]);
        assert!(interest.to_subscribe(10).is_empty());
    }
}
