//! Raw recorded events, straight from the event log (not the read models),
//! for audits: an institution's events, or one learner's stream.
//!
//! JSON and CSV answers are pages; `Accept: application/x-ndjson` streams
//! the whole range instead, reading the log in chunks and writing each as
//! it is read, so an export of any size runs in constant memory (and a slow
//! reader slows the reading, through the socket's backpressure).
//!
//! The global log is filtered by stream name: every event of institution
//! `I` is in `learner-I-{user}` or `institution-I`, so no event of another
//! institution can appear.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tracker_store::{EventStore, Position, ReadAll, RecordedEvent, StoreError};
use utoipa::{IntoParams, IntoResponses};

use super::dto::{self, ErrorBody};
use super::params::{self, CursorKey, CursorScope, decode_cursor, encode_cursor};
use super::{ApiContext, Failure, Format, negotiate};
use crate::error::ApiError;

/// Events read from the log per query.
pub const CHUNK: usize = 1_000;
/// Most events one JSON or CSV page reads, matching or not: a page of a
/// sparse filter may come back short (or empty) with a cursor to go on.
pub const SCAN_BUDGET: usize = 10_000;

/// Errors of the raw-event endpoints.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum EventErrors {
    /// A parameter is malformed, unknown or out of range (`field` names it).
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No API key, or not a configured one.
    #[response(
        status = 401,
        headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"tracker\"`"))
    )]
    Unauthorized(ErrorBody),
    /// The key does not hold this institution. Nothing of it is read.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// `learner_not_found`: the log holds no event of this learner.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The event log cannot be read right now.
    #[response(status = 503, headers(("Retry-After" = u64, description = "Seconds.")))]
    Unavailable(ErrorBody),
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Events per page (default 50; ignored by NDJSON exports, which hold
    /// the whole range).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page (NDJSON: resume after it).
    #[param(min_length = 1, pattern = r"^[A-Za-z0-9_-]+$")]
    cursor: Option<String>,
    /// Only events at or after this log position.
    from_position: Option<u64>,
    /// Only events at or before this log position.
    to_position: Option<u64>,
    /// Only events received at or after this instant (RFC 3339).
    from: Option<DateTime<Utc>>,
    /// Only events received before this instant (RFC 3339, exclusive).
    to: Option<DateTime<Utc>>,
}

/// Which events of the log an answer holds.
#[derive(Debug, Clone)]
struct Filter {
    /// `learner-{institution}-`, or `None` for one learner's stream.
    learner_prefix: Option<String>,
    institution_stream: String,
    from_position: Position,
    to_position: Position,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
}

impl Filter {
    fn matches(&self, e: &RecordedEvent) -> bool {
        let stream_ok = match &self.learner_prefix {
            Some(prefix) => e.stream.starts_with(prefix) || e.stream == self.institution_stream,
            None => true,
        };
        stream_ok
            && e.position >= self.from_position
            && e.position <= self.to_position
            && self.from.is_none_or(|t| e.metadata.received_at >= t)
            && self.to.is_none_or(|t| e.metadata.received_at < t)
    }
}

/// Where events come from: the global log, or one stream.
#[derive(Debug, Clone)]
enum Source {
    All,
    Stream(String),
}

/// One chunk read: the events and the cursor after them (a position for
/// the log, a revision for a stream). Empty at the end.
async fn read_chunk(
    store: &dyn EventStore,
    source: &Source,
    after: u64,
    limit: usize,
) -> Result<(Vec<RecordedEvent>, u64), StoreError> {
    match source {
        Source::All => {
            let events = store
                .read_all(ReadAll {
                    from: after + 1,
                    limit,
                })
                .await?;
            let next = events.last().map_or(after, |e| e.position);
            Ok((events, next))
        }
        Source::Stream(stream) => {
            let events = store.read_stream(stream, after, limit).await?;
            let next = events.last().map_or(after, |e| e.revision + 1);
            Ok((events, next))
        }
    }
}

fn store_unavailable(e: &StoreError) -> Failure {
    tracing::warn!(error = %e, "event log read failed");
    Failure::from(ApiError::new(
        actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the event log cannot be read right now; retry later",
    ))
}

struct Request {
    source: Source,
    filter: Filter,
    scope: CursorScope,
    /// First cursor value to read after.
    after: u64,
    limit: usize,
}

fn parse(req: &HttpRequest, ctx: &ApiContext, learner: bool) -> Result<(Request, Format), Failure> {
    let key = ctx.keys.authenticate(req.headers())?;
    let institution = params::institution(req)?;
    key.check(institution)?;
    let q: EventsQuery = params::query(req)?;
    let user = if learner {
        Some(params::path_id(req, "user_id")?)
    } else {
        None
    };
    let limit = params::limit(q.limit)?;
    if let (Some(a), Some(b)) = (q.from_position, q.to_position)
        && a > b
    {
        return Err(Failure::bad_request(
            "from_position",
            "invalid_range",
            format!("from_position ({a}) is after to_position ({b})"),
        ));
    }
    if let (Some(a), Some(b)) = (q.from, q.to)
        && a > b
    {
        return Err(Failure::bad_request(
            "from",
            "invalid_range",
            format!("from ({a}) is after to ({b})"),
        ));
    }
    let (source, scope, learner_prefix) = match user {
        Some(user) => (
            Source::Stream(format!("learner-{institution}-{user}")),
            CursorScope::new(format!("events/{institution}/{user}"), "revision"),
            None,
        ),
        None => (
            Source::All,
            CursorScope::new(format!("events/{institution}"), "position"),
            Some(format!("learner-{institution}-")),
        ),
    };
    let from_position = q.from_position.unwrap_or(0);
    let after = match q.cursor.as_deref() {
        Some(c) => {
            let key = decode_cursor(&scope, c)?;
            match source {
                Source::All => key.position()?,
                Source::Stream(_) => key.revision()?,
            }
        }
        // The log: start just before `from_position`. A stream: from its
        // first revision (positions are filtered as it is read).
        None => match source {
            Source::All => from_position.saturating_sub(1),
            Source::Stream(_) => 0,
        },
    };
    let format = negotiate(req, &[Format::Json, Format::Csv, Format::Ndjson]);
    Ok((
        Request {
            source,
            filter: Filter {
                learner_prefix,
                institution_stream: format!("institution-{institution}"),
                from_position,
                to_position: q.to_position.unwrap_or(Position::MAX),
                from: q.from,
                to: q.to,
            },
            scope,
            after,
            limit,
        },
        format,
    ))
}

/// An institution's recorded events (every stream of it), by position.
#[utoipa::path(
    get,
    path = "/v1/institutions/{institution_id}/events",
    tag = "raw events",
    params(
        ("institution_id" = u64, Path, minimum = 1, example = 12345, description = "The source's institution id."),
        EventsQuery
    ),
    responses(
        (status = 200, description = "A page of events (JSON or CSV), or with `Accept: application/x-ndjson` every event of the range, one JSON object a line, streamed up to the log's head when the export began.",
            content(
                (dto::EventPage = "application/json"),
                (String = "text/csv"),
                (String = "application/x-ndjson")
            ),
            headers(("X-Next-Cursor" = String, description = "The next page's cursor, when there is one (pages)."))),
        EventErrors
    ),
    security(("bearer" = []))
)]
pub async fn institution_events(
    req: HttpRequest,
    ctx: web::Data<ApiContext>,
) -> Result<HttpResponse, Failure> {
    let (request, format) = parse(&req, &ctx, false)?;
    answer(ctx, request, format).await
}

/// One learner's recorded events (the stream `learner-{institution}-{user}`).
#[utoipa::path(
    get,
    path = "/v1/institutions/{institution_id}/learners/{user_id}/events",
    tag = "raw events",
    params(
        ("institution_id" = u64, Path, minimum = 1, example = 12345, description = "The source's institution id."),
        ("user_id" = u64, Path, minimum = 1, example = 123456798, description = "The source's user id."),
        EventsQuery
    ),
    responses(
        (status = 200, description = "A page of the learner's events (JSON or CSV), or with `Accept: application/x-ndjson` all of them, streamed.",
            content(
                (dto::EventPage = "application/json"),
                (String = "text/csv"),
                (String = "application/x-ndjson")
            ),
            headers(("X-Next-Cursor" = String, description = "The next page's cursor, when there is one (pages)."))),
        EventErrors
    ),
    security(("bearer" = []))
)]
pub async fn learner_events(
    req: HttpRequest,
    ctx: web::Data<ApiContext>,
) -> Result<HttpResponse, Failure> {
    let (request, format) = parse(&req, &ctx, true)?;
    if let Source::Stream(stream) = &request.source {
        let first = ctx
            .events
            .read_stream(stream, 0, 1)
            .await
            .map_err(|e| store_unavailable(&e))?;
        if first.is_empty() {
            return Err(Failure::not_found(
                "learner_not_found",
                "the event log holds no event of this learner",
            ));
        }
    }
    answer(ctx, request, format).await
}

async fn answer(
    ctx: web::Data<ApiContext>,
    request: Request,
    format: Format,
) -> Result<HttpResponse, Failure> {
    match format {
        Format::Ndjson => export(ctx, request).await,
        Format::Csv => {
            let (items, next) = page(&ctx, &request).await?;
            let body = dto::to_csv(&items).map_err(|e| Failure::internal(&e))?;
            let mut res = HttpResponse::Ok()
                .insert_header((header::CONTENT_TYPE, "text/csv; charset=utf-8"))
                .body(body);
            next_header(&mut res, next.as_deref());
            Ok(res)
        }
        Format::Json => {
            let (items, next) = page(&ctx, &request).await?;
            let mut res = HttpResponse::Ok().json(dto::EventPage {
                items,
                next_cursor: next.clone(),
            });
            next_header(&mut res, next.as_deref());
            Ok(res)
        }
    }
}

fn next_header(res: &mut HttpResponse, next: Option<&str>) {
    if let Some(next) = next.and_then(|n| header::HeaderValue::from_str(n).ok()) {
        res.headers_mut()
            .insert(header::HeaderName::from_static(super::NEXT_CURSOR), next);
    }
}

/// One page: up to `limit` matching events, reading at most
/// [`SCAN_BUDGET`] events of the log.
async fn page(
    ctx: &ApiContext,
    request: &Request,
) -> Result<(Vec<dto::Event>, Option<String>), Failure> {
    let mut items = Vec::new();
    let mut after = request.after;
    let mut scanned = 0;
    let done = loop {
        let want = CHUNK.min(SCAN_BUDGET - scanned);
        if want == 0 {
            break false;
        }
        let (events, _) = read_chunk(&*ctx.events, &request.source, after, want)
            .await
            .map_err(|e| store_unavailable(&e))?;
        let read = events.len();
        let mut past_end = false;
        let mut full = false;
        for e in events {
            if e.position > request.filter.to_position {
                past_end = true;
                break;
            }
            after = match request.source {
                Source::All => e.position,
                Source::Stream(_) => e.revision + 1,
            };
            scanned += 1;
            if request.filter.matches(&e) {
                items.push(dto::Event::try_from(e).map_err(|e| Failure::internal(&e))?);
                if items.len() == request.limit {
                    full = true;
                    break;
                }
            }
        }
        // A full page stops mid-chunk: what is left of it comes next.
        if full {
            break false;
        }
        if past_end || read < want {
            break true;
        }
    };
    let next = (!done).then(|| {
        let key = match request.source {
            Source::All => CursorKey::Position { p: after },
            Source::Stream(_) => CursorKey::Revision { r: after },
        };
        encode_cursor(&request.scope, key)
    });
    Ok((items, next))
}

/// The NDJSON export: every matching event up to the head as it was when
/// the export began, a chunk of the log at a time.
async fn export(ctx: web::Data<ApiContext>, request: Request) -> Result<HttpResponse, Failure> {
    let head = ctx.events.head().await.map_err(|e| store_unavailable(&e))?;
    let mut filter = request.filter.clone();
    filter.to_position = filter.to_position.min(head);
    let state = ExportState {
        store: Arc::clone(&ctx.events),
        ctx: ctx.clone(),
        source: request.source,
        filter,
        after: request.after,
        done: false,
    };
    let body = futures::stream::unfold(state, |mut state| async move {
        let chunk = state.next_chunk().await?;
        Some((chunk, state))
    });
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "application/x-ndjson"))
        .streaming(body))
}

struct ExportState {
    store: Arc<dyn EventStore>,
    ctx: web::Data<ApiContext>,
    source: Source,
    filter: Filter,
    after: u64,
    done: bool,
}

impl ExportState {
    /// The next non-empty piece of output, `None` at the end. A failure
    /// ends the body early (the client sees a truncated transfer).
    async fn next_chunk(&mut self) -> Option<Result<Bytes, actix_web::Error>> {
        loop {
            if self.done {
                return None;
            }
            let (events, next) =
                match read_chunk(&*self.store, &self.source, self.after, CHUNK).await {
                    Ok(read) => read,
                    Err(e) => {
                        self.done = true;
                        tracing::error!(error = %e, "NDJSON export stopped: event log read failed");
                        return Some(Err(actix_web::error::ErrorServiceUnavailable(
                            "event log unavailable",
                        )));
                    }
                };
            if events.len() < CHUNK {
                self.done = true;
            }
            self.after = next;
            let mut out = Vec::with_capacity(events.len() * 512);
            let mut written = 0u64;
            for e in events {
                if e.position > self.filter.to_position {
                    self.done = true;
                    break;
                }
                if !self.filter.matches(&e) {
                    continue;
                }
                let event = match dto::Event::try_from(e) {
                    Ok(event) => event,
                    Err(err) => {
                        self.done = true;
                        tracing::error!(error = %err, "NDJSON export stopped: unreadable event data");
                        return Some(Err(actix_web::error::ErrorInternalServerError(
                            "unreadable event",
                        )));
                    }
                };
                let start = out.len();
                if serde_json::to_writer(&mut out, &event).is_err() {
                    self.done = true;
                    return Some(Err(actix_web::error::ErrorInternalServerError(
                        "unwritable event",
                    )));
                }
                one_line(&mut out[start..]);
                out.push(b'\n');
                written += 1;
            }
            if written > 0 {
                self.ctx
                    .exported_events
                    .fetch_add(written, Ordering::Relaxed);
                return Some(Ok(Bytes::from(out)));
            }
        }
    }
}

/// Makes a serialized event one line: the recorded data keeps the delivery
/// as it was sent, line breaks between its tokens included. JSON strings
/// cannot hold a raw line break, so every one is such whitespace, and a
/// space means the same.
fn one_line(json: &mut [u8]) {
    for b in json.iter_mut() {
        if *b == b'\n' || *b == b'\r' {
            *b = b' ';
        }
    }
}
