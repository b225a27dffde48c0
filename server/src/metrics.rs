//! Prometheus metrics of one instance, served as text at `GET /metrics`: open connections by
//! transport, events published and delivered, the commit→send delay, refusals by reason, and
//! the allocator's live heap beside what it keeps resident.

use std::sync::Arc;

use app::wire::paths;
use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use chrono::Utc;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{AppState, realtime::hub::Transport};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The instance's metrics; cheap to clone, safe to update from any task.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    connections: Family<TransportLabel, Gauge>,
    published: Counter,
    delivered: Family<TransportLabel, Counter>,
    delay: Histogram,
    refusals: Family<ReasonLabel, Counter>,
    redis_reconnects: Counter,
    publishes_failed: Counter,
    heals_published: Counter,
    bus_sent: Counter,
    bus_received: Counter,
    bus_channels: Gauge,
    resyncs: Counter,
    heap_allocated: Gauge,
    heap_resident: Gauge,
    heap_metadata: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("livecredits");
        let connections = Family::<TransportLabel, Gauge>::default();
        let published = Counter::default();
        let delivered = Family::<TransportLabel, Counter>::default();
        // 0.25 ms to ~4 s: the targets are milliseconds, the tail must still be visible.
        let delay = Histogram::new(exponential_buckets(0.000_25, 2.0, 15));
        let refusals = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "connections",
            "Open connections by transport",
            connections.clone(),
        );
        registry.register(
            "events_published",
            "Committed changes handed to the bus by this instance",
            published.clone(),
        );
        registry.register(
            "events_delivered",
            "Balance events sent to clients, by transport",
            delivered.clone(),
        );
        registry.register(
            "delivery_delay_seconds",
            "Time from a change's commit to its send to a client",
            delay.clone(),
        );
        registry.register(
            "refusals",
            "Refused requests and connections, by reason",
            refusals.clone(),
        );
        let redis_reconnects = Counter::default();
        registry.register(
            "redis_connects",
            "Successful (re)connections of the Redis subscriber",
            redis_reconnects.clone(),
        );
        let publishes_failed = Counter::default();
        registry.register(
            "publishes_failed",
            "Committed changes that could not be published to Redis, healed later",
            publishes_failed.clone(),
        );
        let heals_published = Counter::default();
        registry.register(
            "heals_published",
            "Snapshots published to Redis to heal changes whose publish failed",
            heals_published.clone(),
        );
        let bus_sent = Counter::default();
        registry.register(
            "bus_messages_sent",
            "Messages this instance published to Redis",
            bus_sent.clone(),
        );
        let bus_received = Counter::default();
        registry.register(
            "bus_messages_received",
            "Messages this instance received from Redis, its own included",
            bus_received.clone(),
        );
        let bus_channels = Gauge::default();
        registry.register(
            "bus_channels",
            "Users' Redis channels this instance is subscribed to or about to be",
            bus_channels.clone(),
        );
        let resyncs = Counter::default();
        registry.register(
            "resyncs",
            "Times every connected user's snapshot was re-read (after a reconnect, a lag or a request)",
            resyncs.clone(),
        );
        // Live bytes beside resident ones tell a leak (both grow) from memory the allocator
        // keeps in partly used pages (only resident grows).
        let heap_allocated = Gauge::default();
        registry.register(
            "heap_allocated_bytes",
            "Bytes the process has allocated and not freed (jemalloc stats.allocated)",
            heap_allocated.clone(),
        );
        let heap_resident = Gauge::default();
        registry.register(
            "heap_resident_bytes",
            "Bytes in pages the allocator keeps resident (jemalloc stats.resident)",
            heap_resident.clone(),
        );
        let heap_metadata = Gauge::default();
        registry.register(
            "heap_metadata_bytes",
            "Bytes of the allocator's own bookkeeping, part of the resident ones (jemalloc stats.metadata)",
            heap_metadata.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                connections,
                published,
                delivered,
                delay,
                refusals,
                redis_reconnects,
                publishes_failed,
                heals_published,
                bus_sent,
                bus_received,
                bus_channels,
                resyncs,
                heap_allocated,
                heap_resident,
                heap_metadata,
            }),
        }
    }
}

impl Metrics {
    pub fn opened(&self, transport: Transport) {
        self.connection_gauge(transport).inc();
    }

    pub fn closed(&self, transport: Transport) {
        self.connection_gauge(transport).dec();
    }

    fn connection_gauge(&self, transport: Transport) -> Gauge {
        self.inner
            .connections
            .get_or_create(&TransportLabel {
                transport: transport.name(),
            })
            .clone()
    }

    /// Open connections across all transports.
    pub fn open_connections(&self) -> i64 {
        [Transport::WebSocket, Transport::Sse, Transport::Poll]
            .into_iter()
            .map(|transport| self.connection_gauge(transport).get())
            .sum()
    }

    pub fn published(&self) {
        self.inner.published.inc();
    }

    /// Counts one event sent over `transport` and its delay since the commit at `committed`.
    pub fn delivered(&self, transport: Transport, committed: Option<chrono::DateTime<Utc>>) {
        self.inner
            .delivered
            .get_or_create(&TransportLabel {
                transport: transport.name(),
            })
            .inc();
        if let Some(committed) = committed {
            let delay = (Utc::now() - committed).as_seconds_f64().max(0.0);
            self.inner.delay.observe(delay);
        }
    }

    pub fn refused(&self, reason: &'static str) {
        self.inner
            .refusals
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn redis_reconnected(&self) {
        self.inner.redis_reconnects.inc();
    }

    pub fn publishes_failed(&self, events: usize) {
        self.inner.publishes_failed.inc_by(events as u64);
    }

    pub fn heals_published(&self, snapshots: usize) {
        self.inner.heals_published.inc_by(snapshots as u64);
    }

    pub fn bus_sent(&self, messages: usize) {
        self.inner.bus_sent.inc_by(messages as u64);
    }

    pub fn bus_received(&self) {
        self.inner.bus_received.inc();
    }

    pub fn bus_channels(&self, channels: usize) {
        self.inner
            .bus_channels
            .set(i64::try_from(channels).unwrap_or(i64::MAX));
    }

    pub fn resynced(&self) {
        self.inner.resyncs.inc();
    }

    fn render(&self) -> String {
        self.read_heap();
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.inner.registry);
        text
    }

    /// Reads jemalloc's statistics, which it refreshes only when its epoch is advanced.
    fn read_heap(&self) {
        use tikv_jemalloc_ctl::{epoch, stats};
        if epoch::advance().is_err() {
            return;
        }
        let gauge = |gauge: &Gauge, bytes: Result<usize, _>| {
            if let Ok(bytes) = bytes {
                gauge.set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
        };
        gauge(&self.inner.heap_allocated, stats::allocated::read());
        gauge(&self.inner.heap_resident, stats::resident::read());
        gauge(&self.inner.heap_metadata, stats::metadata::read());
    }
}

/// `GET /metrics`.
pub fn router() -> Router<AppState> {
    Router::new().route(paths::METRICS, get(metrics))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
