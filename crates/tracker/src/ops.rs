//! Operations endpoints: `/healthz`, `/readyz`, `/metrics`.

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpResponse, web};

use serde::Serialize;
use tracker_projections::{ProjectionKind, ReadStore};
use tracker_store::Position;

use crate::error::ApiError;
use crate::metrics::ProjectionLabels;
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
}

/// Every projection's checkpoint and lag. Keys with no checkpoint yet are
/// reported at 0 for the whole projections.
pub async fn projection_status(
    read: &dyn ReadStore,
    head: Position,
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
    checkpoints.sort();
    Ok(checkpoints
        .into_iter()
        .map(|(projection, checkpoint)| ProjectionStatus {
            projection,
            checkpoint,
            lag: head.saturating_sub(checkpoint),
        })
        .collect())
}

/// The event store takes writes: safe to route deliveries here. The body
/// also says how far behind each projection is.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let projections = match state.store.head().await {
        Ok(head) => projection_status(&*state.read, head).await.ok(),
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
            match projection_status(&*state.read, head).await {
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
