//! The event bus: carries every committed change to the hub of every instance.
//!
//! Delivery contract: `publish` is called once per committed change, after the commit. This
//! instance's hub gets the event first and directly, so its own clients see their changes
//! whatever happens to the link between instances; with Redis configured the event is also
//! published to the other instances, whose hubs drop anything not newer than what each
//! connection already has. Nothing is dropped silently: a change whose publish fails (Redis
//! down, error, timeout) is remembered by user, and that user's snapshot is published once
//! Redis answers, so the other instances' clients catch up within seconds (`redis`).
//! Transports only ever talk to the hub.

mod interest;
mod redis;
mod unpublished;

use std::{sync::Arc, time::Duration};

use app::wire::BalanceEvent;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::redis::RedisLink;
pub use self::redis::Settings as RedisSettings;
use crate::{
    metrics::Metrics,
    realtime::{Update, hub::Hub},
    store::Store,
};

/// Most changes published in one round trip to Redis.
const PUBLISH_BATCH: usize = 256;

/// The bus of one instance; cheap to clone.
#[derive(Clone)]
pub struct Bus {
    hub: Hub,
    metrics: Metrics,
    redis: Option<Arc<RedisLink>>,
}

impl Bus {
    /// The in-process bus of a single instance (`REDIS_URL` unset).
    pub fn local(hub: Hub, metrics: Metrics) -> Self {
        Self {
            hub,
            metrics,
            redis: None,
        }
    }

    /// A bus that also links this instance to the others through Redis. Connecting happens
    /// in the background; until it succeeds and the subscription is live the instance is
    /// degraded, not down.
    ///
    /// # Errors
    /// When the Redis URL cannot be parsed.
    pub fn redis(
        settings: &RedisSettings<'_>,
        hub: Hub,
        store: Store,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Result<Self, fred::error::Error> {
        let link = RedisLink::start(settings, hub.clone(), store, metrics.clone(), shutdown)?;
        Ok(Self {
            hub,
            metrics,
            redis: Some(link),
        })
    }

    /// Publishes every committed change `commits` yields, in the order committed, so each
    /// user's changes reach every instance in version order. Changes that wait are published
    /// together, in one round trip to Redis. Ends when the store is gone.
    pub fn publish_commits(&self, mut commits: mpsc::Receiver<BalanceEvent>) {
        let bus = self.clone();
        tokio::spawn(async move {
            let mut events = Vec::new();
            while commits.recv_many(&mut events, PUBLISH_BATCH).await > 0 {
                bus.publish(events.drain(..)).await;
            }
        });
    }

    /// Hands committed changes to every connection of their users, here and elsewhere.
    async fn publish(&self, events: impl Iterator<Item = BalanceEvent>) {
        let updates: Vec<Arc<Update>> = events
            .map(|event| {
                self.metrics.published();
                let update = Arc::new(Update::new(event));
                self.hub.deliver(Arc::clone(&update));
                update
            })
            .collect();
        if let Some(redis) = &self.redis {
            redis.publish(&updates).await;
        }
    }

    /// Waits up to `limit` for the link to the other instances to be live; at once without
    /// Redis. Start-up calls it before taking traffic; past `limit` the instance serves
    /// degraded and the link keeps retrying.
    pub async fn wait_until_live(&self, limit: Duration) {
        if let Some(redis) = &self.redis {
            redis.wait_until_live(limit).await;
        }
    }

    /// Why delivery is degraded right now; empty when healthy.
    pub fn degraded_reasons(&self) -> Vec<&'static str> {
        match &self.redis {
            Some(redis) if !redis.is_healthy() => vec!["redis"],
            _ => Vec::new(),
        }
    }
}
