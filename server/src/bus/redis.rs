//! The Redis backend of the bus (`REDIS_URL` set): each committed change is published once on
//! `{prefix}:balance`; one subscriber connection per instance feeds the hub.
//!
//! Both connections reconnect with exponential backoff for ever. Until both are up and the
//! subscription is live the instance is *degraded*: changes still commit and reach this
//! instance's own clients. Both directions heal: on every (re)subscription the snapshots of
//! every user connected here are re-read in batches and handed to the hub; a change whose
//! publish failed is remembered and its user's snapshot published once Redis answers again
//! (`unpublished`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use app::wire::BalanceEvent;
use fred::prelude::{
    Builder, Client, ClientLike, Config, EventInterface, PubsubInterface, ReconnectPolicy,
};
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::unpublished::Unpublished;
use crate::{
    metrics::Metrics,
    realtime::{Update, hub::Hub},
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

/// Where to connect and which channel to use.
pub struct Settings<'a> {
    pub url: &'a str,
    pub password: Option<&'a str>,
    pub channel_prefix: &'a str,
}

/// The link of one instance to the others.
pub struct RedisLink {
    publisher: Client,
    /// A connection of its own: a subscribed connection can do nothing else.
    subscriber: Client,
    /// Whether the subscriber's current connection is subscribed: set once SUBSCRIBE
    /// succeeds, cleared as soon as that connection drops or is replaced.
    subscribed: AtomicBool,
    /// Changes the other instances may have missed, and their heal.
    unpublished: Unpublished,
    channel: String,
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
            subscribed: AtomicBool::new(false),
            unpublished: Unpublished::new(metrics.clone()),
            channel: format!("{}:balance", settings.channel_prefix),
            origin: uuid::Uuid::now_v7().to_string(),
            metrics,
        });
        // Take the event receivers before connecting so the first connection is seen too.
        let reconnects = link.subscriber.reconnect_rx();
        let errors = link.subscriber.error_rx();
        let messages = link.subscriber.message_rx();
        link.publisher.connect();
        link.subscriber.connect();
        tokio::spawn(Arc::clone(&link).follow_subscriber(
            reconnects,
            errors,
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

    /// Publishes `updates` in one round trip.
    pub(super) async fn send(
        &self,
        updates: impl Iterator<Item = &Update>,
    ) -> Result<(), PublishError> {
        let envelopes = updates.map(|update| {
            format!(
                r#"{{"origin":"{}","event":{}}}"#,
                self.origin,
                update.json.as_str()
            )
        });
        self.send_envelopes(envelopes).await
    }

    /// Asks every other instance to resync everyone it serves.
    pub(super) async fn send_resync(&self) -> Result<(), PublishError> {
        let envelope = format!(r#"{{"origin":"{}"}}"#, self.origin);
        self.send_envelopes(std::iter::once(envelope)).await
    }

    async fn send_envelopes(
        &self,
        envelopes: impl Iterator<Item = String>,
    ) -> Result<(), PublishError> {
        if !self.can_publish() {
            return Err(PublishError::NotConnected);
        }
        let pipeline = self.publisher.pipeline();
        for envelope in envelopes {
            // Only queues the command; `all` sends them.
            pipeline
                .publish::<(), _, _>(self.channel.as_str(), envelope)
                .await?;
        }
        pipeline.all::<Vec<i64>>().await?;
        Ok(())
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

    /// Follows the subscriber: a dropped connection is logged and unsubscribes; every
    /// (re)connection subscribes, then heals everyone connected here.
    async fn follow_subscriber(
        self: Arc<Self>,
        mut reconnects: broadcast::Receiver<fred::types::config::Server>,
        mut errors: broadcast::Receiver<(fred::error::Error, Option<fred::types::config::Server>)>,
        hub: Hub,
        store: Store,
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
                    if let Err(err) = self.subscriber.subscribe(self.channel.as_str()).await {
                        tracing::warn!(%err, "cannot subscribe to Redis; retrying on the next reconnect");
                        continue;
                    }
                    self.subscribed.store(true, Ordering::Release);
                    tracing::info!(channel = %self.channel, "subscribed to Redis");
                    resync(&hub, &store).await;
                }
            }
        }
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
                    resync(&hub, &store).await;
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let Some(text) = message.value.as_bytes() else {
                continue;
            };
            match serde_json::from_slice::<Envelope>(text) {
                Ok(envelope) if envelope.origin == self.origin => {}
                Ok(Envelope {
                    event: Some(event), ..
                }) => hub.deliver(Arc::new(Update::new(event))),
                Ok(Envelope { event: None, .. }) => resync(&hub, &store).await,
                Err(err) => tracing::warn!(%err, "ignoring a malformed message on the bus"),
            }
        }
    }
}

/// Re-reads the snapshots of every user connected here, in batches, and hands them to the
/// hub; each connection takes only what is newer than what it has.
async fn resync(hub: &Hub, store: &Store) {
    let users = hub.connected_users();
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
