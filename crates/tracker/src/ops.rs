//! Operations endpoints: `/healthz`, `/readyz`, `/metrics`.

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpResponse, web};

use crate::error::ApiError;
use crate::state::AppState;

/// The process is up and answering.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// The store takes writes: safe to route deliveries here.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match state.store.writable().await {
        Ok(()) => HttpResponse::Ok().json(serde_json::json!({ "status": "ready" })),
        Err(e) => HttpResponse::build(StatusCode::SERVICE_UNAVAILABLE)
            .json(serde_json::json!({ "status": "unavailable", "reason": e.to_string() })),
    }
}

pub async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    match state.store.head().await {
        Ok(head) => {
            state.metrics.store_head.set(head);
        }
        Err(e) => tracing::warn!(error = %e, "could not read the store head for /metrics"),
    }
    let text = state.metrics.encode().map_err(|e| ApiError::internal(&e))?;
    Ok(HttpResponse::Ok()
        .insert_header((
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ))
        .body(text))
}
