//! Raw recorded events, straight from the event log (not the read models),
//! for audits: the whole log (operator keys only), an institution's events,
//! or one learner's stream.
//!
//! JSON and CSV answers are pages; `Accept: application/x-ndjson` streams
//! the whole range instead, reading the log in chunks and writing each as
//! it is read, so an export of any size runs in constant memory (and a slow
//! reader slows the reading, through the socket's backpressure and a
//! one-chunk queue). Exports read the log in its stored form
//! ([`RawEvents`]) and write each line from the stored bytes: the same JSON
//! as a page's [`dto::Event`], without decoding, allocating per event or
//! re-serializing the data.
//!
//! An institution's events are found by stream name: every event of
//! institution `I` is in `learner-I-{user}` or `institution-I`, so no event
//! of another institution can appear. They are read with
//! [`EventStore::read_streams`], which the embedded store answers from its
//! stream index: an institution costs its own events, not the whole log.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracker_domain::{InstitutionId, event};
use tracker_store::{
    EventStore, Position, RawEvent, RawEvents, ReadAll, RecordedEvent, StoreError, StreamSet,
};
use utoipa::{IntoParams, IntoResponses};

use super::dto::{self, ErrorBody};
use super::params::{self, CursorKey, CursorScope, decode_cursor, encode_cursor};
use super::{ApiContext, Failure, Format, negotiate};
use crate::error::ApiError;

/// Events read from the log per query of a page.
pub const CHUNK: usize = 1_000;
/// Most events one JSON or CSV page reads, matching or not: a page of a
/// sparse filter may come back short (or empty) with a cursor to go on.
pub const SCAN_BUDGET: usize = 10_000;
/// Events read from the log per query of an NDJSON export (about 1.5 MiB
/// of output for the benchmark's events). An export holds at most two
/// chunks as read (the next one being read, this one being encoded) and
/// three encoded (one waiting for the queue, one queued, one being sent),
/// so this bounds its memory whatever the size of the log: 2,000 gave the
/// same rate with twice the memory.
pub const EXPORT_CHUNK: usize = 1_000;
/// Encoded chunks waiting for the socket: one, so the next chunk is read
/// while the previous is sent, and a reader that stops stops the reading.
const EXPORT_QUEUE: usize = 1;
/// Largest piece of a chunk handed to the HTTP layer at a time: it copies
/// each piece into its write buffer, which it keeps when it stays under
/// 128 KiB.
const BODY_PIECE: usize = 64 * 1024;

/// Errors of the raw-event endpoints of one institution.
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
    /// `learner_not_found` (a learner's events only; an institution's with
    /// none are an empty page): the log holds no event of this learner.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// `damaged_log`: a recorded event cannot be read (the message names
    /// its position); not for retrying.
    #[response(status = 500)]
    Damaged(ErrorBody),
    /// The event log cannot be read right now.
    #[response(status = 503, headers(("Retry-After" = u64, description = "Seconds.")))]
    Unavailable(ErrorBody),
}

/// Errors of the whole log.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum LogErrors {
    /// A parameter is malformed, unknown or out of range (`field` names it).
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No API key, or not a configured one.
    #[response(
        status = 401,
        headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"tracker\"`"))
    )]
    Unauthorized(ErrorBody),
    /// `operator_key_required`: the key holds only some institutions, and
    /// the whole log is every institution's. Nothing is read.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// `damaged_log`: a recorded event cannot be read (the message names
    /// its position); not for retrying.
    #[response(status = 500)]
    Damaged(ErrorBody),
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

/// Which streams an answer holds.
#[derive(Debug, Clone)]
enum Streams {
    /// Every stream read (the whole log, or the one stream read).
    Any,
    /// `learner-{institution}-…` and `institution-{institution}` (what
    /// the store reads already; checked again as each event is kept).
    Institution(StreamSet),
}

impl Streams {
    fn matches(&self, stream: &[u8]) -> bool {
        match self {
            Self::Any => true,
            Self::Institution(set) => set.contains(stream),
        }
    }
}

/// Which events of the log an answer holds.
#[derive(Debug, Clone)]
struct Filter {
    streams: Streams,
    from_position: Position,
    to_position: Position,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
}

impl Filter {
    fn matches(&self, e: &RecordedEvent) -> bool {
        self.streams.matches(e.stream.as_bytes())
            && self.positions(e.position)
            && self.times(e.metadata.received_at)
    }

    /// As [`Self::matches`]; the time is parsed only when a time filter
    /// needs it.
    fn matches_raw(&self, e: &RawEvent<'_>) -> Result<bool, Unreadable> {
        if !(self.streams.matches(e.stream) && self.positions(e.position)) {
            return Ok(false);
        }
        if self.from.is_none() && self.to.is_none() {
            return Ok(true);
        }
        Ok(self.times(parse_received_at(e)?))
    }

    fn positions(&self, position: Position) -> bool {
        position >= self.from_position && position <= self.to_position
    }

    fn times(&self, received_at: DateTime<Utc>) -> bool {
        self.from.is_none_or(|t| received_at >= t) && self.to.is_none_or(|t| received_at < t)
    }
}

/// Where events come from: the global log, one institution's streams (in
/// log order, so its cursor is a position too), or one stream.
#[derive(Debug, Clone)]
enum Source {
    All,
    Institution(StreamSet),
    Stream(String),
}

impl Source {
    /// Whether the cursor is a log position (else a stream revision).
    fn by_position(&self) -> bool {
        matches!(self, Self::All | Self::Institution(_))
    }
}

/// The streams of `institution`.
fn institution_streams(institution: InstitutionId) -> StreamSet {
    StreamSet::new(
        event::learner_streams_prefix(institution),
        event::institution_stream(institution),
    )
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
                    from: after.saturating_add(1),
                    limit,
                })
                .await?;
            let next = events.last().map_or(after, |e| e.position);
            Ok((events, next))
        }
        Source::Institution(streams) => {
            let read = ReadAll {
                from: after.saturating_add(1),
                limit,
            };
            let events = store.read_streams(streams, read).await?;
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

/// [`read_chunk`] in the stored form, into `buf`.
async fn read_raw_chunk(
    store: &dyn EventStore,
    source: &Source,
    after: u64,
    limit: usize,
    mut buf: RawEvents,
) -> Result<(RawEvents, u64), StoreError> {
    match source {
        Source::All => {
            let read = ReadAll {
                from: after.saturating_add(1),
                limit,
            };
            let events = store.read_all_raw(read, buf).await?;
            let next = events.last_position().unwrap_or(after);
            Ok((events, next))
        }
        Source::Institution(streams) => {
            let read = ReadAll {
                from: after.saturating_add(1),
                limit,
            };
            let events = store.read_streams_raw(streams, read, buf).await?;
            let next = events.last_position().unwrap_or(after);
            Ok((events, next))
        }
        // One learner's stream is small: decoded, then re-encoded.
        Source::Stream(stream) => {
            let events = store.read_stream(stream, after, limit).await?;
            buf.clear();
            for e in &events {
                buf.push_recorded(e);
            }
            let next = events.last().map_or(after, |e| e.revision + 1);
            Ok((buf, next))
        }
    }
}

/// A read of the log that failed. A damaged row is permanent and the
/// server's fault: a 500 naming its position, not a 503 that a client
/// would retry for ever. Anything else (I/O, shutdown) may pass: 503.
fn store_failure(e: &StoreError) -> Failure {
    use actix_web::http::StatusCode;
    if let StoreError::Corrupt { position, .. } = e {
        tracing::error!(error = %e, "event log read failed: damaged row");
        return Failure::from(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "damaged_log",
            format!("the event log is damaged at position {position}; the server's log says how"),
        ));
    }
    tracing::warn!(error = %e, "event log read failed");
    Failure::from(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
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

/// What an endpoint reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reads {
    /// The whole log.
    Log,
    /// `/v1/institutions/{institution_id}/events`.
    Institution,
    /// `/v1/institutions/{institution_id}/learners/{user_id}/events`.
    Learner,
}

fn parse(req: &HttpRequest, ctx: &ApiContext, reads: Reads) -> Result<(Request, Format), Failure> {
    let key = ctx.keys.authenticate(req.headers())?;
    let institution = match reads {
        Reads::Log => {
            key.check_every_institution()?;
            None
        }
        Reads::Institution | Reads::Learner => {
            let institution = params::institution(req)?;
            key.check(institution)?;
            Some(institution)
        }
    };
    let q: EventsQuery = params::query(req)?;
    let user = if reads == Reads::Learner {
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
    let (source, scope, streams) = match (institution, user) {
        (Some(institution), Some(user)) => (
            Source::Stream(format!("learner-{institution}-{user}")),
            CursorScope::new(format!("events/{institution}/{user}"), "revision"),
            Streams::Any,
        ),
        (Some(institution), None) => (
            Source::Institution(institution_streams(institution)),
            CursorScope::new(format!("events/{institution}"), "position"),
            Streams::Institution(institution_streams(institution)),
        ),
        (None, _) => (
            Source::All,
            CursorScope::new("events", "position"),
            Streams::Any,
        ),
    };
    let from_position = q.from_position.unwrap_or(0);
    let after = match q.cursor.as_deref() {
        Some(c) => {
            let key = decode_cursor(&scope, c)?;
            if source.by_position() {
                key.position()?
            } else {
                key.revision()?
            }
        }
        // The log (or an institution's streams in it): start just before
        // `from_position`. A stream: from its first revision (positions are
        // filtered as it is read).
        None if source.by_position() => from_position.saturating_sub(1),
        None => 0,
    };
    let format = negotiate(req, &[Format::Json, Format::Csv, Format::Ndjson]);
    Ok((
        Request {
            source,
            filter: Filter {
                streams,
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

/// The whole event log, every institution's events, by position (operator
/// keys only).
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "raw events",
    params(EventsQuery),
    responses(
        (status = 200, description = "A page of events (JSON or CSV), or with `Accept: application/x-ndjson` every event of the range in position order, one JSON object a line (the same object as a page's item), streamed up to the log's head when the export began.",
            content(
                (dto::EventPage = "application/json"),
                (String = "text/csv"),
                (String = "application/x-ndjson")
            ),
            headers(("X-Next-Cursor" = String, description = "The next page's cursor, when there is one (pages)."))),
        LogErrors
    ),
    security(("bearer" = []))
)]
pub async fn log_events(
    req: HttpRequest,
    ctx: web::Data<ApiContext>,
) -> Result<HttpResponse, Failure> {
    let (request, format) = parse(&req, &ctx, Reads::Log)?;
    answer(ctx, request, format).await
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
    let (request, format) = parse(&req, &ctx, Reads::Institution)?;
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
    let (request, format) = parse(&req, &ctx, Reads::Learner)?;
    if let Source::Stream(stream) = &request.source {
        let first = ctx
            .events
            .read_stream(stream, 0, 1)
            .await
            .map_err(|e| store_failure(&e))?;
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
            let (items, next) = page(&*ctx.events, &request).await?;
            let body = dto::to_csv(&items).map_err(|e| Failure::internal(&e))?;
            let mut res = HttpResponse::Ok()
                .insert_header((header::CONTENT_TYPE, "text/csv; charset=utf-8"))
                .body(body);
            next_header(&mut res, next.as_deref());
            Ok(res)
        }
        Format::Json => {
            let (items, next) = page(&*ctx.events, &request).await?;
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
/// [`SCAN_BUDGET`] events of the log. Its first read is of `limit` events:
/// without a time filter every event the source gives matches, so a page
/// of 50 reads 50, not a chunk; only a page that some events did not match
/// goes on a [`CHUNK`] at a time.
async fn page(
    log: &dyn EventStore,
    request: &Request,
) -> Result<(Vec<dto::Event>, Option<String>), Failure> {
    let mut items = Vec::new();
    let mut after = request.after;
    let mut scanned = 0;
    let done = loop {
        let chunk = if scanned == 0 { request.limit } else { CHUNK };
        let want = chunk.min(CHUNK).min(SCAN_BUDGET - scanned);
        if want == 0 {
            break false;
        }
        let (events, _) = read_chunk(log, &request.source, after, want)
            .await
            .map_err(|e| store_failure(&e))?;
        let read = events.len();
        let mut past_end = false;
        let mut full = false;
        for e in events {
            if e.position > request.filter.to_position {
                past_end = true;
                break;
            }
            after = if request.source.by_position() {
                e.position
            } else {
                e.revision + 1
            };
            scanned += 1;
            if request.filter.matches(&e) {
                let position = e.position;
                let event = dto::Event::try_from(e).map_err(|err| {
                    store_failure(&StoreError::Corrupt {
                        position,
                        reason: format!("data is not JSON: {err}"),
                    })
                })?;
                items.push(event);
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
        let key = if request.source.by_position() {
            CursorKey::Position { p: after }
        } else {
            CursorKey::Revision { r: after }
        };
        encode_cursor(&request.scope, key)
    });
    Ok((items, next))
}

type BodyItem = Result<Bytes, actix_web::Error>;

/// The NDJSON export: every matching event up to the head as it was when
/// the export began, a chunk of the log at a time. A task reads and
/// encodes the next chunk while the previous one is being sent.
async fn export(ctx: web::Data<ApiContext>, request: Request) -> Result<HttpResponse, Failure> {
    let head = ctx.events.head().await.map_err(|e| store_failure(&e))?;
    let mut filter = request.filter;
    filter.to_position = filter.to_position.min(head);
    let (tx, rx) = mpsc::channel(EXPORT_QUEUE);
    let producer = Exporter {
        store: Arc::clone(&ctx.events),
        ctx: ctx.clone(),
        source: request.source,
        filter: Arc::new(filter),
        after: request.after,
    };
    actix_web::rt::spawn(producer.run(tx));
    // Chunks go out in pieces the HTTP layer copies cheaply; the queue
    // ends when the producer is done (or failed, after its error item).
    let body = futures::stream::unfold((rx, Bytes::new()), |(mut rx, mut pending)| async move {
        if pending.is_empty() {
            match rx.recv().await? {
                Ok(chunk) => pending = chunk,
                Err(e) => return Some((Err(e), (rx, Bytes::new()))),
            }
        }
        let piece = pending.split_to(pending.len().min(BODY_PIECE));
        Some((Ok(piece), (rx, pending)))
    });
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "application/x-ndjson"))
        .streaming(body))
}

struct Exporter {
    store: Arc<dyn EventStore>,
    ctx: web::Data<ApiContext>,
    source: Source,
    filter: Arc<Filter>,
    after: u64,
}

impl Exporter {
    /// Reads, encodes and queues chunks until the range is done, the
    /// client has gone (the queue is closed) or a read fails. A failure is
    /// queued as an error item, which ends the body early (the client sees
    /// a truncated transfer).
    async fn run(self, tx: mpsc::Sender<BodyItem>) {
        let Self {
            store,
            ctx,
            source,
            filter,
            after,
        } = self;
        let read = |after: u64, buf: RawEvents| {
            let store = Arc::clone(&store);
            let source = source.clone();
            actix_web::rt::spawn(async move {
                read_raw_chunk(&*store, &source, after, EXPORT_CHUNK, buf).await
            })
        };
        let fail = |error: actix_web::Error| async {
            // The client may have gone already; nothing more to tell.
            let _ = tx.send(Err(error)).await;
        };
        let mut reading = Some(read(after, RawEvents::default()));
        let mut spare = RawEvents::default();
        while let Some(handle) = reading.take() {
            let (events, next) = match handle.await {
                Ok(Ok(read)) => read,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "NDJSON export stopped: event log read failed");
                    return fail(actix_web::error::ErrorServiceUnavailable(
                        "event log unavailable",
                    ))
                    .await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "NDJSON export stopped: read task failed");
                    return fail(actix_web::error::ErrorInternalServerError("export failed")).await;
                }
            };
            // The next chunk is read while this one is encoded and sent.
            if events.len() == EXPORT_CHUNK {
                reading = Some(read(next, std::mem::take(&mut spare)));
            }
            // Encoding runs beside the worker thread that writes to the
            // socket, not on it.
            let filter = Arc::clone(&filter);
            let encoded = tokio::task::spawn_blocking(move || {
                let encoded = encode_chunk(&filter, &events);
                (events, encoded)
            })
            .await;
            let chunk = match encoded {
                Ok((events, chunk)) => {
                    spare = events;
                    chunk
                }
                Err(e) => {
                    tracing::error!(error = %e, "NDJSON export stopped: encoding task failed");
                    return fail(actix_web::error::ErrorInternalServerError("export failed")).await;
                }
            };
            if chunk.lines > 0 {
                ctx.exported_events
                    .fetch_add(chunk.lines, Ordering::Relaxed);
                // A closed queue: the client has gone.
                if tx.send(Ok(Bytes::from(chunk.bytes))).await.is_err() {
                    return;
                }
            }
            if let Some(e) = chunk.unreadable {
                tracing::error!(
                    position = e.position,
                    reason = e.reason,
                    "NDJSON export stopped: unreadable event"
                );
                return fail(actix_web::error::ErrorInternalServerError(
                    "unreadable event",
                ))
                .await;
            }
            if chunk.past_end {
                return;
            }
        }
    }
}

/// A chunk's NDJSON lines.
struct Encoded {
    bytes: Vec<u8>,
    lines: u64,
    /// An event beyond `to_position` was reached: nothing more to read.
    past_end: bool,
    /// The event the lines stop before: sent, then the export is cut.
    unreadable: Option<Unreadable>,
}

/// A recorded event that cannot be written as it should.
#[derive(Debug)]
struct Unreadable {
    position: Position,
    reason: &'static str,
}

/// Bytes a line adds to the event's own text (field names, numbers, id).
const LINE_OVERHEAD: usize = 256;

/// The lines of `events` up to `to_position`, or up to the first that
/// cannot be written (none of its bytes kept).
fn encode_chunk(filter: &Filter, events: &RawEvents) -> Encoded {
    let mut out = Vec::with_capacity(events.text_bytes() + events.len() * LINE_OVERHEAD);
    let mut lines = 0;
    let mut past_end = false;
    let mut unreadable = None;
    for e in events.iter() {
        if e.position > filter.to_position {
            past_end = true;
            break;
        }
        let start = out.len();
        match filter.matches_raw(&e).and_then(|m| {
            if m {
                write_line(&mut out, &e).map(|()| 1)
            } else {
                Ok(0)
            }
        }) {
            Ok(n) => lines += n,
            Err(e) => {
                out.truncate(start);
                unreadable = Some(e);
                break;
            }
        }
    }
    Encoded {
        bytes: out,
        lines,
        past_end,
        unreadable,
    }
}

/// Writes `e` as one NDJSON line: byte for byte what serializing its
/// [`dto::Event`] with serde_json writes (same fields in the same order,
/// same string escapes, `received_at` as chrono writes it), with the line
/// breaks between the tokens of `data` made spaces (JSON strings cannot
/// hold a raw line break, so every one is such whitespace, and a space
/// means the same), then `\n`.
fn write_line(out: &mut Vec<u8>, e: &RawEvent<'_>) -> Result<(), Unreadable> {
    let bad = |reason| Unreadable {
        position: e.position,
        reason,
    };
    out.extend_from_slice(b"{\"position\":");
    write_u64(out, e.position);
    out.extend_from_slice(b",\"event_id\":\"");
    let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
    out.extend_from_slice(e.id.hyphenated().encode_lower(&mut id).as_bytes());
    out.extend_from_slice(b"\",\"stream\":");
    write_str(out, e.stream).map_err(|()| bad("stream is not UTF-8"))?;
    out.extend_from_slice(b",\"revision\":");
    write_u64(out, e.revision);
    out.extend_from_slice(b",\"type\":");
    write_str(out, e.event_type).map_err(|()| bad("type is not UTF-8"))?;
    out.extend_from_slice(b",\"schema_version\":");
    write_u64(out, u64::from(e.schema_version));
    out.extend_from_slice(b",\"received_at\":\"");
    write_time(out, e)?;
    out.extend_from_slice(b"\",\"source_id\":");
    write_str(out, e.source_id).map_err(|()| bad("source_id is not UTF-8"))?;
    out.extend_from_slice(b",\"request_id\":");
    write_str(out, e.request_id).map_err(|()| bad("request_id is not UTF-8"))?;
    out.extend_from_slice(b",\"content_hash\":");
    write_str(out, e.content_hash).map_err(|()| bad("content_hash is not UTF-8"))?;
    out.extend_from_slice(b",\"data\":");
    // As a `RawValue` holds it: the JSON text without surrounding
    // whitespace.
    let data = trim_json_whitespace(e.data);
    // Not re-checked as UTF-8 or JSON (that was a fifth of an export's
    // time): the store holds what was appended, a `String` of JSON the
    // domain wrote, always an object. What is not even bracketed as an
    // object or an array is damaged, and ends the export as a page would
    // end with 500.
    if !matches!(
        (data.first(), data.last()),
        (Some(b'{'), Some(b'}')) | (Some(b'['), Some(b']'))
    ) {
        return Err(bad("data is not a JSON object or array"));
    }
    let start = out.len();
    out.extend_from_slice(data);
    if has_line_break(data) {
        one_line(&mut out[start..]);
    }
    out.extend_from_slice(b"}\n");
    Ok(())
}

fn trim_json_whitespace(mut text: &[u8]) -> &[u8] {
    let blank = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    while let [first, rest @ ..] = text
        && blank(first)
    {
        text = rest;
    }
    while let [rest @ .., last] = text
        && blank(last)
    {
        text = rest;
    }
    text
}

fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// A JSON string, escaped as serde_json escapes: `"`, `\` and control
/// characters only (`\b \t \n \f \r`, else `\u00XX`); everything else as is.
fn write_str(out: &mut Vec<u8>, text: &[u8]) -> Result<(), ()> {
    if std::str::from_utf8(text).is_err() {
        return Err(());
    }
    out.push(b'"');
    if text.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.extend_from_slice(text);
    } else {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for &b in text {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0c => out.extend_from_slice(b"\\f"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0..0x20 => out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ]),
                _ => out.push(b),
            }
        }
    }
    out.push(b'"');
    Ok(())
}

/// `received_at` as chrono serializes it (RFC 3339, `Z`, the fraction in
/// groups of three digits, none when zero). The stored form
/// (`2024-01-01T00:00:00.123000000Z`) is rewritten without parsing;
/// anything else is parsed and formatted by chrono itself.
fn write_time(out: &mut Vec<u8>, e: &RawEvent<'_>) -> Result<(), Unreadable> {
    if let Some((seconds, fraction)) = canonical_time(e.received_at) {
        out.extend_from_slice(seconds);
        let digits = if fraction == b"000000000" {
            0
        } else if fraction.ends_with(b"000000") {
            3
        } else if fraction.ends_with(b"000") {
            6
        } else {
            9
        };
        if digits > 0 {
            out.push(b'.');
            out.extend_from_slice(&fraction[..digits]);
        }
        out.push(b'Z');
    } else {
        let t = parse_received_at(e)?;
        out.extend_from_slice(
            t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                .as_bytes(),
        );
    }
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`: the seconds part and the nine digits.
fn canonical_time(text: &[u8]) -> Option<(&[u8], &[u8])> {
    const SHAPE: &[u8; 30] = b"0000-00-00T00:00:00.000000000Z";
    if text.len() != SHAPE.len() {
        return None;
    }
    let shaped = text.iter().zip(SHAPE).all(|(b, s)| {
        if *s == b'0' {
            b.is_ascii_digit()
        } else {
            b == s
        }
    });
    shaped.then(|| (&text[..19], &text[20..29]))
}

fn parse_received_at(e: &RawEvent<'_>) -> Result<DateTime<Utc>, Unreadable> {
    std::str::from_utf8(e.received_at)
        .ok()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .ok_or(Unreadable {
            position: e.position,
            reason: "received_at is not an RFC 3339 time",
        })
}

/// Whether `text` holds `\n` or `\r`: a branch-free scan of 32 bytes at a
/// time, which compiles to vector compares (most deliveries are one line,
/// and a byte-by-byte loop was a quarter of an export's time).
fn has_line_break(text: &[u8]) -> bool {
    let (blocks, rest) = text.as_chunks::<32>();
    for block in blocks {
        let mut hit = 0u8;
        for &b in block {
            hit |= u8::from(b == b'\n') | u8::from(b == b'\r');
        }
        if hit != 0 {
            return true;
        }
    }
    rest.iter().any(|&b| b == b'\n' || b == b'\r')
}

/// Makes a serialized event one line: the recorded data keeps the delivery
/// as it was sent, line breaks between its tokens included.
fn one_line(json: &mut [u8]) {
    for b in json.iter_mut() {
        *b = if *b == b'\n' || *b == b'\r' { b' ' } else { *b };
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use chrono::TimeZone as _;
    use tracker_store::EventMetadata;

    fn recorded(position: u64, nanos: u32, text: &str, data: &str) -> RecordedEvent {
        RecordedEvent {
            id: uuid::Uuid::from_u128(
                0x0123_4567_89ab_cdef_0123_4567_89ab_cdef + u128::from(position),
            ),
            stream: format!("learner-7-{text}"),
            revision: position.wrapping_mul(3),
            position,
            event_type: text.to_owned(),
            schema_version: u32::MAX,
            data: data.to_owned(),
            metadata: EventMetadata {
                received_at: Utc
                    .timestamp_opt(1_700_000_000 + position as i64, nanos)
                    .unwrap(),
                source_id: text.to_owned(),
                request_id: format!("{text}-{position}"),
                content_hash: "sha256:00ff".into(),
            },
        }
    }

    /// What a page's item serializes to, made one line as the export did
    /// before it wrote lines itself.
    fn reference(e: &RecordedEvent) -> Vec<u8> {
        let mut out = serde_json::to_vec(&dto::Event::try_from(e.clone()).unwrap()).unwrap();
        one_line(&mut out);
        out.push(b'\n');
        out
    }

    fn written(e: &RecordedEvent) -> Vec<u8> {
        let mut raw = RawEvents::default();
        raw.push_recorded(e);
        let mut out = Vec::new();
        write_line(&mut out, &raw.get(0).unwrap()).unwrap();
        out
    }

    #[test]
    fn lines_are_byte_for_byte_the_serialized_event() {
        let every_control: String = (0u8..0x20).map(char::from).collect();
        let texts = [
            "plain".to_owned(),
            "Jo\u{e3}o \"quoted\" back\\slash \u{1F600} del\u{7f}".to_owned(),
            every_control,
            String::new(),
        ];
        let datas = [
            r#"{"a":1}"#,
            "{\n  \"delivery\": {\"name\": \"S\u{e3}o Paulo\\n\", \"x\": [1, 2.50, -0]},\r\n  \"t\": \"\\u00e9\"\n}",
            "  \n {\"padded\": true} \r\n",
            "[]",
        ];
        let mut position = 0;
        for nanos in [0, 5_000_000, 123_456_000, 7, 999_999_999] {
            for text in &texts {
                for data in datas {
                    position += 1;
                    let e = recorded(position, nanos, text, data);
                    let line = written(&e);
                    assert_eq!(
                        String::from_utf8_lossy(&line),
                        String::from_utf8_lossy(&reference(&e))
                    );
                    assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
                }
            }
        }
        let big = recorded(u64::MAX, 1, "x", "{}");
        assert_eq!(written(&big), reference(&big));
    }

    #[test]
    fn line_breaks_are_found_wherever_they_are() {
        let text = vec![b'x'; 200];
        assert!(!has_line_break(&text));
        for at in 0..text.len() {
            for b in [b'\n', b'\r'] {
                let mut t = text.clone();
                t[at] = b;
                assert!(has_line_break(&t), "{at}");
                one_line(&mut t);
                assert_eq!(
                    t,
                    text.iter()
                        .enumerate()
                        .map(|(i, x)| if i == at { b' ' } else { *x })
                        .collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn times_not_in_the_stored_form_are_formatted_by_chrono() {
        let e = recorded(1, 120_000_000, "x", "{}");
        let mut raw = RawEvents::default();
        for received_at in [
            "2023-11-14T22:13:21.12Z",
            "2023-11-14T19:13:21.120-03:00",
            "2023-11-14T22:13:21.120000000+00:00",
        ] {
            raw.clear();
            let stored = raw_with_time(&e, received_at);
            raw.push(&stored);
            let mut out = Vec::new();
            write_line(&mut out, &raw.get(0).unwrap()).unwrap();
            assert_eq!(out, reference(&e), "{received_at}");
        }
        raw.clear();
        raw.push(&raw_with_time(&e, "yesterday"));
        let err = write_line(&mut Vec::new(), &raw.get(0).unwrap()).unwrap_err();
        assert_eq!(err.position, 1);
    }

    fn raw_with_time<'a>(e: &'a RecordedEvent, received_at: &'a str) -> RawEvent<'a> {
        RawEvent {
            position: e.position,
            id: e.id,
            stream: e.stream.as_bytes(),
            revision: e.revision,
            event_type: e.event_type.as_bytes(),
            schema_version: e.schema_version,
            data: e.data.as_bytes(),
            received_at: received_at.as_bytes(),
            source_id: e.metadata.source_id.as_bytes(),
            request_id: e.metadata.request_id.as_bytes(),
            content_hash: e.metadata.content_hash.as_bytes(),
        }
    }

    #[test]
    fn unreadable_events_are_refused_not_written() {
        let e = recorded(9, 0, "x", "{}");
        for (field, bytes) in [("data", &b"  "[..]), ("stream", b"\xc3")] {
            let mut raw_event = raw_with_time(&e, "2023-11-14T22:13:29.000000000Z");
            match field {
                "data" => raw_event.data = bytes,
                _ => raw_event.stream = bytes,
            }
            let mut raw = RawEvents::default();
            raw.push(&raw_event);
            let err = write_line(&mut Vec::new(), &raw.get(0).unwrap()).unwrap_err();
            assert_eq!(err.position, 9);
            assert!(err.reason.starts_with(field), "{}", err.reason);
        }
    }

    /// The log, counting the events its reads give.
    #[derive(Debug)]
    struct Counting {
        log: tracker_store::sqlite::SqliteEventStore,
        read: std::sync::atomic::AtomicUsize,
    }

    impl Counting {
        fn add(&self, events: &[RecordedEvent]) {
            self.read.fetch_add(events.len(), Ordering::Relaxed);
        }

        fn take(&self) -> usize {
            self.read.swap(0, Ordering::Relaxed)
        }
    }

    #[async_trait::async_trait]
    impl EventStore for Counting {
        async fn append(
            &self,
            stream: &str,
            expected: tracker_store::ExpectedRevision,
            events: Vec<tracker_store::NewEvent>,
        ) -> Result<tracker_store::AppendOutcome, tracker_store::AppendError> {
            self.log.append(stream, expected, events).await
        }

        async fn read_stream(
            &self,
            stream: &str,
            from: u64,
            limit: usize,
        ) -> Result<Vec<RecordedEvent>, StoreError> {
            let events = self.log.read_stream(stream, from, limit).await?;
            self.add(&events);
            Ok(events)
        }

        async fn read_all(&self, read: ReadAll) -> Result<Vec<RecordedEvent>, StoreError> {
            let events = self.log.read_all(read).await?;
            self.add(&events);
            Ok(events)
        }

        async fn read_streams(
            &self,
            streams: &StreamSet,
            read: ReadAll,
        ) -> Result<Vec<RecordedEvent>, StoreError> {
            let events = self.log.read_streams(streams, read).await?;
            self.add(&events);
            Ok(events)
        }

        async fn head(&self) -> Result<Position, StoreError> {
            self.log.head().await
        }

        fn subscribe_all(&self, from: Position) -> tracker_store::Subscription {
            self.log.subscribe_all(from)
        }

        async fn writable(&self) -> Result<(), StoreError> {
            self.log.writable().await
        }
    }

    /// A page reads what it still needs while every event matches, and
    /// goes on a chunk at a time once some did not; either way its events
    /// and cursor are those of the filtered log.
    #[tokio::test]
    async fn a_page_reads_the_events_it_needs() {
        let dir = tempfile::tempdir().unwrap();
        let log = Counting {
            log: tracker_store::sqlite::SqliteEventStore::open(dir.path().join("events.sqlite"))
                .unwrap(),
            read: Default::default(),
        };
        // 1,500 events, one learner of institution 7 in two of three.
        for n in 0..1_500u64 {
            let stream = if n % 3 == 0 {
                "learner-8-1"
            } else {
                "learner-7-1"
            };
            let event = tracker_store::contract::event(n + 1, "{}");
            log.append(stream, tracker_store::ExpectedRevision::Any, vec![event])
                .await
                .unwrap();
        }
        let seven = institution_streams(InstitutionId::try_from(7).unwrap());
        let request = |source: Source, streams: Streams, after: u64, from: Option<u64>| Request {
            source,
            filter: Filter {
                streams,
                from_position: 0,
                to_position: Position::MAX,
                from: from.map(|s| Utc.timestamp_opt(i64::try_from(s).unwrap(), 0).unwrap()),
                to: None,
            },
            scope: CursorScope::new("events", "position"),
            after,
            limit: 50,
        };
        let positions =
            |items: &[dto::Event]| -> Vec<u64> { items.iter().map(|e| e.position).collect() };
        // Every event of the log, of the institution, of the learner.
        let cases = [
            (Source::All, Streams::Any, (11..=60).collect::<Vec<u64>>()),
            (
                Source::Institution(seven.clone()),
                Streams::Institution(seven.clone()),
                (11..).filter(|p| (p - 1) % 3 != 0).take(50).collect(),
            ),
        ];
        for (source, streams, expected) in cases {
            let (items, next) = page(&log, &request(source, streams, 10, None))
                .await
                .unwrap();
            assert_eq!(positions(&items), expected);
            assert!(next.is_some());
            assert_eq!(log.take(), 50);
        }
        let learner = Source::Stream("learner-7-1".into());
        let (items, _) = page(&log, &request(learner, Streams::Any, 0, None))
            .await
            .unwrap();
        assert_eq!(items.len(), 50);
        assert_eq!(log.take(), 50);
        // A time filter that none of the first 50 events matches: the
        // page goes on a chunk at a time.
        let received = log
            .log
            .read_all(ReadAll {
                from: 100,
                limit: 1,
            })
            .await
            .unwrap();
        let from = received[0].metadata.received_at;
        let mut filtered = request(Source::All, Streams::Any, 0, None);
        filtered.filter.from = Some(from);
        let (items, next) = page(&log, &filtered).await.unwrap();
        let expected: Vec<u64> = log
            .log
            .read_all(ReadAll {
                from: 1,
                limit: 1_500,
            })
            .await
            .unwrap()
            .iter()
            .filter(|e| e.metadata.received_at >= from)
            .take(50)
            .map(|e| e.position)
            .collect();
        log.take();
        assert_eq!(positions(&items), expected);
        assert!(next.is_some());
    }

    #[test]
    fn the_filter_keeps_the_institution_positions_and_times() {
        let institution = Filter {
            streams: Streams::Institution(institution_streams(InstitutionId::try_from(7).unwrap())),
            from_position: 2,
            to_position: 50,
            from: Some(Utc.timestamp_opt(1_700_000_003, 0).unwrap()),
            to: Some(Utc.timestamp_opt(1_700_000_040, 0).unwrap()),
        };
        let mut raw = RawEvents::default();
        let mut expected = Vec::new();
        for (position, stream) in [
            (1, "learner-7-1"),
            (3, "learner-7-1"),
            (4, "learner-70-1"),
            (5, "institution-7"),
            (6, "institution-70"),
            (40, "learner-7-2"),
            (45, "learner-7-2"),
        ] {
            let mut e = recorded(position, 0, "x", "{}");
            e.stream = stream.into();
            raw.push_recorded(&e);
            expected.push(institution.matches(&e));
        }
        let kept: Vec<bool> = raw
            .iter()
            .map(|e| institution.matches_raw(&e).unwrap())
            .collect();
        assert_eq!(kept, expected);
        assert_eq!(kept, [false, true, false, true, false, false, false]);
        let encoded = encode_chunk(&institution, &raw);
        assert_eq!(encoded.lines, 2);
        assert!(!encoded.past_end);
        let short = Filter {
            to_position: 4,
            ..institution
        };
        let encoded = encode_chunk(&short, &raw);
        assert_eq!((encoded.lines, encoded.past_end), (1, true));
    }
}
