//! The read-model endpoints: summary, trails, courses, learners,
//! completions and activity of one institution.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use tracker_projections::ProjectionKind;
use tracker_projections::query::{
    ActivityRequest, Bucket, CompletionFilter, CompletionSort, ListSort, Lookup, Page, PageRequest,
    Read,
};
use utoipa::{IntoParams, IntoResponses, ToSchema};

use super::dto::{self, CsvRow, ErrorBody};
use super::params::{self, CursorKey, CursorScope, decode_cursor, encode_cursor};
use super::{ApiContext, Consistency, Failure, Format, consistent, negotiate, read_headers};

/// Errors every read-model endpoint may answer.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum ReadErrors {
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
    /// The institution has no completion projected yet
    /// (`institution_not_found`), or the trail or learner is unknown
    /// (`trail_not_found`, `learner_not_found`).
    #[response(
        status = 404,
        headers(("X-Consistent-Through" = u64, description = "The checkpoint the lookup was made at."))
    )]
    NotFound(ErrorBody),
    /// `internal`: a stored row could not be read or encoded (the server's
    /// log says why); not for retrying.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// `not_caught_up`: the read model did not reach `min_position` within
    /// `wait_ms` (the header says where it is); or `unavailable`.
    #[response(
        status = 503,
        headers(
            ("X-Consistent-Through" = u64, description = "Where the read model stands (`not_caught_up`)."),
            ("Retry-After" = u64, description = "Seconds.")
        )
    )]
    Unavailable(ErrorBody),
}

/// `min_position` and `wait_ms`, on every read-model endpoint.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadQuery {
    /// Answer only once the read model has covered this log position (a
    /// webhook answer's `position`): read your own writes.
    min_position: Option<u64>,
    /// How long to wait for `min_position`, in milliseconds (default 1000).
    #[param(minimum = 0, maximum = 5000)]
    wait_ms: Option<u64>,
}

/// Sorts of trails. `id` (default) is immutable: walking every page yields
/// every trail that existed when the walk started exactly once. `name` and
/// `completions` (most first, ties by id descending) are live orderings: a
/// trail renamed or completed between two pages may move.
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrailSort {
    #[default]
    Id,
    Name,
    Completions,
}

/// Sorts of courses; as for trails, with `title` for `name`.
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CourseSort {
    #[default]
    Id,
    Title,
    Completions,
}

/// Sorts of learners; as for trails.
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LearnerSort {
    #[default]
    Id,
    Name,
    Completions,
}

/// Sorts of completions; both immutable (exact walks).
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CompletionOrder {
    /// By log position (default).
    #[default]
    Position,
    /// By finish time, then position: efficient with `from`/`to`.
    FinishedAt,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BucketParam {
    #[default]
    Day,
    /// ISO weeks, Monday to Sunday.
    Week,
    Month,
}

macro_rules! list_query {
    ($name:ident, $sort:ty) => {
        #[derive(Debug, Default, Deserialize, IntoParams)]
        #[into_params(parameter_in = Query)]
        pub struct $name {
            /// Rows per page (default 50).
            #[param(minimum = 1, maximum = 1000)]
            limit: Option<u32>,
            /// `next_cursor` of the previous page (opaque; only valid for
            /// the same list and sort).
            #[param(min_length = 1, pattern = r"^[A-Za-z0-9_-]+$")]
            cursor: Option<String>,
            #[param(inline)]
            sort: Option<$sort>,
            /// Answer only once the read model has covered this log
            /// position (a webhook answer's `position`).
            min_position: Option<u64>,
            /// How long to wait for `min_position`, in milliseconds
            /// (default 1000).
            #[param(minimum = 0, maximum = 5000)]
            wait_ms: Option<u64>,
        }
    };
}

list_query!(TrailsQuery, TrailSort);
list_query!(CoursesQuery, CourseSort);
list_query!(LearnersQuery, LearnerSort);

/// Parameters of a trail's learners (by user id).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TrailLearnersQuery {
    /// Rows per page (default 50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(min_length = 1, pattern = r"^[A-Za-z0-9_-]+$")]
    cursor: Option<String>,
    /// Answer only once the read model has covered this log position.
    min_position: Option<u64>,
    /// How long to wait for `min_position`, in milliseconds (default 1000).
    #[param(minimum = 0, maximum = 5000)]
    wait_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CompletionsQuery {
    /// Rows per page (default 50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(min_length = 1, pattern = r"^[A-Za-z0-9_-]+$")]
    cursor: Option<String>,
    #[param(inline)]
    sort: Option<CompletionOrder>,
    /// Only completions finished at or after this instant (RFC 3339).
    from: Option<DateTime<Utc>>,
    /// Only completions finished before this instant (RFC 3339, exclusive).
    to: Option<DateTime<Utc>>,
    /// Only this trail's completions.
    #[param(minimum = 1)]
    trail_id: Option<u64>,
    /// Only this learner's completions.
    #[param(minimum = 1)]
    user_id: Option<u64>,
    /// Answer only once the read model has covered this log position.
    min_position: Option<u64>,
    /// How long to wait for `min_position`, in milliseconds (default 1000).
    #[param(minimum = 0, maximum = 5000)]
    wait_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ActivityQuery {
    /// Bucket length (default `day`).
    #[param(inline)]
    bucket: Option<BucketParam>,
    /// First day (a date in the source time zone, e.g. `2024-01-01`);
    /// default: the first day with a completion. Widened to the start of
    /// its bucket.
    from: Option<NaiveDate>,
    /// Last day, inclusive; default: the last day with a completion.
    /// Widened to the end of its bucket. At most 1000 buckets.
    to: Option<NaiveDate>,
    /// Answer only once the read model has covered this log position.
    min_position: Option<u64>,
    /// How long to wait for `min_position`, in milliseconds (default 1000).
    #[param(minimum = 0, maximum = 5000)]
    wait_ms: Option<u64>,
}

/// Authenticates, checks the institution, reads the query string: in
/// this order, before anything is read.
fn begin<Q>(req: &HttpRequest, ctx: &ApiContext) -> Result<(u64, Q), Failure>
where
    Q: serde::de::DeserializeOwned + IntoParams + 'static,
{
    let key = ctx.keys.authenticate(req.headers())?;
    let institution = params::institution(req)?;
    key.check(institution)?;
    let query = params::query::<Q>(req)?;
    Ok((institution.get(), query))
}

fn unknown_institution(institution: u64, at: u64) -> Failure {
    Failure::not_found(
        "institution_not_found",
        format!("institution {institution} has no projected completion (yet)"),
    )
    .at(at)
}

fn found<T>(read: Read<Lookup<T>>, institution: u64, entity: &str) -> Result<(T, u64), Failure> {
    let at = read.consistent_through;
    match read.value {
        Lookup::Found(v) => Ok((v, at)),
        Lookup::UnknownInstitution => Err(unknown_institution(institution, at)),
        Lookup::UnknownEntity => Err(Failure::not_found(
            match entity {
                "trail" => "trail_not_found",
                _ => "learner_not_found",
            },
            format!("institution {institution} has no {entity} with that id (yet)"),
        )
        .at(at)),
    }
}

/// A read model's answer as JSON. Encoded with `sonic-rs`, which writes
/// the same bytes as `serde_json` for these types (`dto` tests it) at about
/// half the cost for a page (escaping strings a word at a time instead of a
/// byte at a time); the events' DTO holds `serde_json` raw values, which
/// only `serde_json` writes, and is not encoded here.
fn json<T: Serialize>(body: &T, at: u64, next: Option<&str>) -> HttpResponse {
    // Written into a buffer the size of a typical page (actix's `json`
    // starts from 128 bytes and grows it a dozen times for a page).
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut res = match sonic_rs::to_writer(&mut buf, body) {
        Ok(()) => HttpResponse::Ok()
            .insert_header(header::ContentType::json())
            .body(buf),
        Err(e) => return actix_web::ResponseError::error_response(&Failure::internal(&e)),
    };
    read_headers(&mut res, at, next);
    res
}

fn csv<R: CsvRow>(rows: &[R], at: u64, next: Option<&str>) -> Result<HttpResponse, Failure> {
    let body = dto::to_csv(rows).map_err(|e| Failure::internal(&e))?;
    let mut res = HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/csv; charset=utf-8"))
        .body(body);
    read_headers(&mut res, at, next);
    Ok(res)
}

/// A page as JSON (`{items, next_cursor}`) or CSV.
fn page_response<R, K, B>(
    req: &HttpRequest,
    page: Page<R, K>,
    at: u64,
    scope: &CursorScope,
    wrap: impl FnOnce(Vec<R>, Option<String>) -> B,
) -> Result<HttpResponse, Failure>
where
    R: CsvRow,
    K: Into<CursorKey>,
    B: Serialize,
{
    let next = page.next.map(|k| encode_cursor(scope, k.into()));
    match negotiate(req, &[Format::Json, Format::Csv]) {
        Format::Csv => csv(&page.items, at, next.as_deref()),
        _ => Ok(json(&wrap(page.items, next.clone()), at, next.as_deref())),
    }
}

fn list_page(
    limit: Option<u32>,
    cursor: Option<&str>,
    sort: ListSort,
    scope: &CursorScope,
) -> Result<PageRequest<ListSort, tracker_projections::query::SortKey>, Failure> {
    let limit = params::limit(limit)?;
    let after = cursor
        .map(|c| decode_cursor(scope, c).and_then(CursorKey::sort_key))
        .transpose()?;
    if after.as_ref().is_some_and(|k| !k.fits(sort)) {
        return Err(Failure::bad_request(
            "cursor",
            "invalid_cursor",
            "the cursor was made for another sort",
        ));
    }
    Ok(PageRequest { sort, after, limit })
}

/// The institution's totals.
#[utoipa::path(
    get,
    path = "/v1/institutions/{institution_id}/summary",
    tag = "read models",
    params(
        ("institution_id" = u64, Path, minimum = 1, example = 12345, description = "The source's institution id."),
        ReadQuery
    ),
    responses(
        (status = 200, description = "The summary.", body = dto::Summary,
            headers(("X-Consistent-Through" = u64, description = "Every event up to this log position is reflected."))),
        ReadErrors
    ),
    security(("bearer" = []))
)]
pub async fn summary(
    req: HttpRequest,
    ctx: web::Data<ApiContext>,
) -> Result<HttpResponse, Failure> {
    let (institution, q): (u64, ReadQuery) = begin(&req, &ctx)?;
    let consistency = Consistency::new(q.min_position, q.wait_ms)?;
    let read = consistent(
        &ctx,
        institution,
        ProjectionKind::Institutions,
        consistency,
        || ctx.queries.summary(institution),
    )
    .await?;
    match read.value {
        Some(s) => Ok(json(&dto::Summary::from(s), read.consistent_through, None)),
        None => Err(unknown_institution(institution, read.consistent_through)),
    }
}

/// The institution's trails, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/institutions/{institution_id}/trails",
    tag = "read models",
    params(
        ("institution_id" = u64, Path, minimum = 1, example = 12345, description = "The source's institution id."),
        TrailsQuery
    ),
    responses(
        (status = 200, description = "A page of trails, as JSON or (`Accept: text/csv`) CSV with a header row.",
            content((dto::TrailPage = "application/json"), (String = "text/csv")),
            headers(
                ("X-Consistent-Through" = u64, description = "Every event up to this log position is reflected."),
                ("X-Next-Cursor" = String, description = "The next page's cursor, when there is one.")
            )),
        ReadErrors
    ),
    security(("bearer" = []))
)]
pub async fn trails(req: HttpRequest, ctx: web::Data<ApiContext>) -> Result<HttpResponse, Failure> {
    let (institution, q): (u64, TrailsQuery) = begin(&req, &ctx)?;
    let (sort, tag) = match q.sort.unwrap_or_default() {
        TrailSort::Id => (ListSort::Id, "id"),
        TrailSort::Name => (ListSort::Name, "name"),
        TrailSort::Completions => (ListSort::Completions, "completions"),
    };
    let scope = CursorScope::new(format!("trails/{institution}"), tag);
    let page = list_page(q.limit, q.cursor.as_deref(), sort, &scope)?;
    let consistency = Consistency::new(q.min_position, q.wait_ms)?;
    let read = consistent(
        &ctx,
        institution,
        ProjectionKind::Institutions,
        consistency,
        || ctx.queries.trails(institution, page.clone()),
    )
    .await?;
    let (page, at) = found(read, institution, "trail")?;
    let page = Page {
        items: page.items.into_iter().map(dto::Trail::from).collect(),
        next: page.next,
    };
    page_response(&req, page, at, &scope, |items, next_cursor| {
        dto::TrailPage { items, next_cursor }
    })
}

/// One trail with its courses.
#[utoipa::path(
    get,
    path = "/v1/institutions/{institution_id}/trails/{trail_id}",
    tag = "read models",
    params(
        ("institution_id" = u64, Path, minimum = 1, example = 12345, description = "The source's institution id."),
        ("trail_id" = u64, Path, minimum = 1, example = 987654, description = "The source's trail id."),
        ReadQuery
    ),
    responses(
        (status = 200, description = "The trail.", body = dto::TrailDetail,
            headers(("X-Consistent-Through" = u64, description = "Every event up to this log position is reflected."))),
        ReadErrors
    ),
    security(("bearer" = []))
)]
pub async fn trail(req: HttpRequest, ctx: web::Data<ApiContext>) -> Result<HttpResponse, Failure> {
    let (institution, q): (u64, ReadQuery) = begin(&req, &ctx)?;
    let trail = params::path_id(&req, "trail_id")?;
    let consistency = Consistency::new(q.min_position, q.wait_ms)?;
    let read = consistent(
        &ctx,
        institution,
        ProjectionKind::Institutions,
        consistency,
        || ctx.queries.trail(institution, trail),
    )
    .await?;
    let (detail, at) = found(read, institution, "trail")?;
    let body = dto::TrailDetail {
        trail: detail.trail.into(),
        courses: detail.courses.into_iter().map(Into::into).collect(),
    };
    Ok(json(&body, at, None))
}

/// The learners who completed a trail, by user id.
#[utoipa::path(
    get,
    path = "/v1/institutions/{institution_id}/trails/{trail_id}/learners",
    tag = "read models",
    params(
        ("institution_id" = u64, Path, minimum = 1, example = 12345, description = "The source's institution id."),
        ("trail_id" = u64, Path, minimum = 1, example = 987654, description = "The source's trail id."),
        TrailLearnersQuery
    ),
    responses(
        (status = 200, description = "A page of the trail's learners, by user id (immutable: exact walks), as JSON or CSV.",
            content((dto::TrailLearnerPage = "application/json"), (String = "text/csv")),
            headers(
                ("X-Consistent-Through" = u64, description = "Every event up to this log position is reflected."),
                ("X-Next-Cursor" = String, description = "The next page's cursor, when there is one.")
            )),
        ReadErrors
    ),
    security(("bearer" = []))
)]
pub async fn trail_learners(
    req: HttpRequest,
    ctx: web::Data<ApiContext>,
) -> Result<HttpResponse, Failure> {
    let (institution, q): (u64, TrailLearnersQuery) = begin(&req, &ctx)?;
    let trail = params::path_id(&req, "trail_id")?;
    let scope = CursorScope::new(format!("trails/{institution}/{trail}/learners"), "id");
    let page = list_page(q.limit, q.cursor.as_deref(), ListSort::Id, &scope)?;
    let consistency = Consistency::new(q.min_position, q.wait_ms)?;
    let read = consistent(
        &ctx,
        institution,
        ProjectionKind::Learners,
        consistency,
        || ctx.queries.trail_learners(institution, trail, page.clone()),
    )
    .await?;
    let (page, at) = found(read, institution, "trail")?;
    let page = Page {
        items: page
            .items
            .into_iter()
            .map(dto::TrailLearner::from)
            .collect(),
        next: page.next,
    };
    page_response(&req, page, at, &scope, |items, next_cursor| {
        dto::TrailLearnerPage { items, next_cursor }
    })
}

/// The courses of the institution's completed trails, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/institutions/{institution_id}/courses",
    tag = "read models",
    params(
        ("institution_id" = u64, Path, minimum = 1, example = 12345, description = "The source's institution id."),
        CoursesQuery
    ),
    responses(
        (status = 200, description = "A page of courses, as JSON or CSV.",
            content((dto::CoursePage = "application/json"), (String = "text/csv")),
            headers(
                ("X-Consistent-Through" = u64, description = "Every event up to this log position is reflected."),
                ("X-Next-Cursor" = String, description = "The next page's cursor, when there is one.")
            )),
        ReadErrors
    ),
    security(("bearer" = []))
)]
pub async fn courses(
    req: HttpRequest,
    ctx: web::Data<ApiContext>,
) -> Result<HttpResponse, Failure> {
    let (institution, q): (u64, CoursesQuery) = begin(&req, &ctx)?;
    let (sort, tag) = match q.sort.unwrap_or_default() {
        CourseSort::Id => (ListSort::Id, "id"),
        CourseSort::Title => (ListSort::Name, "title"),
        CourseSort::Completions => (ListSort::Completions, "completions"),
    };
    let scope = CursorScope::new(format!("courses/{institution}"), tag);
    let page = list_page(q.limit, q.cursor.as_deref(), sort, &scope)?;
    let consistency = Consistency::new(q.min_position, q.wait_ms)?;
    let read = consistent(
        &ctx,
        institution,
        ProjectionKind::Institutions,
        consistency,
        || ctx.queries.courses(institution, page.clone()),
    )
    .await?;
    let (page, at) = found(read, institution, "course")?;
    let page = Page {
        items: page.items.into_iter().map(dto::Course::from).collect(),
        next: page.next,
    };
    page_response(&req, page, at, &scope, |items, next_cursor| {
        dto::CoursePage { items, next_cursor }
    })
}

/// The institution's learners, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/institutions/{institution_id}/learners",
    tag = "read models",
    params(
        ("institution_id" = u64, Path, minimum = 1, example = 12345, description = "The source's institution id."),
        LearnersQuery
    ),
    responses(
        (status = 200, description = "A page of learners, as JSON or CSV.",
            content((dto::LearnerPage = "application/json"), (String = "text/csv")),
            headers(
                ("X-Consistent-Through" = u64, description = "Every event up to this log position is reflected."),
                ("X-Next-Cursor" = String, description = "The next page's cursor, when there is one.")
            )),
        ReadErrors
    ),
    security(("bearer" = []))
)]
pub async fn learners(
    req: HttpRequest,
    ctx: web::Data<ApiContext>,
) -> Result<HttpResponse, Failure> {
    let (institution, q): (u64, LearnersQuery) = begin(&req, &ctx)?;
    let (sort, tag) = match q.sort.unwrap_or_default() {
        LearnerSort::Id => (ListSort::Id, "id"),
        LearnerSort::Name => (ListSort::Name, "name"),
        LearnerSort::Completions => (ListSort::Completions, "completions"),
    };
    let scope = CursorScope::new(format!("learners/{institution}"), tag);
    let page = list_page(q.limit, q.cursor.as_deref(), sort, &scope)?;
    let consistency = Consistency::new(q.min_position, q.wait_ms)?;
    let read = consistent(
        &ctx,
        institution,
        ProjectionKind::Learners,
        consistency,
        || ctx.queries.learners(institution, page.clone()),
    )
    .await?;
    let (page, at) = found(read, institution, "learner")?;
    let page = Page {
        items: page.items.into_iter().map(dto::Learner::from).collect(),
        next: page.next,
    };
    page_response(&req, page, at, &scope, |items, next_cursor| {
        dto::LearnerPage { items, next_cursor }
    })
}

/// One learner with every trail and every completion.
#[utoipa::path(
    get,
    path = "/v1/institutions/{institution_id}/learners/{user_id}",
    tag = "read models",
    params(
        ("institution_id" = u64, Path, minimum = 1, example = 12345, description = "The source's institution id."),
        ("user_id" = u64, Path, minimum = 1, example = 123456798, description = "The source's user id."),
        ReadQuery
    ),
    responses(
        (status = 200, description = "The learner.", body = dto::LearnerDetail,
            headers(("X-Consistent-Through" = u64, description = "Every event up to this log position is reflected."))),
        ReadErrors
    ),
    security(("bearer" = []))
)]
pub async fn learner(
    req: HttpRequest,
    ctx: web::Data<ApiContext>,
) -> Result<HttpResponse, Failure> {
    let (institution, q): (u64, ReadQuery) = begin(&req, &ctx)?;
    let user = params::path_id(&req, "user_id")?;
    let consistency = Consistency::new(q.min_position, q.wait_ms)?;
    let read = consistent(
        &ctx,
        institution,
        ProjectionKind::Learners,
        consistency,
        || ctx.queries.learner(institution, user),
    )
    .await?;
    let (detail, at) = found(read, institution, "learner")?;
    Ok(json(&dto::LearnerDetail::from(detail), at, None))
}

/// The institution's trail completions, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/institutions/{institution_id}/completions",
    tag = "read models",
    params(
        ("institution_id" = u64, Path, minimum = 1, example = 12345, description = "The source's institution id."),
        CompletionsQuery
    ),
    responses(
        (status = 200, description = "A page of completions, as JSON or CSV (courses as JSON text).",
            content((dto::CompletionPage = "application/json"), (String = "text/csv")),
            headers(
                ("X-Consistent-Through" = u64, description = "Every event up to this log position is reflected."),
                ("X-Next-Cursor" = String, description = "The next page's cursor, when there is one.")
            )),
        ReadErrors
    ),
    security(("bearer" = []))
)]
pub async fn completions(
    req: HttpRequest,
    ctx: web::Data<ApiContext>,
) -> Result<HttpResponse, Failure> {
    let (institution, q): (u64, CompletionsQuery) = begin(&req, &ctx)?;
    let (sort, tag) = match q.sort.unwrap_or_default() {
        CompletionOrder::Position => (CompletionSort::Position, "position"),
        CompletionOrder::FinishedAt => (CompletionSort::FinishedAt, "finished_at"),
    };
    let scope = CursorScope::new(format!("completions/{institution}"), tag);
    let limit = params::limit(q.limit)?;
    let after = q
        .cursor
        .as_deref()
        .map(|c| decode_cursor(&scope, c).and_then(CursorKey::completion_key))
        .transpose()?;
    if after.as_ref().is_some_and(|k| !k.fits(sort)) {
        return Err(Failure::bad_request(
            "cursor",
            "invalid_cursor",
            "the cursor was made for another sort",
        ));
    }
    if let (Some(from), Some(to)) = (q.from, q.to)
        && from > to
    {
        return Err(Failure::bad_request(
            "from",
            "invalid_range",
            format!("from ({from}) is after to ({to})"),
        ));
    }
    within_instants([("from", q.from), ("to", q.to)])?;
    let filter = CompletionFilter {
        from: q.from,
        to: q.to,
        trail_id: q.trail_id,
        user_id: q.user_id,
    };
    for (name, id) in [("trail_id", q.trail_id), ("user_id", q.user_id)] {
        if id == Some(0) {
            return Err(Failure::bad_request(
                name,
                "invalid_parameter",
                format!("{name} must be a positive integer"),
            ));
        }
    }
    let page = PageRequest { sort, after, limit };
    let consistency = Consistency::new(q.min_position, q.wait_ms)?;
    let read = consistent(
        &ctx,
        institution,
        ProjectionKind::Learners,
        consistency,
        || {
            ctx.queries
                .completions(institution, filter.clone(), page.clone())
        },
    )
    .await?;
    let (page, at) = found(read, institution, "learner")?;
    let page = Page {
        items: page.items.into_iter().map(dto::Completion::from).collect(),
        next: page.next,
    };
    page_response(&req, page, at, &scope, |items, next_cursor| {
        dto::CompletionPage { items, next_cursor }
    })
}

/// Completions and active learners per day, week or month, in the source
/// time zone.
#[utoipa::path(
    get,
    path = "/v1/institutions/{institution_id}/activity",
    tag = "read models",
    params(
        ("institution_id" = u64, Path, minimum = 1, example = 12345, description = "The source's institution id."),
        ActivityQuery
    ),
    responses(
        (status = 200, description = "Every bucket from `from` to `to`, empty ones included, as JSON or CSV (one row per bucket).",
            content((dto::Activity = "application/json"), (String = "text/csv")),
            headers(("X-Consistent-Through" = u64, description = "Every event up to this log position is reflected."))),
        ReadErrors
    ),
    security(("bearer" = []))
)]
pub async fn activity(
    req: HttpRequest,
    ctx: web::Data<ApiContext>,
) -> Result<HttpResponse, Failure> {
    let (institution, q): (u64, ActivityQuery) = begin(&req, &ctx)?;
    let (bucket, tag) = match q.bucket.unwrap_or_default() {
        BucketParam::Day => (Bucket::Day, "day"),
        BucketParam::Week => (Bucket::Week, "week"),
        BucketParam::Month => (Bucket::Month, "month"),
    };
    if let (Some(from), Some(to)) = (q.from, q.to)
        && from > to
    {
        return Err(Failure::bad_request(
            "from",
            "invalid_range",
            format!("from ({from}) is after to ({to})"),
        ));
    }
    within_years([("from", q.from), ("to", q.to)])?;
    let request = ActivityRequest {
        bucket,
        from: q.from,
        to: q.to,
    };
    let consistency = Consistency::new(q.min_position, q.wait_ms)?;
    let read = consistent(
        &ctx,
        institution,
        ProjectionKind::Institutions,
        consistency,
        || ctx.queries.activity(institution, request),
    )
    .await
    .map_err(|failure| name_the_given_bound(failure, q.from, q.to))?;
    let (activity, at) = found(read, institution, "trail")?;
    let items: Vec<dto::ActivityBucket> = activity
        .buckets
        .into_iter()
        .map(|b| dto::ActivityBucket {
            start: b.start,
            end: b.end,
            completions: b.completions,
            learners: b.learners,
        })
        .collect();
    match negotiate(&req, &[Format::Json, Format::Csv]) {
        Format::Csv => csv(&items, at, None),
        _ => Ok(json(
            &dto::Activity {
                bucket: tag.to_owned(),
                from: activity.from,
                to: activity.to,
                items,
            },
            at,
            None,
        )),
    }
}

/// An empty range with one bound left to its default (the first or last day
/// with a completion) is the given bound's fault: name that one.
fn name_the_given_bound(
    failure: Failure,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
) -> Failure {
    if failure.error.code != "invalid_range" {
        return failure;
    }
    match (from, to) {
        (None, Some(to)) => Failure::bad_request(
            "to",
            "invalid_range",
            format!(
                "to ({to}) is before the institution's first day with a completion, where from starts when not given"
            ),
        ),
        (Some(from), None) => Failure::bad_request(
            "from",
            "invalid_range",
            format!(
                "from ({from}) is after the institution's last day with a completion, where to ends when not given"
            ),
        ),
        _ => failure,
    }
}

/// Instants the read models can hold: years 1 to 9999, and no fraction of
/// a second within 9999's last (a `to` is rounded up to the next whole
/// second, which would be in year 10000).
fn within_instants(bounds: [(&str, Option<DateTime<Utc>>); 2]) -> Result<(), Failure> {
    within_years(bounds)?;
    for (name, t) in bounds {
        if let Some(t) = t
            && (t.timestamp(), t.timestamp_subsec_nanos()) > (LAST_SECOND, 0)
        {
            return Err(Failure::bad_request(
                name,
                "invalid_parameter",
                format!("{name} must be at most 9999-12-31T23:59:59Z"),
            ));
        }
    }
    Ok(())
}

/// 9999-12-31T23:59:59Z, in seconds since the Unix epoch.
const LAST_SECOND: i64 = 253_402_300_799;

/// Dates and times the read models can hold: years 1 to 9999.
fn within_years<D: chrono::Datelike>(bounds: [(&str, Option<D>); 2]) -> Result<(), Failure> {
    for (name, t) in bounds {
        if let Some(t) = t
            && !(1..=9999).contains(&t.year())
        {
            return Err(Failure::bad_request(
                name,
                "invalid_parameter",
                format!("{name} must be between years 1 and 9999"),
            ));
        }
    }
    Ok(())
}
