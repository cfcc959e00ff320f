//! `POST /webhooks/toolzz/{token}`: check a delivery and append it as one
//! immutable event, answering 2xx only once it is durable.
//!
//! Checks run in this order, and the first that fails decides the answer:
//! method (405), token (401), content type (415), size (413), signature when
//! the source has one (401), JSON (400), delivery shape (422), institution
//! (403: not the source's, or none named by another slug and the source not
//! one for every institution). Every call, whatever its answer, goes to the
//! delivery log. The token is never logged: spans and the delivery log name
//! the source by its id.

use std::time::Instant;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderMap};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use serde::Serialize;
use tracing::Instrument as _;
use tracker_domain::delivery::ParsedDelivery;
use tracker_domain::{DeliveryError, SourceTimeZone, parse_delivery};
use tracker_store::delivery_log::DeliveryRecord;
use tracker_store::{AppendError, EventMetadata, ExpectedRevision, NewEvent};
use uuid::Uuid;

use crate::config::InstitutionScope;
use crate::error::ApiError;
use crate::signature::SignedHeaders;
use crate::sources::Source;
use crate::state::AppState;

/// The event a checked delivery is recorded as.
pub fn recorded_event(
    parsed: &ParsedDelivery,
    zone: &SourceTimeZone,
    metadata: EventMetadata,
) -> Result<NewEvent, serde_json::Error> {
    Ok(NewEvent {
        id: parsed.event_id(),
        event_type: parsed.event_type().to_owned(),
        schema_version: parsed.schema_version(),
        data: parsed.event_data(zone)?,
        metadata,
    })
}

/// The answer to an accepted delivery (also to a repeated one).
#[derive(Debug, Serialize)]
pub struct Accepted {
    pub event_id: Uuid,
    pub position: u64,
    pub duplicate: bool,
}

/// The request id: the caller's `X-Request-Id` when it is a sane token,
/// otherwise a new one. New ones are UUID v7 (time-ordered): the delivery
/// log indexes request ids, and ordered keys append to that index where
/// random ones (v4) dirtied a random page of it per delivery (written to
/// disk twice, at commit and at checkpoint: ~5 KB per delivery).
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| Uuid::now_v7().to_string())
}

/// What one call did, for the answer and the delivery log.
struct Handled {
    result: Result<Accepted, ApiError>,
    source_id: Option<String>,
    body: Vec<u8>,
    body_truncated: bool,
}

pub async fn receive(
    req: HttpRequest,
    token: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let received_at = Utc::now();
    let request_id = request_id(req.headers());
    let span = tracing::info_span!(
        "webhook",
        request_id = %request_id,
        source = tracing::field::Empty,
        institution = tracing::field::Empty,
    );
    async {
        let source = state.sources.find(&token);
        if let Some(source) = source {
            tracing::Span::current().record("source", source.id.as_str());
        }
        let handled = match source {
            None => Handled {
                result: Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unknown_token",
                    "the token in this webhook URL is not one of a configured source",
                )),
                source_id: None,
                body: Vec::new(),
                body_truncated: false,
            },
            Some(source) => {
                let mut handled = Handled {
                    result: Err(ApiError::unavailable()),
                    source_id: Some(source.id.clone()),
                    body: Vec::new(),
                    body_truncated: false,
                };
                handled.result = accept(
                    &req,
                    source,
                    payload,
                    &state,
                    &request_id,
                    received_at,
                    &mut handled,
                )
                .await;
                handled
            }
        };
        finish(&req, &state, handled, request_id.clone(), received_at).await
    }
    .instrument(span)
    .await
}

/// Any other method on the webhook URL.
pub async fn method_not_allowed(
    req: HttpRequest,
    token: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let handled = Handled {
        result: Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!(
                "{} is not allowed here; deliveries are POSTed",
                req.method()
            ),
        )),
        source_id: state.sources.find(&token).map(|s| s.id.clone()),
        body: Vec::new(),
        body_truncated: false,
    };
    let mut res = finish(&req, &state, handled, request_id(req.headers()), Utc::now()).await;
    res.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
    res
}

async fn accept(
    req: &HttpRequest,
    source: &Source,
    payload: web::Payload,
    state: &AppState,
    request_id: &str,
    received_at: DateTime<Utc>,
    handled: &mut Handled,
) -> Result<Accepted, ApiError> {
    check_content_type(req.headers())?;
    check_content_encoding(req.headers())?;
    // The headers had `client_request_timeout`; a body trickled in a byte
    // at a time would otherwise hold its handler and buffer for good.
    let read = read_body(req.headers(), payload, state.body_limit, handled);
    if let Ok(read) = tokio::time::timeout(state.body_timeout, read).await {
        read?;
    } else {
        handled.body_truncated = true;
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the body did not arrive within {} s of the headers",
                state.body_timeout.as_secs()
            ),
        ));
    }
    let body = handled.body.as_slice();

    if let Some(key) = &source.signing_key {
        let h = req.headers();
        let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
        let signed = SignedHeaders {
            id: get("webhook-id"),
            timestamp: get("webhook-timestamp"),
            signature: get("webhook-signature"),
        };
        key.verify(signed, body, Utc::now().timestamp())
            .map_err(|e| {
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid_signature", e.to_string())
            })?;
    }

    let parsed = parse_delivery(body, &state.zone).map_err(|e| match e {
        DeliveryError::NotJson(message) => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", message)
        }
        DeliveryError::Invalid {
            code,
            field,
            message,
        } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            code.as_str(),
            format!("{field} {message}"),
        )
        .with_field(field),
    })?;

    // Another slug may name no institution: only a source for every
    // institution may post that, since no institution vouches for it.
    let institution = parsed.institution_id();
    if let Some(id) = institution {
        tracing::Span::current().record("institution", id.get());
    }
    let allowed = match institution {
        Some(id) => source.institutions.allows(id),
        None => matches!(source.institutions, InstitutionScope::All),
    };
    if !allowed {
        let what = institution.map_or_else(
            || "a delivery whose data.institution.id is absent or not an id".to_owned(),
            |id| format!("institution {id}"),
        );
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_institution",
            format!("source {} may not post for {what}", source.id),
        )
        .with_field("data.institution.id"));
    }

    let metadata = EventMetadata {
        received_at,
        source_id: source.id.clone(),
        request_id: request_id.to_owned(),
        content_hash: parsed.content_hash.clone(),
    };
    let event =
        recorded_event(&parsed, &state.zone, metadata).map_err(|e| ApiError::internal(&e))?;

    let started = Instant::now();
    let outcome = state
        .store
        .append(&parsed.stream(), ExpectedRevision::Any, vec![event])
        .await;
    state
        .metrics
        .append_seconds
        .observe(started.elapsed().as_secs_f64());
    let outcome = outcome.map_err(|e| match e {
        AppendError::Store(e) => {
            tracing::warn!(error = %e, "event store refused a write");
            ApiError::unavailable()
        }
        other => ApiError::internal(&other),
    })?;
    let appended = outcome
        .events
        .first()
        .copied()
        .ok_or_else(|| ApiError::internal(&AppendError::Empty))?;
    if !appended.duplicate {
        state.metrics.events_appended.inc();
    }
    Ok(Accepted {
        event_id: appended.id,
        position: appended.position,
        duplicate: appended.duplicate,
    })
}

/// JSON, or nothing said. A sender that names another type gets 415.
fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "deliveries must be sent as application/json",
        ))
    }
}

/// The body as sent, or nothing said: a compressed body would otherwise be
/// refused as "not UTF-8", which does not say what is wrong. (The source
/// documents no compression; a signature covers the bytes as sent.)
fn check_content_encoding(headers: &HeaderMap) -> Result<(), ApiError> {
    let mut codings = headers
        .get_all(header::CONTENT_ENCODING)
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"));
    match codings.next() {
        None => Ok(()),
        Some(coding) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_encoding",
            format!("deliveries must be sent uncompressed, not with Content-Encoding {coding:?}"),
        )),
    }
}

/// Reads at most `limit` bytes into `handled.body`; past that, 413 (with the
/// first `limit` bytes kept for the delivery log).
async fn read_body(
    headers: &HeaderMap,
    mut payload: web::Payload,
    limit: usize,
    handled: &mut Handled,
) -> Result<(), ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than the {limit}-byte limit"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        handled.body_truncated = true;
        return Err(too_large());
    }
    let body = &mut handled.body;
    body.reserve(declared.unwrap_or(1024).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "unreadable_body", e.to_string())
        })?;
        let room = limit - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            handled.body_truncated = true;
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(())
}

/// Records the call in the delivery log and metrics, and builds the answer.
async fn finish(
    req: &HttpRequest,
    state: &AppState,
    handled: Handled,
    request_id: String,
    received_at: DateTime<Utc>,
) -> HttpResponse {
    let (status, reason, message, event_id, position) = match &handled.result {
        Ok(a) => (
            StatusCode::OK,
            if a.duplicate { "duplicate" } else { "accepted" },
            None,
            Some(a.event_id),
            Some(a.position),
        ),
        Err(e) => (e.status, e.code, Some(e.message.clone()), None, None),
    };
    state.metrics.delivery(reason, status.as_u16());
    // Every call is in the delivery log and the metrics; the log line for an
    // accepted one is debug so a burst of thousands a second does not turn
    // into thousands of synchronous writes to stderr.
    match &handled.result {
        Ok(_) => tracing::debug!(status = status.as_u16(), outcome = reason, "delivery"),
        Err(_) => tracing::warn!(
            status = status.as_u16(),
            outcome = reason,
            "delivery refused"
        ),
    }
    let record = DeliveryRecord {
        received_at,
        request_id: request_id.clone(),
        source_id: handled.source_id,
        remote_addr: req.peer_addr().map(|a| a.ip().to_string()),
        status: status.as_u16(),
        reason: Some(reason.to_owned()),
        message,
        event_id,
        position,
        body: handled.body,
        body_truncated: handled.body_truncated,
    };
    if let Err(e) = state.deliveries.record(record).await {
        // The event (if any) is already durable; losing a log line must not
        // turn an accepted delivery into a failure the sender would retry.
        tracing::error!(error = %e, "could not record delivery");
    }
    let mut res = match handled.result {
        Ok(accepted) => HttpResponse::Ok().json(accepted),
        Err(e) => e.error_response(),
    };
    if let Ok(v) = header::HeaderValue::from_str(&request_id) {
        res.headers_mut()
            .insert(header::HeaderName::from_static("x-request-id"), v);
    }
    res
}

#[cfg(test)]
mod tests {
    use actix_web::http::header::{HeaderName, HeaderValue};

    use super::*;

    #[test]
    fn a_sane_caller_request_id_is_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(
            HeaderName::from_static("x-request-id"),
            HeaderValue::from_static("toolzz-42.a_b"),
        );
        assert_eq!(request_id(&headers), "toolzz-42.a_b");
        headers.insert(
            HeaderName::from_static("x-request-id"),
            HeaderValue::from_static("no spaces"),
        );
        assert_ne!(request_id(&headers), "no spaces");
    }

    /// New request ids are the delivery log's index keys: they must come
    /// in increasing order so that they append to the index.
    #[test]
    fn new_request_ids_increase() {
        let headers = HeaderMap::new();
        let ids: Vec<String> = (0..2_000).map(|_| request_id(&headers)).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "not increasing");
        assert!(ids.iter().all(|id| Uuid::parse_str(id).is_ok()));
    }
}
