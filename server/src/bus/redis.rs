//! The Redis backend of the bus (`REDIS_URL` set), SPEC §6.1: each committed change is
//! published once, on its user's channel `{prefix}:balance:{user_id}`, and an instance listens
//! only to the channels of the users connected to it ([`Interest`]), so what it receives
//! grows with the users it serves, not with every change everywhere. With a Redis Cluster
//! (`redis-cluster://…`) the channels are sharded (`SPUBLISH`/`SSUBSCRIBE`): each lives on
//! the node owning its slot, and fred keeps one subscriber connection per node.
//!
//! Both clients reconnect with exponential backoff for ever. Until both are up and every
//! wanted channel is subscribed the instance is *degraded*: changes still commit and reach
//! this instance's own clients. Both directions heal: after every (re)subscription the
//! snapshots of every user connected here are re-read in batches and handed to the hub; a
//! change whose publish failed is remembered and its user's snapshot published once Redis
//! answers again (`unpublished`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use app::wire::BalanceEvent;
use fred::prelude::{
    Builder, Client, ClientLike, Config, EventInterface, PubsubInterface, ReconnectPolicy,
};
use futures::future::BoxFuture;
use serde::Deserialize;
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::{interest::Interest, unpublished::Unpublished};
use crate::{
    metrics::Metrics,
    realtime::{
        Update,
        hub::{self, Hub},
    },
    store::Store,
};

/// Longest a publish may take; after it the change counts as unpublished and is healed.
const PUBLISH_TIMEOUT: Duration = Duration::from_millis(500);
/// Reconnect backoff: from 100 ms, doubling, up to 5 s.
const BACKOFF_MIN_MS: u32 = 100;
const BACKOFF_MAX_MS: u32 = 5_000;
/// Messages from Redis that may wait for the hub; other instances publish a whole group
/// commit at once, so bursts are the norm. Beyond it, the missed users are resynced.
const MESSAGE_BACKLOG: usize = 4096;
/// Users whose snapshots are re-read per query after an outage.
const RESYNC_BATCH: usize = 500;
/// Channels per `SUBSCRIBE` (plain Redis; sharded channels go one per `SSUBSCRIBE`).
const SUBSCRIBE_BATCH: usize = 500;
/// Longest a new connection waits for its user's channel before reading the snapshot; past
/// it the next resync heals whatever it missed.
const READY_TIMEOUT: Duration = Duration::from_secs(1);
/// How long after a failed subscription it is tried again.
const SUBSCRIBE_RETRY: Duration = Duration::from_millis(500);

/// What travels on the channel: the event and the instance that published it, so an
/// instance can skip its own publications (it delivered them locally already). Without an
/// event it asks every other instance to resync everyone it serves: its sender lost track
/// of some unpublished changes (see [`super::unpublished::MAX_USERS`]).
#[derive(Deserialize)]
struct Envelope {
    origin: String,
    event: Option<BalanceEvent>,
}

/// Why a publish did not reach Redis.
#[derive(Debug, thiserror::Error)]
pub(super) enum PublishError {
    #[error("not connected")]
    NotConnected,
    #[error(transparent)]
    Redis(#[from] fred::error::Error),
}

/// Where to connect and which channels to use.
pub struct Settings<'a> {
    pub url: &'a str,
    pub password: Option<&'a str>,
    pub channel_prefix: &'a str,
    /// How long a user's channel stays subscribed after their last connection here closed.
    pub linger: Duration,
}

/// The link of one instance to the others.
pub struct RedisLink {
    publisher: Client,
    /// A client of its own: a subscribed connection can do nothing else.
    subscriber: Client,
    /// Whether `REDIS_URL` names a cluster: user channels are then sharded.
    clustered: bool,
    /// Whether the subscriber's current connections listen to every wanted channel: set
    /// once they are subscribed, cleared as soon as a connection drops or is replaced.
    subscribed: AtomicBool,
    /// Set on every reconnect of the subscriber: every wanted channel is subscribed again.
    reconnected: AtomicBool,
    interest: Interest,
    /// Wakes the task that sends (un)subscriptions.
    wake: Notify,
    /// Bumped after each round of subscriptions, for connections waiting for theirs.
    rounds: watch::Sender<u64>,
    linger: Duration,
    /// Changes the other instances may have missed, and their heal.
    unpublished: Unpublished,
    prefix: String,
    origin: String,
    metrics: Metrics,
}

impl RedisLink {
    /// Starts connecting in the background and returns at once: an instance whose Redis is
    /// unreachable still starts, degraded, and keeps retrying.
    ///
    /// # Errors
    /// When the URL cannot be parsed.
    pub fn start(
        settings: &Settings<'_>,
        hub: Hub,
        store: Store,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, fred::error::Error> {
        let mut config = Config::from_url(settings.url)?;
        let clustered = config.server.is_clustered();
        if config.password.is_none() {
            config.password = settings.password.map(str::to_owned);
        }
        config.fail_fast = false;
        let mut builder = Builder::from_config(config);
        builder
            .set_policy(ReconnectPolicy::new_exponential(
                0,
                BACKOFF_MIN_MS,
                BACKOFF_MAX_MS,
                2,
            ))
            .with_performance_config(|perf| {
                perf.default_command_timeout = PUBLISH_TIMEOUT;
                perf.broadcast_channel_capacity = MESSAGE_BACKLOG;
            })
            .with_connection_config(|conn| {
                conn.connection_timeout = Duration::from_secs(2);
                conn.internal_command_timeout = Duration::from_secs(2);
            });
        let link = Arc::new(Self {
            publisher: builder.build()?,
            subscriber: builder.build()?,
            clustered,
            subscribed: AtomicBool::new(false),
            reconnected: AtomicBool::new(false),
            interest: Interest::default(),
            wake: Notify::new(),
            rounds: watch::channel(0).0,
            linger: settings.linger,
            unpublished: Unpublished::new(metrics.clone()),
            prefix: settings.channel_prefix.to_owned(),
            origin: uuid::Uuid::now_v7().to_string(),
            metrics,
        });
        hub.report_to(Arc::clone(&link) as Arc<dyn hub::Interest>);
        // Take the event receivers before connecting so the first connection is seen too.
        let reconnects = link.subscriber.reconnect_rx();
        let errors = link.subscriber.error_rx();
        let messages = link.subscriber.message_rx();
        link.publisher.connect();
        link.subscriber.connect();
        tokio::spawn(Arc::clone(&link).follow_subscriber(reconnects, errors, shutdown.clone()));
        tokio::spawn(Arc::clone(&link).manage_subscriptions(
            hub.clone(),
            store.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(Arc::clone(&link).forward(messages, hub, store.clone(), shutdown.clone()));
        let healer = Arc::clone(&link);
        tokio::spawn(async move { healer.unpublished.heal(&healer, &store, &shutdown).await });
        Ok(link)
    }

    /// Publishes committed changes to the other instances, in order, in one round trip.
    /// Changes that cannot be published (not connected, error, timeout) are remembered, and
    /// their users' snapshots published once Redis answers again.
    pub async fn publish(&self, updates: &[Arc<Update>]) {
        let Err(err) = self.send(updates.iter().map(Arc::as_ref)).await else {
            return;
        };
        match err {
            PublishError::NotConnected => tracing::debug!("Redis down: publish deferred"),
            PublishError::Redis(err) => tracing::warn!(
                %err,
                "publish to Redis failed; the other instances get these balances once it answers"
            ),
        }
        self.unpublished
            .note(updates.iter().map(|update| &update.event));
    }

    /// Publishes `updates`, each on its user's channel, in one round trip (per node).
    pub(super) async fn send(
        &self,
        updates: impl Iterator<Item = &Update>,
    ) -> Result<(), PublishError> {
        if !self.can_publish() {
            return Err(PublishError::NotConnected);
        }
        let pipeline = self.publisher.pipeline();
        let mut sent = 0;
        for update in updates {
            let channel = self.user_channel(&update.event.user_id);
            let envelope = format!(
                r#"{{"origin":"{}","event":{}}}"#,
                self.origin,
                update.json.as_str()
            );
            // Only queues the command; `all` sends them.
            if self.clustered {
                pipeline.spublish::<(), _, _>(channel, envelope).await?;
            } else {
                pipeline.publish::<(), _, _>(channel, envelope).await?;
            }
            sent += 1;
        }
        pipeline.all::<Vec<i64>>().await?;
        self.metrics.bus_sent(sent);
        Ok(())
    }

    /// Asks every other instance to resync everyone it serves, on the control channel that
    /// every instance listens to (a plain channel: a cluster carries it to every node).
    pub(super) async fn send_resync(&self) -> Result<(), PublishError> {
        if !self.can_publish() {
            return Err(PublishError::NotConnected);
        }
        let envelope = format!(r#"{{"origin":"{}"}}"#, self.origin);
        self.publisher
            .publish::<i64, _, _>(self.control_channel(), envelope)
            .await?;
        self.metrics.bus_sent(1);
        Ok(())
    }

    fn user_channel(&self, user_id: &str) -> String {
        format!("{}:balance:{user_id}", self.prefix)
    }

    fn control_channel(&self) -> String {
        format!("{}:control", self.prefix)
    }

    /// Whether the publishing connection is up.
    pub(super) fn can_publish(&self) -> bool {
        self.publisher.is_connected()
    }

    /// Waits up to `limit` for both connections and the subscription, so changes made as
    /// soon as the instance takes traffic reach the others at once. Says clearly when Redis
    /// is not there: the instance then serves degraded and keeps retrying.
    pub async fn wait_until_live(&self, limit: Duration) {
        let live = tokio::time::timeout(limit, async {
            while !self.is_healthy() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        if live.await.is_err() {
            tracing::warn!(
                "Redis unreachable at start-up: serving degraded (changes reach this instance's \
                 clients only) and retrying until it answers"
            );
        }
    }

    /// Whether cross-instance delivery works right now.
    pub fn is_healthy(&self) -> bool {
        self.can_publish()
            && self.subscriber.is_connected()
            && self.subscribed.load(Ordering::Acquire)
    }

    /// Follows the subscriber: a dropped connection is logged and degrades the link; every
    /// (re)connection has every wanted channel subscribed again, then everyone connected
    /// here healed ([`Self::manage_subscriptions`]).
    async fn follow_subscriber(
        self: Arc<Self>,
        mut reconnects: broadcast::Receiver<fred::types::config::Server>,
        mut errors: broadcast::Receiver<(fred::error::Error, Option<fred::types::config::Server>)>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                // fred reports a drop before the reconnection that follows it; taking errors
                // first keeps an old drop from clearing a newer subscription.
                biased;
                () = shutdown.cancelled() => return,
                error = errors.recv() => match error {
                    Ok((err, _)) => {
                        self.subscribed.store(false, Ordering::Release);
                        tracing::warn!(%err, "Redis unreachable: cross-instance delivery degraded, retrying");
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                next = reconnects.recv() => {
                    if matches!(next, Err(broadcast::error::RecvError::Closed)) {
                        return;
                    }
                    self.subscribed.store(false, Ordering::Release);
                    self.metrics.redis_reconnected();
                    self.reconnected.store(true, Ordering::Release);
                    self.wake.notify_one();
                }
            }
        }
    }

    /// The one task that sends (un)subscriptions, so they reach Redis in the order decided:
    /// after a reconnect every wanted channel again, then heals everyone connected here;
    /// channels past their linger; new users' channels, in batches.
    async fn manage_subscriptions(
        self: Arc<Self>,
        hub: Hub,
        store: Store,
        shutdown: CancellationToken,
    ) {
        let mut sweep = tokio::time::interval((self.linger / 4).max(Duration::from_millis(100)));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                _ = sweep.tick() => {}
            }
            if self.reconnected.swap(false, Ordering::AcqRel) {
                let wanted = self.interest.resubscribe_all();
                let listening = match self.subscriber.subscribe(self.control_channel()).await {
                    Ok(()) => self.listen(&wanted, true).await,
                    Err(err) => Err(err),
                };
                match listening {
                    Ok(()) => {
                        // Everyone connected is resynced below, the late included.
                        self.interest.take_late();
                        self.interest.subscribed(&wanted);
                        self.subscribed.store(true, Ordering::Release);
                        tracing::info!(channels = wanted.len(), "subscribed to Redis");
                        let (hub, store, metrics) =
                            (hub.clone(), store.clone(), self.metrics.clone());
                        tokio::spawn(async move { resync(&hub, &store, &metrics).await });
                    }
                    Err(err) => self.retry_later(&err).await,
                }
            }
            let expired = self.interest.expire(self.linger, Instant::now());
            if !expired.is_empty() {
                // A failure leaves channels nobody wants: their messages are dropped here.
                if let Err(err) = self.listen(&expired, false).await {
                    tracing::debug!(%err, "unsubscribing lingering channels failed");
                }
            }
            while self.subscribed.load(Ordering::Acquire) {
                let batch = self.interest.to_subscribe(SUBSCRIBE_BATCH);
                if batch.is_empty() {
                    break;
                }
                match self.listen(&batch, true).await {
                    Ok(()) => self.interest.subscribed(&batch),
                    Err(err) => {
                        self.subscribed.store(false, Ordering::Release);
                        self.retry_later(&err).await;
                    }
                }
            }
            // Connections that stopped waiting for their channel (READY_TIMEOUT) get what was
            // committed before it was subscribed.
            let late = self.interest.take_late();
            if !late.is_empty() {
                let (hub, store) = (hub.clone(), store.clone());
                tokio::spawn(async move { resync_users(&hub, &store, &late).await });
            }
            self.metrics.bus_channels(self.interest.len());
            self.rounds.send_modify(|round| *round += 1);
        }
    }

    /// A subscription failed on a live connection: subscribe everything again shortly.
    async fn retry_later(&self, err: &fred::error::Error) {
        tracing::warn!(%err, "cannot subscribe to Redis; retrying");
        tokio::time::sleep(SUBSCRIBE_RETRY).await;
        self.reconnected.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Subscribes to (`on`) or unsubscribes from the channels of `users` in as few commands
    /// as allowed: a batch per command on one Redis, one sharded channel per command on a
    /// cluster (the channels of one command must share a slot).
    async fn listen(&self, users: &[Arc<str>], on: bool) -> Result<(), fred::error::Error> {
        let channels: Vec<String> = users.iter().map(|user| self.user_channel(user)).collect();
        let per_command = if self.clustered { 1 } else { SUBSCRIBE_BATCH };
        for batch in channels.chunks(per_command) {
            let batch = batch.to_vec();
            match (self.clustered, on) {
                (true, true) => self.subscriber.ssubscribe(batch).await?,
                (true, false) => self.subscriber.sunsubscribe(batch).await?,
                (false, true) => self.subscriber.subscribe(batch).await?,
                (false, false) => self.subscriber.unsubscribe(batch).await?,
            }
        }
        Ok(())
    }

    /// Hands every other instance's publications to the local hub.
    async fn forward(
        self: Arc<Self>,
        mut messages: broadcast::Receiver<fred::types::Message>,
        hub: Hub,
        store: Store,
        shutdown: CancellationToken,
    ) {
        loop {
            let message = tokio::select! {
                message = messages.recv() => message,
                () = shutdown.cancelled() => return,
            };
            let message = match message {
                Ok(message) => message,
                // Missed messages are healed like an outage: balances are absolute.
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "fell behind the bus; resyncing connected users");
                    resync(&hub, &store, &self.metrics).await;
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            self.metrics.bus_received();
            let Some(text) = message.value.as_bytes() else {
                continue;
            };
            match serde_json::from_slice::<Envelope>(text) {
                Ok(envelope) if envelope.origin == self.origin => {}
                Ok(Envelope {
                    event: Some(event), ..
                }) => hub.deliver(Arc::new(Update::new(event))),
                Ok(Envelope { event: None, .. }) => resync(&hub, &store, &self.metrics).await,
                Err(err) => tracing::warn!(%err, "ignoring a malformed message on the bus"),
            }
        }
    }
}

impl hub::Interest for RedisLink {
    fn ready<'a>(&'a self, user_id: &'a str) -> BoxFuture<'a, ()> {
        let mut rounds = self.rounds.subscribe();
        if self.interest.want(user_id) {
            self.wake.notify_one();
        }
        Box::pin(async move {
            let live = async {
                // While degraded nothing is subscribed; the resync after the reconnect heals.
                while self.subscribed.load(Ordering::Acquire) && !self.interest.is_live(user_id) {
                    if rounds.changed().await.is_err() {
                        return;
                    }
                }
            };
            if tokio::time::timeout(READY_TIMEOUT, live).await.is_err() {
                self.interest.late(user_id);
            }
        })
    }

    fn idle(&self, user_id: &str) {
        self.interest.idle(user_id, Instant::now());
    }
}

/// Re-reads the snapshots of every user connected here, in batches, and hands them to the
/// hub; each connection takes only what is newer than what it has.
async fn resync(hub: &Hub, store: &Store, metrics: &Metrics) {
    metrics.resynced();
    resync_users(hub, store, &hub.connected_users()).await;
}

/// Re-reads the snapshots of `users`, in batches, and hands them to the hub.
async fn resync_users(hub: &Hub, store: &Store, users: &[String]) {
    for batch in users.chunks(RESYNC_BATCH) {
        match store.snapshots(batch).await {
            Ok(snapshots) => {
                for snapshot in snapshots {
                    hub.deliver(Arc::new(Update::new(BalanceEvent::snapshot(snapshot))));
                }
            }
            Err(err) => tracing::warn!(%err, "resync failed"),
        }
    }
}
