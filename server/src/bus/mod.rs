//! The event bus: carries every committed change to the hub of every instance.
//!
//! Delivery contract: `publish` is called once per committed change, after the commit. This
//! instance's hub gets the event directly, so its own clients see their changes whatever
//! happens to any link between instances; a cross-instance backend also forwards it to the
//! other instances, whose hubs drop anything not newer than what each connection has.

use std::sync::Arc;

use app::wire::BalanceEvent;

use crate::{
    metrics::Metrics,
    realtime::{Update, hub::Hub},
};

/// The bus of one instance; cheap to clone.
#[derive(Clone)]
pub struct Bus {
    hub: Hub,
    metrics: Metrics,
}

impl Bus {
    /// The in-process bus of a single instance (`REDIS_URL` unset).
    pub fn local(hub: Hub, metrics: Metrics) -> Self {
        Self { hub, metrics }
    }

    /// Hands a committed change to every connection of its user.
    pub fn publish(&self, event: BalanceEvent) {
        self.metrics.published();
        self.hub.deliver(Arc::new(Update::new(event)));
    }

    /// Why delivery is degraded right now; empty when healthy. The in-process bus never is.
    pub fn degraded_reasons(&self) -> Vec<&'static str> {
        Vec::new()
    }
}
