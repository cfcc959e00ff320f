//! The query API (`/v1`): the read models and the raw event log of one
//! institution at a time, for analysts, dashboards and auditors, and the
//! whole log for operators (`/v1/events`).
//!
//! Every request is authenticated (`Authorization: Bearer <key>`) and the
//! key's institutions checked before anything is read. Read-model answers
//! carry `X-Consistent-Through` (the projection checkpoint they were read
//! at); `min_position` makes a request wait, up to `wait_ms`, for the
//! projection to reach a position, so a client reads its own writes or gets
//! a 503 saying where the projection stands, never stale data silently.
//! The OpenAPI document ([`openapi`]) is generated from these handlers and
//! served at `/openapi.json`.

pub mod auth;
pub mod dto;
pub mod events;
pub mod models;
pub mod openapi;
pub mod params;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::middleware::{Next, from_fn};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use tracing::Instrument as _;
use tracker_projections::ProjectionKind;
use tracker_projections::query::{QueryError, Read, ReadModelQueries};
use tracker_store::{EventStore, Position};

use crate::error::ApiError;
use crate::webhook::request_id;
pub use auth::ApiKeys;

/// The header every read-model answer carries.
pub const CONSISTENT_THROUGH: &str = "x-consistent-through";
/// The cursor of the next page, when there is one (also in JSON bodies).
pub const NEXT_CURSOR: &str = "x-next-cursor";
/// The longest `wait_ms` a caller may ask for.
pub const MAX_WAIT_MS: u64 = 5_000;
/// `wait_ms` when `min_position` is given alone.
pub const DEFAULT_WAIT_MS: u64 = 1_000;
/// A waiting request looks at the checkpoint again after this, then after
/// twice as long each time, up to [`POLL_MAX`], and at once when a runner
/// of this process commits a batch.
const POLL_FIRST: Duration = Duration::from_millis(5);
const POLL_MAX: Duration = Duration::from_millis(50);

/// What the query API's handlers share.
#[derive(Debug)]
pub struct ApiContext {
    pub queries: Arc<dyn ReadModelQueries>,
    pub events: Arc<dyn EventStore>,
    pub keys: ApiKeys,
    /// Events written to NDJSON exports so far (an export's progress can be
    /// watched from outside: a slow reader holds it back).
    pub exported_events: AtomicU64,
    /// Changes whenever a projection runner of this process commits a
    /// batch (`serve` with its projector); `None` without one.
    pub applied: Option<watch::Receiver<u64>>,
}

impl ApiContext {
    pub fn new(
        queries: Arc<dyn ReadModelQueries>,
        events: Arc<dyn EventStore>,
        keys: ApiKeys,
    ) -> Self {
        Self {
            queries,
            events,
            keys,
            exported_events: AtomicU64::new(0),
            applied: None,
        }
    }

    pub fn exported_events(&self) -> u64 {
        self.exported_events.load(Ordering::Relaxed)
    }
}

/// An error answer of the query API: the shared error shape plus the
/// headers some answers need.
#[derive(Debug)]
pub struct Failure {
    pub error: ApiError,
    pub consistent_through: Option<Position>,
    pub www_authenticate: Option<&'static str>,
}

impl Failure {
    pub fn authenticate(mut self, challenge: &'static str) -> Self {
        self.www_authenticate = Some(challenge);
        self
    }

    pub fn at(mut self, position: Position) -> Self {
        self.consistent_through = Some(position);
        self
    }

    pub fn bad_request(field: &str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
            .with_field(field)
            .into()
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, code, message).into()
    }

    pub fn internal(cause: &dyn std::error::Error) -> Self {
        ApiError::internal(cause).into()
    }
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            consistent_through: None,
            www_authenticate: None,
        }
    }
}

impl From<QueryError> for Failure {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::TooManyBuckets { .. } => Self::bad_request(
                "bucket",
                "too_many_buckets",
                format!("{e}; narrow from/to or use a longer bucket"),
            ),
            QueryError::EmptyRange { .. } => {
                Self::bad_request("from", "invalid_range", e.to_string())
            }
            QueryError::KeyMismatch => Self::bad_request(
                "cursor",
                "invalid_cursor",
                "the cursor was made for another list or sort",
            ),
            QueryError::Storage(_) => {
                tracing::error!(error = %e, "read models unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the read models cannot be read right now; retry later",
                )
                .into()
            }
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl ResponseError for Failure {
    fn status_code(&self) -> StatusCode {
        self.error.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = self.error.error_response();
        let headers = res.headers_mut();
        if let Some(p) = self.consistent_through {
            headers.insert(
                HeaderName::from_static(CONSISTENT_THROUGH),
                HeaderValue::from(p),
            );
        }
        if let Some(challenge) = self.www_authenticate {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        res
    }
}

/// How long a request may wait for a projection to reach a position.
#[derive(Debug, Clone, Copy, Default)]
pub struct Consistency {
    pub min_position: Option<Position>,
    pub wait: Duration,
}

impl Consistency {
    pub fn new(min_position: Option<Position>, wait_ms: Option<u64>) -> Result<Self, Failure> {
        let wait_ms = wait_ms.unwrap_or(DEFAULT_WAIT_MS);
        if wait_ms > MAX_WAIT_MS {
            return Err(Failure::bad_request(
                "wait_ms",
                "invalid_parameter",
                format!("wait_ms must be at most {MAX_WAIT_MS}, got {wait_ms}"),
            ));
        }
        Ok(Self {
            min_position,
            wait: Duration::from_millis(wait_ms),
        })
    }
}

fn not_caught_up(min: Position, at: Position, projection: ProjectionKind) -> Failure {
    Failure::from(
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_caught_up",
            format!(
                "the {} read model is at position {at}, not yet at min_position {min}; retry later or wait longer (wait_ms)",
                projection.name()
            ),
        )
        .with_field("min_position"),
    )
    .at(at)
}

/// The wait between two looks at a checkpoint: until a runner of this
/// process commits a batch, or a backoff runs out (5 ms, doubling to 50 ms),
/// since projectors of other processes (`tracker project`, other
/// partitions) give no signal. A request waiting the whole second then
/// reads the checkpoint about twenty-five times, not two hundred.
struct Pause {
    applied: Option<watch::Receiver<u64>>,
    next: Duration,
}

impl Pause {
    fn new(applied: Option<&watch::Receiver<u64>>) -> Self {
        let applied = applied.map(|rx| {
            let mut rx = rx.clone();
            rx.mark_unchanged();
            rx
        });
        Self {
            applied,
            next: POLL_FIRST,
        }
    }

    /// Returns after the backoff, when a batch is committed, or at
    /// `deadline`, whichever comes first.
    async fn wait(&mut self, deadline: tokio::time::Instant) {
        let until = (tokio::time::Instant::now() + self.next).min(deadline);
        self.next = (self.next * 2).min(POLL_MAX);
        match &mut self.applied {
            Some(rx) => {
                if let Ok(Err(_)) = tokio::time::timeout_at(until, rx.changed()).await {
                    // The runners are gone: no signal any more, only the
                    // backoff.
                    self.applied = None;
                    tokio::time::sleep_until(until).await;
                }
            }
            None => tokio::time::sleep_until(until).await,
        }
    }
}

/// Runs `query` once the projection has reached `consistency.min_position`
/// for `institution` (looking at its checkpoint again after each [`Pause`]),
/// or answers 503 with where it stands when `consistency.wait` runs out
/// first.
pub async fn consistent<T, F, Fut>(
    ctx: &ApiContext,
    institution: u64,
    projection: ProjectionKind,
    consistency: Consistency,
    query: F,
) -> Result<Read<T>, Failure>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Read<T>, QueryError>>,
{
    let Some(min) = consistency.min_position else {
        return Ok(query().await?);
    };
    let deadline = tokio::time::Instant::now() + consistency.wait;
    let mut pause = Pause::new(ctx.applied.as_ref());
    let mut head_checked = false;
    loop {
        let mut at = ctx
            .queries
            .consistent_through(institution, projection)
            .await?;
        if at < min && !head_checked {
            head_checked = true;
            // Positions come from webhook answers, which are sent once the
            // event is in the log: one beyond the log's head names no event,
            // and waiting would not make it one.
            if let Ok(head) = ctx.events.head().await
                && min > head
            {
                return Err(Failure::bad_request(
                    "min_position",
                    "invalid_parameter",
                    format!(
                        "min_position {min} is beyond the last recorded event ({head}): no event has that position yet"
                    ),
                )
                .at(at));
            }
        }
        if at >= min {
            let read = query().await?;
            // A rebuild may switch generations between the two reads; the
            // answer must still be at least at `min`, and a 503 names where
            // the answer stood, not the checkpoint read before it.
            if read.consistent_through >= min {
                return Ok(read);
            }
            at = read.consistent_through;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(not_caught_up(min, at, projection));
        }
        pause.wait(deadline).await;
    }
}

/// The representations an endpoint offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Ndjson,
}

impl Format {
    fn media_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Csv => "text/csv",
            Self::Ndjson => "application/x-ndjson",
        }
    }
}

/// The best of `offered` for the request's `Accept` (q-values honoured; the
/// first offered wins ties and is the answer when nothing offered is named).
pub fn negotiate(req: &HttpRequest, offered: &[Format]) -> Format {
    let first = offered.first().copied().unwrap_or(Format::Json);
    let Some(accept) = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
    else {
        return first;
    };
    let ranges: Vec<(String, f32)> = accept
        .split(',')
        .filter_map(|range| {
            let mut parts = range.split(';');
            let media = parts.next()?.trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            Some((media, q))
        })
        .collect();
    let quality = |format: Format| -> Option<f32> {
        let media = format.media_type();
        let main = media.split('/').next().unwrap_or("");
        // The most specific matching range decides.
        ranges
            .iter()
            .filter_map(|(range, q)| {
                let specificity = if range == media {
                    3
                } else if range.strip_suffix("/*") == Some(main) {
                    2
                } else if range == "*/*" {
                    1
                } else {
                    return None;
                };
                Some((specificity, *q))
            })
            .max_by_key(|(s, _)| *s)
            .map(|(_, q)| q)
    };
    let mut best: Option<(Format, f32)> = None;
    for format in offered {
        if let Some(q) = quality(*format).filter(|q| *q > 0.0)
            && best.is_none_or(|(_, b)| q > b)
        {
            best = Some((*format, q));
        }
    }
    best.map_or(first, |(f, _)| f)
}

/// Headers of every successful read-model answer.
pub fn read_headers(res: &mut HttpResponse, consistent_through: Position, next: Option<&str>) {
    let headers = res.headers_mut();
    headers.insert(
        HeaderName::from_static(CONSISTENT_THROUGH),
        HeaderValue::from(consistent_through),
    );
    if let Some(next) = next.and_then(|n| HeaderValue::from_str(n).ok()) {
        headers.insert(HeaderName::from_static(NEXT_CURSOR), next);
    }
}

/// Answers common to every `/v1` and `/openapi.json` call: a request id
/// (the caller's when sane), a tracing span naming the key and institution
/// (never the key itself), one log line, `Cache-Control: no-store` and
/// `Vary`.
async fn request_context(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let request_id = request_id(req.headers());
    let span = tracing::info_span!(
        "api",
        request_id = %request_id,
        path = %req.path(),
        key = tracing::field::Empty,
        institution = tracing::field::Empty,
    );
    let started = Instant::now();
    let mut res = next.call(req).instrument(span.clone()).await?;
    let status = res.status().as_u16();
    let elapsed_us = started.elapsed().as_micros() as u64;
    // Answered queries at debug (a dashboard may poll many a second);
    // refusals and failures where an operator sees them.
    span.in_scope(|| {
        if status < 400 {
            tracing::debug!(status, elapsed_us, "query");
        } else if status < 500 {
            tracing::info!(status, elapsed_us, "query refused");
        } else {
            tracing::warn!(status, elapsed_us, "query failed");
        }
    });
    let headers = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::VARY,
        HeaderValue::from_static("Accept, Authorization"),
    );
    Ok(res)
}

/// A `/v1` call without a valid key is 401 whatever its path or method, as
/// the README says of every `/v1` request: a caller without a key learns
/// nothing of which paths and methods exist.
fn unauthenticated(req: &HttpRequest) -> Option<HttpResponse> {
    let path = req.path();
    if path != "/v1" && !path.starts_with("/v1/") {
        return None;
    }
    let Some(ctx) = req.app_data::<web::Data<ApiContext>>() else {
        return Some(Failure::internal(&std::io::Error::other("no API context")).error_response());
    };
    ctx.keys
        .authenticate(req.headers())
        .err()
        .map(|failure| failure.error_response())
}

/// Any method but GET on a query API path.
async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    if let Some(res) = unauthenticated(&req) {
        return res;
    }
    let mut res = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not allowed here; the query API is read with GET",
            req.method()
        ),
    )
    .error_response();
    res.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET"));
    res
}

/// A path under `/v1` that names no endpoint.
async fn no_such_endpoint(req: HttpRequest) -> HttpResponse {
    if let Some(res) = unauthenticated(&req) {
        return res;
    }
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see /openapi.json",
    )
    .error_response()
}

/// The query API's routes: `/v1/...` and `/openapi.json`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/openapi.json")
            .wrap(from_fn(request_context))
            .route(web::get().to(openapi::document))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::scope("/v1/institutions/{institution_id}")
            .wrap(from_fn(request_context))
            .service(get("/summary", models::summary))
            .service(get("/trails", models::trails))
            .service(get("/trails/{trail_id}", models::trail))
            .service(get("/trails/{trail_id}/learners", models::trail_learners))
            .service(get("/courses", models::courses))
            .service(get("/learners", models::learners))
            .service(get("/learners/{user_id}", models::learner))
            .service(get("/learners/{user_id}/events", events::learner_events))
            .service(get("/completions", models::completions))
            .service(get("/activity", models::activity))
            .service(get("/events", events::institution_events))
            .default_service(web::to(no_such_endpoint)),
    )
    .service(
        web::scope("/v1")
            .wrap(from_fn(request_context))
            .service(get("/events", events::log_events))
            .default_service(web::to(no_such_endpoint)),
    );
}

fn get<F, Args>(path: &str, handler: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args>,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    web::resource(path)
        .route(web::get().to(handler))
        .default_service(web::to(method_not_allowed))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::time::Instant as Now;
    use tracker_projections::query::sqlite::SqliteQueries;
    use tracker_projections::readstore::{ApplyBatch, CheckpointKey, ReadStore as _};
    use tracker_projections::sqlite::SqliteReadStore;
    use tracker_store::sqlite::SqliteEventStore;
    use tracker_store::{EventMetadata, ExpectedRevision, NewEvent};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Without runners in this process, the looks back off: 5, 10, 20,
    /// 40, then every 50 ms, and never past the deadline.
    #[tokio::test(start_paused = true)]
    async fn a_pause_without_runners_backs_off_to_its_cap() {
        let start = Now::now();
        let mut pause = Pause::new(None);
        let mut at = Vec::new();
        for _ in 0..7 {
            pause.wait(start + ms(160)).await;
            at.push((Now::now() - start).as_millis());
        }
        assert_eq!(at, [5, 15, 35, 75, 125, 160, 160]);
    }

    /// With runners in this process, a committed batch ends the pause at
    /// once, whatever the backoff has grown to; if the runners go away,
    /// the backoff alone is left (no busy loop on a closed channel).
    #[tokio::test(start_paused = true)]
    async fn a_pause_ends_when_a_batch_is_committed() {
        let applied = Arc::new(watch::Sender::new(0u64));
        let start = Now::now();
        let far = start + ms(10_000);
        let mut pause = Pause::new(Some(&applied.subscribe()));
        for _ in 0..4 {
            pause.wait(far).await;
        }
        assert_eq!((Now::now() - start).as_millis(), 75);
        let signal = Arc::clone(&applied);
        tokio::spawn(async move {
            tokio::time::sleep(ms(3)).await;
            signal.send_modify(|n| *n += 1);
        });
        pause.wait(far).await;
        assert_eq!((Now::now() - start).as_millis(), 78, "woken by the batch");
        drop(applied);
        let before = Now::now();
        pause.wait(far).await;
        assert_eq!(
            (Now::now() - before).as_millis(),
            50,
            "the backoff, not a spin"
        );
        pause.wait(far).await;
        assert_eq!((Now::now() - before).as_millis(), 100);
    }

    /// The checkpoint has reached `min_position` but the answer, read after
    /// a generation switch, has not: the 503 says where the answer stood,
    /// never a position at or past the one it says was not reached.
    #[tokio::test]
    async fn a_503_names_the_answers_position_when_it_is_behind_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let events = SqliteEventStore::open(dir.path().join("events.sqlite")).unwrap();
        for n in 0..5u128 {
            let event = NewEvent {
                id: uuid::Uuid::from_u128(n + 1),
                event_type: "test".into(),
                schema_version: 1,
                data: "{}".into(),
                metadata: EventMetadata {
                    received_at: chrono::Utc::now(),
                    source_id: "test".into(),
                    request_id: format!("r{n}"),
                    content_hash: "sha256:00".into(),
                },
            };
            events
                .append("s", ExpectedRevision::Any, vec![event])
                .await
                .unwrap();
        }
        let read = SqliteReadStore::open(dir.path().join("readmodels")).unwrap();
        read.apply(ApplyBatch {
            key: CheckpointKey::whole(ProjectionKind::Learners),
            after: 0,
            completions: Vec::new(),
            dead_letters: Vec::new(),
            through: 5,
            lease: None,
        })
        .await
        .unwrap();
        let ctx = ApiContext::new(
            Arc::new(SqliteQueries::open(dir.path().join("readmodels")).unwrap()),
            Arc::new(events),
            ApiKeys::from_config(&[]),
        );
        let consistency = Consistency {
            min_position: Some(4),
            wait: Duration::from_millis(20),
        };
        let stale = || async {
            Ok(Read {
                value: (),
                consistent_through: 2,
            })
        };
        let failure = consistent(&ctx, 1, ProjectionKind::Learners, consistency, stale)
            .await
            .unwrap_err();
        assert_eq!(failure.error.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(failure.consistent_through, Some(2));
    }
}
