//! Operations endpoints: `/healthz`, `/readyz`, `/metrics`.

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpResponse, web};

use serde::Serialize;
use std::collections::BTreeMap;
use tracker_projections::{ProjectionKind, ReadStore};
use tracker_store::Position;

use crate::error::ApiError;
use crate::metrics::ProjectionLabels;
use crate::projector::RunnerStates;
use crate::state::AppState;

/// The process is up and answering.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// Where each projection stands against the log.
#[derive(Debug, Serialize)]
pub struct ProjectionStatus {
    pub projection: String,
    pub checkpoint: Position,
    pub lag: u64,
    /// What a runner of this process ended with (a halt under
    /// `on_error = "stop"`, a failure); absent while it runs, and for
    /// projections this process does not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub halted: Option<String>,
}

/// Every projection's checkpoint and lag, and whether this process's runner
/// of it halted. Keys with no checkpoint yet are reported at 0 for the whole
/// projections, and for a runner that halted before its first.
pub async fn projection_status(
    read: &dyn ReadStore,
    head: Position,
    runners: Option<&RunnerStates>,
) -> Result<Vec<ProjectionStatus>, tracker_projections::ReadStoreError> {
    let mut checkpoints = read.checkpoints().await?;
    for kind in ProjectionKind::ALL {
        let has_any = checkpoints
            .iter()
            .any(|(k, _)| k == kind.name() || k.starts_with(&format!("{}@", kind.name())));
        if !has_any {
            checkpoints.push((kind.name().to_owned(), 0));
        }
    }
    let mut halts: BTreeMap<String, String> = runners
        .map(RunnerStates::snapshot)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(key, state)| Some((key, state?)))
        .collect();
    for key in halts.keys() {
        if !checkpoints.iter().any(|(k, _)| k == key) {
            checkpoints.push((key.clone(), 0));
        }
    }
    checkpoints.sort();
    Ok(checkpoints
        .into_iter()
        .map(|(projection, checkpoint)| ProjectionStatus {
            halted: halts.remove(&projection),
            projection,
            checkpoint,
            lag: head.saturating_sub(checkpoint),
        })
        .collect())
}

/// The event store takes writes: safe to route deliveries here. The body
/// also says how far behind each projection is, and which of this process's
/// runners halted (deliveries are still taken then, and kept for the
/// projection to catch up once restarted).
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let projections = match state.store.head().await {
        Ok(head) => projection_status(&*state.read, head, state.runners.as_ref())
            .await
            .ok(),
        Err(_) => None,
    };
    match state.store.writable().await {
        Ok(()) => HttpResponse::Ok()
            .json(serde_json::json!({ "status": "ready", "projections": projections })),
        Err(e) => HttpResponse::build(StatusCode::SERVICE_UNAVAILABLE).json(serde_json::json!({
            "status": "unavailable",
            "reason": e.to_string(),
            "projections": projections,
        })),
    }
}

pub async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    match state.store.head().await {
        Ok(head) => {
            state.metrics.store_head.set(head);
            match projection_status(&*state.read, head, state.runners.as_ref()).await {
                Ok(statuses) => {
                    for s in statuses {
                        let labels = ProjectionLabels {
                            projection: s.projection,
                        };
                        state
                            .metrics
                            .projection_checkpoint
                            .get_or_create(&labels)
                            .set(s.checkpoint);
                        state
                            .metrics
                            .projection_lag
                            .get_or_create(&labels)
                            .set(s.lag);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not read projection checkpoints for /metrics")
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read the store head for /metrics"),
    }
    for (projection, ended) in state.runners.iter().flat_map(RunnerStates::snapshot) {
        state
            .metrics
            .projection_halted
            .get_or_create(&ProjectionLabels { projection })
            .set(u64::from(ended.is_some()));
    }
    match state.read.dead_letter_count().await {
        Ok(n) => {
            state.metrics.dead_letters.set(n);
        }
        Err(e) => tracing::warn!(error = %e, "could not count dead letters for /metrics"),
    }
    let text = state.metrics.encode().map_err(|e| ApiError::internal(&e))?;
    Ok(HttpResponse::Ok()
        .insert_header((
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ))
        .body(text))
}
