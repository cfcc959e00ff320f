//! Prometheus metrics, served as text at `/metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `accepted`, `duplicate`, or the error code of a refusal.
    pub outcome: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectionLabels {
    /// The checkpoint key, e.g. `institutions` or `learners@1/2`.
    pub projection: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub deliveries: Family<OutcomeLabels, Counter>,
    pub append_seconds: Histogram,
    pub events_appended: Counter,
    pub store_head: Gauge<u64, AtomicU64>,
    pub projection_checkpoint: Family<ProjectionLabels, Gauge<u64, AtomicU64>>,
    pub projection_lag: Family<ProjectionLabels, Gauge<u64, AtomicU64>>,
    pub projection_halted: Family<ProjectionLabels, Gauge<u64, AtomicU64>>,
    pub dead_letters: Gauge<u64, AtomicU64>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tracker");
        let deliveries = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook calls by outcome",
            deliveries.clone(),
        );
        // 50 µs .. ~1.6 s
        let append_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "append_duration_seconds",
            "Time from handing an event to the store until it is durable",
            append_seconds.clone(),
        );
        let events_appended = Counter::default();
        registry.register(
            "events_appended",
            "Events newly recorded in the event store (duplicates excluded)",
            events_appended.clone(),
        );
        let store_head = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "event_store_head_position",
            "Global position of the last recorded event",
            store_head.clone(),
        );
        let projection_checkpoint = Family::<ProjectionLabels, Gauge<u64, AtomicU64>>::default();
        registry.register(
            "projection_checkpoint_position",
            "Position of the last event each projection has covered",
            projection_checkpoint.clone(),
        );
        let projection_lag = Family::<ProjectionLabels, Gauge<u64, AtomicU64>>::default();
        registry.register(
            "projection_lag_events",
            "Events recorded but not yet covered by each projection",
            projection_lag.clone(),
        );
        let projection_halted = Family::<ProjectionLabels, Gauge<u64, AtomicU64>>::default();
        registry.register(
            "projection_halted",
            "1 when this process's runner of a projection has ended on its own (halted or failed; `/readyz` says why), 0 while it runs",
            projection_halted.clone(),
        );
        let dead_letters = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "projection_dead_letters",
            "Events the projections could not apply (see `tracker dead-letters`)",
            dead_letters.clone(),
        );
        Self {
            registry,
            projection_checkpoint,
            projection_lag,
            projection_halted,
            dead_letters,
            deliveries,
            append_seconds,
            events_appended,
            store_head,
        }
    }

    pub fn delivery(&self, outcome: &str, status: u16) {
        self.deliveries
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
                status,
            })
            .inc();
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
