//! What every handler shares.

use std::sync::Arc;

use tracker_domain::SourceTimeZone;
use tracker_projections::ReadStore;
use tracker_store::EventStore;
use tracker_store::delivery_log::DeliveryLog;

use crate::metrics::Metrics;
use crate::projector::RunnerStates;
use crate::sources::Sources;

#[derive(Debug)]
pub struct AppState {
    pub store: Arc<dyn EventStore>,
    pub read: Arc<dyn ReadStore>,
    pub deliveries: DeliveryLog,
    pub sources: Sources,
    pub zone: SourceTimeZone,
    pub body_limit: usize,
    /// How long a webhook body may take to arrive.
    pub body_timeout: std::time::Duration,
    pub metrics: Arc<Metrics>,
    /// The projection runners of this process; `None` under
    /// `serve --no-projector`, where they run elsewhere.
    pub runners: Option<RunnerStates>,
}
