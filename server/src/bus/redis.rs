//! The Redis backend of the bus (`REDIS_URL` set): each committed change is published once on
//! `{prefix}:balance`; one subscriber connection per instance feeds the hub.
//!
//! Both connections reconnect with exponential backoff for ever. While either is down the
//! instance is *degraded*: changes still commit and reach this instance's own clients, but
//! not the others'. On every (re)subscription the snapshots of every user connected here are
//! re-read in batches and handed to the hub, so nobody stays stale after an outage.

use std::{sync::Arc, time::Duration};

use app::wire::BalanceEvent;
use fred::prelude::{
    Builder, Client, ClientLike, Config, EventInterface, PubsubInterface, ReconnectPolicy,
};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::Metrics,
    realtime::{Update, hub::Hub},
    store::Store,
};

/// Longest a publish may delay a change's answer; after it the event is only local.
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
/// instance can skip its own publications (it delivered them locally already).
#[derive(Deserialize)]
struct Envelope {
    origin: String,
    event: BalanceEvent,
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
    channel: String,
    origin: String,
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
            channel: format!("{}:balance", settings.channel_prefix),
            origin: uuid::Uuid::now_v7().to_string(),
        });
        // Take the event receivers before connecting so the first connection is seen too.
        let reconnects = link.subscriber.reconnect_rx();
        let messages = link.subscriber.message_rx();
        let errors = link.subscriber.error_rx();
        link.publisher.connect();
        link.subscriber.connect();
        tokio::spawn(Arc::clone(&link).resubscribe_on_reconnect(
            reconnects,
            hub.clone(),
            store.clone(),
            metrics,
            shutdown.clone(),
        ));
        tokio::spawn(Arc::clone(&link).forward(messages, hub, store, shutdown.clone()));
        tokio::spawn(log_errors(errors, shutdown));
        tokio::spawn(Arc::clone(&link).report_unreachable_start());
        Ok(link)
    }

    /// Publishes committed changes to the other instances, in order, in one round trip.
    /// Failures only degrade delivery: the changes are committed and were delivered locally;
    /// the next resync heals the rest.
    pub async fn publish(&self, updates: &[Arc<Update>]) {
        if !self.publisher.is_connected() {
            return;
        }
        let pipeline = self.publisher.pipeline();
        for update in updates {
            let payload = format!(
                r#"{{"origin":"{}","event":{}}}"#,
                self.origin,
                update.json.as_str()
            );
            // Only queues the command; `all` sends them.
            if let Err(err) = pipeline
                .publish::<(), _, _>(self.channel.as_str(), payload)
                .await
            {
                tracing::warn!(%err, "cannot queue a publish to Redis");
                return;
            }
        }
        if let Err(err) = pipeline.all::<Vec<i64>>().await {
            tracing::warn!(%err, "publish to Redis failed; the changes reached local clients only");
        }
    }

    /// Says once, clearly, when Redis is not there at start-up: the instance serves anyway.
    async fn report_unreachable_start(self: Arc<Self>) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !self.is_healthy() {
            tracing::warn!(
                "Redis unreachable at start-up: serving degraded (changes reach this instance's \
                 clients only) and retrying until it answers"
            );
        }
    }

    /// Whether cross-instance delivery works right now.
    pub fn is_healthy(&self) -> bool {
        self.publisher.is_connected() && self.subscriber.is_connected()
    }

    /// On every (re)connection: subscribe, then heal everyone connected here.
    async fn resubscribe_on_reconnect(
        self: Arc<Self>,
        mut reconnects: tokio::sync::broadcast::Receiver<fred::types::config::Server>,
        hub: Hub,
        store: Store,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                next = reconnects.recv() => {
                    if matches!(next, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                        return;
                    }
                }
                () = shutdown.cancelled() => return,
            }
            metrics.redis_reconnected();
            if let Err(err) = self.subscriber.subscribe(self.channel.as_str()).await {
                tracing::warn!(%err, "cannot subscribe to Redis; retrying on the next reconnect");
                continue;
            }
            tracing::info!(channel = %self.channel, "subscribed to Redis");
            resync(&hub, &store).await;
        }
    }

    /// Hands every other instance's publications to the local hub.
    async fn forward(
        self: Arc<Self>,
        mut messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
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
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "fell behind the bus; resyncing connected users");
                    resync(&hub, &store).await;
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let Some(text) = message.value.as_bytes() else {
                continue;
            };
            match serde_json::from_slice::<Envelope>(text) {
                Ok(envelope) if envelope.origin != self.origin => {
                    hub.deliver(Arc::new(Update::new(envelope.event)));
                }
                Ok(_) => {}
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

async fn log_errors(
    mut errors: tokio::sync::broadcast::Receiver<(
        fred::error::Error,
        Option<fred::types::config::Server>,
    )>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            error = errors.recv() => match error {
                Ok((err, _)) => tracing::warn!(%err, "Redis unreachable: cross-instance delivery degraded, retrying"),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            () = shutdown.cancelled() => return,
        }
    }
}
