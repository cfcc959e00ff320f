//! The query side of the read models: one method per API endpoint, answered
//! by SQLite ([`sqlite::SqliteQueries`]) and PostgreSQL
//! ([`postgres::PgQueries`]) with identical results for the same read models.
//!
//! Every answer is a [`Read`]: the rows and the checkpoint they were read at,
//! taken in the same transaction (snapshot) as the rows. An endpoint reads one
//! projection; its checkpoint for an institution is that of the checkpoint key
//! that owns the institution (the whole projection, or its partition) and has
//! gone furthest.
//!
//! Lists are keyset-paginated: a page ends with the sort key of its last row,
//! and the next page starts strictly after it. Sorting on an immutable key
//! (ids, positions, finish times) makes a walk over every page see every row
//! that existed when it started exactly once, whatever is appended meanwhile.
//! Sorting on a mutable value (a name, a completion count) is a live
//! ordering: a row whose value changes between two pages may move.
//!
//! This module holds the types, the trait and the pure parts both backends
//! share (the SQL text, row decoding, checkpoint arithmetic and activity
//! buckets).

pub mod postgres;
pub mod sqlite;

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, Months, NaiveDate, TimeDelta, Utc};
use tracker_store::Position;
use uuid::Uuid;

use crate::plan::ProjectionKind;
use crate::readstore::Partition;
use crate::sqlite::{from_sql_id, sql_id, sql_time};

/// Most buckets one activity answer holds.
pub const MAX_BUCKETS: u64 = 1000;

/// A value and the checkpoint it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read<T> {
    pub value: T,
    /// Every event up to this position is reflected in `value`.
    pub consistent_through: Position,
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<T> {
    Found(T),
    /// The read model knows nothing of the institution (no completion yet).
    UnknownInstitution,
    /// The institution is known but the trail or learner asked for is not.
    UnknownEntity,
}

impl<T> Lookup<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Lookup<U> {
        match self {
            Self::Found(t) => Lookup::Found(f(t)),
            Self::UnknownInstitution => Lookup::UnknownInstitution,
            Self::UnknownEntity => Lookup::UnknownEntity,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub institution_id: u64,
    pub completions: u64,
    pub learners: u64,
    pub trails: u64,
    pub courses: u64,
    pub first_completed_at: DateTime<Utc>,
    pub last_completed_at: DateTime<Utc>,
    /// Position of the last completion of this institution.
    pub last_position: Position,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trail {
    pub trail_id: u64,
    /// The name in the latest completion (by log position).
    pub name: String,
    pub completions: u64,
    /// Distinct learners who completed it.
    pub learners: u64,
    pub first_completed_at: DateTime<Utc>,
    pub last_completed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CourseRef {
    pub course_id: u64,
    pub title: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailDetail {
    pub trail: Trail,
    /// Every course ever listed in the trail, by id; titles are the latest.
    pub courses: Vec<CourseRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Course {
    pub course_id: u64,
    pub title: String,
    /// Completions of trails that list the course.
    pub completions: u64,
    pub learners: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learner {
    pub user_id: u64,
    pub name: String,
    pub email: String,
    /// Distinct trails completed.
    pub trails: u64,
    pub completions: u64,
    pub first_completed_at: DateTime<Utc>,
    pub last_completed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnerTrail {
    pub trail_id: u64,
    pub completions: u64,
    pub first_completed_at: DateTime<Utc>,
    pub last_completed_at: DateTime<Utc>,
}

/// One trail completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletionRow {
    pub position: Position,
    pub event_id: Uuid,
    pub user_id: u64,
    pub trail_id: u64,
    /// The trail's name in this completion.
    pub trail_name: String,
    pub finished_at: DateTime<Utc>,
    /// As the source wrote it (wall time in the source's zone).
    pub finished_at_raw: String,
    /// The source-local calendar day.
    pub day: NaiveDate,
    pub courses: CoursesJson,
}

/// A completion's courses as the answer's JSON text,
/// `[{"course_id":1,"title":"..."}]`, for writing into the answer as it is.
///
/// A page of completions is mostly courses: decoding each title into a
/// `String` and encoding it again was a third of its instructions. The
/// stored text (`[{"id":1,"title":"..."}]`, written by `serde_json` in
/// [`crate::sqlite::courses_json`] for both backends) only needs its keys
/// renamed; its titles' strings are the ones `serde_json` (and `sonic-rs`)
/// would write for the decoded titles, so the answer's bytes do not change.
/// The text is not checked here: the answer's encoder parses it once as it
/// copies it, and a damaged row fails that answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoursesJson(String);

impl CoursesJson {
    /// The stored text with its keys renamed. `{"id":` in JSON text is
    /// always an object whose first key is `id`, never part of a title:
    /// inside a string `"` is escaped, and a `"` that closes a string is
    /// never followed by a letter, so that `"` opens one and the `{` before
    /// it is outside any string.
    pub fn from_stored(stored: &str) -> Self {
        const STORED: &str = r#"{"id":"#;
        const ANSWER: &str = r#"{"course_id":"#;
        // `memmem` (SIMD) instead of `str::replace`, whose search was a
        // tenth of a page of completions.
        let mut text = String::with_capacity(stored.len() + stored.len() / 4);
        let mut copied = 0;
        for at in memchr::memmem::find_iter(stored.as_bytes(), STORED) {
            text.push_str(&stored[copied..at]);
            text.push_str(ANSWER);
            copied = at + STORED.len();
        }
        text.push_str(&stored[copied..]);
        Self(text)
    }

    /// The JSON text: `[{"course_id":1,"title":"..."}]`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnerDetail {
    pub learner: Learner,
    /// By trail id.
    pub trails: Vec<LearnerTrail>,
    /// Every completion, by position.
    pub completions: Vec<CompletionRow>,
}

/// A learner of one trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailLearner {
    pub user_id: u64,
    pub name: String,
    pub email: String,
    /// Completions of this trail by this learner.
    pub completions: u64,
    pub first_completed_at: DateTime<Utc>,
    pub last_completed_at: DateTime<Utc>,
}

/// Sort of trails, courses and learners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListSort {
    /// By id, ascending. Immutable: exact walks.
    Id,
    /// By name (title for courses) in byte order, then id. Live.
    Name,
    /// Most completions first, ties by id descending. Live.
    Completions,
}

/// Where a page of trails, courses, learners or trail learners starts
/// (exclusive): the sort key of the previous page's last row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SortKey {
    Id(u64),
    Name(String, u64),
    Completions(u64, u64),
}

impl SortKey {
    pub fn fits(&self, sort: ListSort) -> bool {
        matches!(
            (self, sort),
            (Self::Id(_), ListSort::Id)
                | (Self::Name(..), ListSort::Name)
                | (Self::Completions(..), ListSort::Completions)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompletionSort {
    /// By log position. Immutable.
    Position,
    /// By finish time, then position. Immutable.
    FinishedAt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompletionKey {
    Position(Position),
    FinishedAt(DateTime<Utc>, Position),
}

impl CompletionKey {
    pub fn fits(&self, sort: CompletionSort) -> bool {
        matches!(
            (self, sort),
            (Self::Position(_), CompletionSort::Position)
                | (Self::FinishedAt(..), CompletionSort::FinishedAt)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest<S, K> {
    pub sort: S,
    pub after: Option<K>,
    /// At least 1.
    pub limit: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T, K> {
    pub items: Vec<T>,
    /// The key to continue after; `None` on the last page.
    pub next: Option<K>,
}

/// Filters of the completions list. Times are instants: `from` inclusive,
/// `to` exclusive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompletionFilter {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub trail_id: Option<u64>,
    pub user_id: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bucket {
    Day,
    /// ISO weeks, Monday to Sunday.
    Week,
    /// Calendar months.
    Month,
}

/// Source-local calendar days, both inclusive; `None`: the first (last) day
/// with a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivityRequest {
    pub bucket: Bucket,
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityBucket {
    /// First day of the bucket.
    pub start: NaiveDate,
    /// Last day of the bucket (inclusive).
    pub end: NaiveDate,
    pub completions: u64,
    /// Distinct learners with a completion in the bucket.
    pub learners: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    pub bucket: Bucket,
    /// The first day of the first bucket.
    pub from: NaiveDate,
    /// The last day of the last bucket.
    pub to: NaiveDate,
    /// Every bucket from `from` to `to`, empty ones included.
    pub buckets: Vec<ActivityBucket>,
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("read store: {0}")]
    Storage(String),
    /// A page key that does not belong to the requested sort.
    #[error("the page key does not fit the sort")]
    KeyMismatch,
    #[error("{buckets} buckets asked for; at most {max} fit in one answer")]
    TooManyBuckets { buckets: u64, max: u64 },
    #[error("from ({from}) is after to ({to})")]
    EmptyRange { from: NaiveDate, to: NaiveDate },
}

pub(crate) fn storage(e: impl fmt::Display) -> QueryError {
    QueryError::Storage(e.to_string())
}

impl From<rusqlite::Error> for QueryError {
    fn from(e: rusqlite::Error) -> Self {
        storage(e)
    }
}

/// The read models, one method per endpoint. Dyn-compatible.
#[async_trait]
pub trait ReadModelQueries: Send + Sync + fmt::Debug {
    /// Where `projection` stands for `institution`: the position every
    /// answer of the endpoints that read it is at least at.
    async fn consistent_through(
        &self,
        institution: u64,
        projection: ProjectionKind,
    ) -> Result<Position, QueryError>;

    /// Institutions projection.
    async fn summary(&self, institution: u64) -> Result<Read<Option<Summary>>, QueryError>;

    /// Institutions projection.
    async fn trails(
        &self,
        institution: u64,
        page: PageRequest<ListSort, SortKey>,
    ) -> Result<Read<Lookup<Page<Trail, SortKey>>>, QueryError>;

    /// Institutions projection.
    async fn trail(
        &self,
        institution: u64,
        trail: u64,
    ) -> Result<Read<Lookup<TrailDetail>>, QueryError>;

    /// Learners projection. `page.sort` must be [`ListSort::Id`] (by user id).
    async fn trail_learners(
        &self,
        institution: u64,
        trail: u64,
        page: PageRequest<ListSort, SortKey>,
    ) -> Result<Read<Lookup<Page<TrailLearner, SortKey>>>, QueryError>;

    /// Institutions projection.
    async fn courses(
        &self,
        institution: u64,
        page: PageRequest<ListSort, SortKey>,
    ) -> Result<Read<Lookup<Page<Course, SortKey>>>, QueryError>;

    /// Learners projection.
    async fn learners(
        &self,
        institution: u64,
        page: PageRequest<ListSort, SortKey>,
    ) -> Result<Read<Lookup<Page<Learner, SortKey>>>, QueryError>;

    /// Learners projection.
    async fn learner(
        &self,
        institution: u64,
        user: u64,
    ) -> Result<Read<Lookup<LearnerDetail>>, QueryError>;

    /// Learners projection.
    async fn completions(
        &self,
        institution: u64,
        filter: CompletionFilter,
        page: PageRequest<CompletionSort, CompletionKey>,
    ) -> Result<Read<Lookup<Page<CompletionRow, CompletionKey>>>, QueryError>;

    /// Institutions projection.
    async fn activity(
        &self,
        institution: u64,
        request: ActivityRequest,
    ) -> Result<Read<Lookup<Activity>>, QueryError>;
}

/// The checkpoint of `projection` for `institution`: the furthest of the
/// checkpoint keys that own it (the whole projection or its partition); 0
/// when none has started. Keys this build cannot read are ignored.
pub fn consistent_through(
    checkpoints: &[(String, Position)],
    institution: u64,
    projection: ProjectionKind,
) -> Position {
    checkpoints
        .iter()
        .filter_map(|(key, position)| {
            let (name, partition) = match key.split_once('@') {
                Some((name, partition)) => (name, Partition::parse(partition).ok()?),
                None => (key.as_str(), Partition::WHOLE),
            };
            (ProjectionKind::parse(name)? == projection && partition.owns(institution))
                .then_some(*position)
        })
        .max()
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Activity buckets (pure).

/// The first day of the bucket holding `day`.
pub fn bucket_start(bucket: Bucket, day: NaiveDate) -> NaiveDate {
    match bucket {
        Bucket::Day => day,
        // Only the earliest dates chrono holds have no Monday before them.
        Bucket::Week => day
            .checked_sub_signed(TimeDelta::days(i64::from(
                day.weekday().num_days_from_monday(),
            )))
            .unwrap_or(NaiveDate::MIN),
        Bucket::Month => day.with_day(1).unwrap_or(day),
    }
}

/// The first day of the bucket after the one starting at `start`.
fn next_bucket(bucket: Bucket, start: NaiveDate) -> Option<NaiveDate> {
    match bucket {
        Bucket::Day => start.succ_opt(),
        Bucket::Week => start.checked_add_signed(TimeDelta::days(7)),
        Bucket::Month => start.checked_add_months(Months::new(1)),
    }
}

/// `[from, to]` widened to whole buckets, and how many buckets that is.
pub fn snap(bucket: Bucket, from: NaiveDate, to: NaiveDate) -> (NaiveDate, NaiveDate, u64) {
    let start = bucket_start(bucket, from);
    let last_start = bucket_start(bucket, to);
    let end = next_bucket(bucket, last_start)
        .and_then(|d| d.pred_opt())
        .unwrap_or(to);
    let count = match bucket {
        Bucket::Day => (last_start - start).num_days() + 1,
        Bucket::Week => (last_start - start).num_days() / 7 + 1,
        Bucket::Month => {
            let months = |d: NaiveDate| i64::from(d.year()) * 12 + i64::from(d.month0());
            months(last_start) - months(start) + 1
        }
    };
    (start, end, u64::try_from(count).unwrap_or(0))
}

/// The day as the read models store it; days outside what four-digit years
/// can write are clamped, which no stored day is.
pub(crate) fn day_text(day: NaiveDate) -> String {
    let min = NaiveDate::from_ymd_opt(1, 1, 1).unwrap_or(NaiveDate::MIN);
    let max = NaiveDate::from_ymd_opt(9999, 12, 31).unwrap_or(NaiveDate::MAX);
    day.clamp(min, max).format("%Y-%m-%d").to_string()
}

pub(crate) fn parse_day(text: &str) -> Result<NaiveDate, QueryError> {
    tracker_domain::rfc3339::parse_day(text)
        .map_err(|e| storage(format!("stored day {text:?} is not a date: {e}")))
}

/// Checks an activity range before it is read.
pub(crate) fn activity_plan(
    bucket: Bucket,
    first: NaiveDate,
    last: NaiveDate,
) -> Result<(), QueryError> {
    if first > last {
        return Err(QueryError::EmptyRange {
            from: first,
            to: last,
        });
    }
    let (_, _, buckets) = snap(bucket, first, last);
    if buckets > MAX_BUCKETS {
        return Err(QueryError::TooManyBuckets {
            buckets,
            max: MAX_BUCKETS,
        });
    }
    Ok(())
}

/// Daily rows (day, completions, distinct learners that day) and, for
/// buckets longer than a day, the (day, learner) pairs, folded into every
/// bucket from `start` to `end`.
pub fn bucketize(
    bucket: Bucket,
    start: NaiveDate,
    end: NaiveDate,
    days: &[(NaiveDate, u64, u64)],
    day_learners: &[(NaiveDate, u64)],
) -> Vec<ActivityBucket> {
    let mut buckets: BTreeMap<NaiveDate, ActivityBucket> = BTreeMap::new();
    let mut cursor = Some(start);
    while let Some(s) = cursor.filter(|s| *s <= end) {
        let next = next_bucket(bucket, s);
        let last = next.and_then(|n| n.pred_opt()).unwrap_or(end);
        buckets.insert(
            s,
            ActivityBucket {
                start: s,
                end: last,
                completions: 0,
                learners: 0,
            },
        );
        cursor = next;
    }
    for (day, completions, learners) in days {
        if let Some(b) = buckets.get_mut(&bucket_start(bucket, *day)) {
            b.completions += completions;
            if bucket == Bucket::Day {
                b.learners += learners;
            }
        }
    }
    if bucket != Bucket::Day {
        let mut seen: HashSet<(NaiveDate, u64)> = HashSet::new();
        for (day, user) in day_learners {
            let s = bucket_start(bucket, *day);
            if seen.insert((s, *user))
                && let Some(b) = buckets.get_mut(&s)
            {
                b.learners += 1;
            }
        }
    }
    buckets.into_values().collect()
}

// ---------------------------------------------------------------------------
// SQL shared by both backends. `{s}` is the table prefix (empty for SQLite,
// `schema.` for PostgreSQL), `{C}` the byte-order collation of sorted text
// (SQLite's default; `COLLATE "C"` on PostgreSQL) and `{by_user}` SQLite's
// `INDEXED BY` of a learner's completions (see [`completions_sql`]).
// Parameters are `$n`, numbered in order of first appearance, which SQLite
// binds by position too.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// A bound value, converted by each backend.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Param {
    Int(i64),
    Text(String),
    /// Whole seconds (what both stores keep).
    Time(DateTime<Utc>),
}

pub(crate) fn render(sql: &str, dialect: Dialect, schema: &str) -> String {
    let (prefix, collate, by_user) = match dialect {
        Dialect::Sqlite => (String::new(), "", " INDEXED BY lrn_completions_by_user"),
        Dialect::Postgres => (format!("{schema}."), " COLLATE \"C\"", ""),
    };
    // One pass and one allocation: this runs for every statement of every
    // answer.
    let mut out = String::with_capacity(sql.len() + 4 * prefix.len());
    let mut rest = sql;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        rest = if let Some(after) = tail.strip_prefix("{s}") {
            out.push_str(&prefix);
            after
        } else if let Some(after) = tail.strip_prefix("{C}") {
            out.push_str(collate);
            after
        } else if let Some(after) = tail.strip_prefix("{by_user}") {
            out.push_str(by_user);
            after
        } else {
            out.push('{');
            &tail[1..]
        };
    }
    out.push_str(rest);
    out
}

/// An instant rounded up to whole seconds: the stored times have whole
/// seconds, so `t >= x` and `t < x` mean the same on the rounded value.
pub(crate) fn ceil_second(t: DateTime<Utc>) -> DateTime<Utc> {
    let floor = DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t);
    if floor == t {
        t
    } else {
        floor + TimeDelta::seconds(1)
    }
}

pub(crate) const CHECKPOINTS_SQL: &str = "SELECT key, position FROM {s}checkpoints";

pub(crate) const SUMMARY_SQL: &str = "SELECT institution_id, completions, learners, trails, courses, \
     first_completed_at, last_completed_at, last_position FROM {s}inst_summary WHERE institution_id = $1";

pub(crate) const LEARNERS_KNOWN_SQL: &str =
    "SELECT 1 FROM {s}lrn_learners WHERE institution_id = $1 LIMIT 1";

pub(crate) const TRAIL_SQL: &str = "SELECT trail_id, name, completions, learners, first_completed_at, \
     last_completed_at FROM {s}inst_trails WHERE institution_id = $1 AND trail_id = $2";

pub(crate) const TRAIL_COURSES_SQL: &str = "SELECT tc.course_id, c.title FROM {s}inst_trail_courses tc \
     JOIN {s}inst_courses c ON c.institution_id = tc.institution_id AND c.course_id = tc.course_id \
     WHERE tc.institution_id = $1 AND tc.trail_id = $2 ORDER BY tc.course_id";

pub(crate) const TRAIL_KNOWN_TO_LEARNERS_SQL: &str =
    "SELECT 1 FROM {s}lrn_learner_trails WHERE institution_id = $1 AND trail_id = $2 LIMIT 1";

pub(crate) const LEARNER_SQL: &str = "SELECT user_id, name, email, trails, completions, first_completed_at, \
     last_completed_at FROM {s}lrn_learners WHERE institution_id = $1 AND user_id = $2";

pub(crate) const LEARNER_TRAILS_SQL: &str = "SELECT trail_id, completions, first_completed_at, last_completed_at \
     FROM {s}lrn_learner_trails WHERE institution_id = $1 AND user_id = $2 ORDER BY trail_id";

const COMPLETION_COLUMNS: &str = "position, event_id, user_id, trail_id, trail_name, finished_at, \
     finished_at_raw, day, courses";

pub(crate) fn learner_completions_sql() -> String {
    format!(
        "SELECT {COMPLETION_COLUMNS} FROM {{s}}lrn_completions{{by_user}} \
         WHERE institution_id = $1 AND user_id = $2 ORDER BY position"
    )
}

pub(crate) const ACTIVITY_BOUNDS_SQL: &str = "SELECT \
     (SELECT MIN(day) FROM {s}inst_daily WHERE institution_id = $1), \
     (SELECT MAX(day) FROM {s}inst_daily WHERE institution_id = $1)";

pub(crate) const ACTIVITY_DAYS_SQL: &str = "SELECT day, completions, learners FROM {s}inst_daily \
     WHERE institution_id = $1 AND day >= $2 AND day <= $3 ORDER BY day";

pub(crate) const ACTIVITY_DAY_LEARNERS_SQL: &str = "SELECT day, user_id FROM {s}inst_m_day_learners \
     WHERE institution_id = $1 AND day >= $2 AND day <= $3 ORDER BY day, user_id";

/// Which list, for [`list_sql`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListKind {
    Trails,
    Courses,
    Learners,
    TrailLearners,
}

impl ListKind {
    /// (columns, from-and-join, id column, name column, count column, the
    /// parameters of the `WHERE` before the page condition)
    fn parts(
        self,
    ) -> (
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        usize,
    ) {
        match self {
            Self::Trails => (
                "trail_id, name, completions, learners, first_completed_at, last_completed_at",
                "{s}inst_trails WHERE institution_id = $1",
                "trail_id",
                "name",
                "completions",
                1,
            ),
            Self::Courses => (
                "course_id, title, completions, learners",
                "{s}inst_courses WHERE institution_id = $1",
                "course_id",
                "title",
                "completions",
                1,
            ),
            Self::Learners => (
                "user_id, name, email, trails, completions, first_completed_at, last_completed_at",
                "{s}lrn_learners WHERE institution_id = $1",
                "user_id",
                "name",
                "completions",
                1,
            ),
            Self::TrailLearners => (
                "lt.user_id, l.name, l.email, lt.completions, lt.first_completed_at, lt.last_completed_at",
                "{s}lrn_learner_trails lt JOIN {s}lrn_learners l \
                 ON l.institution_id = lt.institution_id AND l.user_id = lt.user_id \
                 WHERE lt.institution_id = $1 AND lt.trail_id = $2",
                "lt.user_id",
                "l.name",
                "lt.completions",
                2,
            ),
        }
    }
}

/// The SQL of one page and its parameters after the fixed ones (`$1`, and
/// `$2` for trail learners). Fetches `limit + 1` rows to tell whether more
/// follow.
pub(crate) fn list_sql(
    kind: ListKind,
    page: &PageRequest<ListSort, SortKey>,
) -> Result<(String, Vec<Param>), QueryError> {
    let (columns, from, id, name, count, fixed) = kind.parts();
    let mut n = fixed;
    let mut next = || {
        n += 1;
        format!("${n}")
    };
    let mut params = Vec::new();
    let condition = match (&page.after, page.sort) {
        (None, _) => String::new(),
        (Some(SortKey::Id(after)), ListSort::Id) => {
            params.push(Param::Int(sql_id(*after)));
            format!(" AND {id} > {}", next())
        }
        (Some(SortKey::Name(value, after)), ListSort::Name) => {
            params.push(Param::Text(value.clone()));
            params.push(Param::Int(sql_id(*after)));
            format!(" AND ({name}{{C}}, {id}) > ({}, {})", next(), next())
        }
        (Some(SortKey::Completions(value, after)), ListSort::Completions) => {
            params.push(Param::Int(count_param(*value)));
            params.push(Param::Int(sql_id(*after)));
            format!(" AND ({count}, {id}) < ({}, {})", next(), next())
        }
        _ => return Err(QueryError::KeyMismatch),
    };
    let order = match page.sort {
        ListSort::Id => id.to_owned(),
        ListSort::Name => format!("{name}{{C}}, {id}"),
        ListSort::Completions => format!("{count} DESC, {id} DESC"),
    };
    params.push(Param::Int(limit_param(page.limit)));
    let sql = format!(
        "SELECT {columns} FROM {from}{condition} ORDER BY {order} LIMIT {}",
        next()
    );
    Ok((sql, params))
}

/// A page key of another sort is refused before anything is read, on
/// every backend alike.
pub(crate) fn check_list_page(page: &PageRequest<ListSort, SortKey>) -> Result<(), QueryError> {
    match &page.after {
        Some(k) if !k.fits(page.sort) => Err(QueryError::KeyMismatch),
        _ => Ok(()),
    }
}

pub(crate) fn check_completion_page(
    page: &PageRequest<CompletionSort, CompletionKey>,
) -> Result<(), QueryError> {
    match &page.after {
        Some(k) if !k.fits(page.sort) => Err(QueryError::KeyMismatch),
        _ => Ok(()),
    }
}

fn count_param(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX)
}

/// The SQL of one page of completions and all its parameters.
pub(crate) fn completions_sql(
    institution: u64,
    filter: &CompletionFilter,
    page: &PageRequest<CompletionSort, CompletionKey>,
) -> Result<(String, Vec<Param>), QueryError> {
    let mut params = vec![Param::Int(sql_id(institution))];
    // A time window in position order has no index in that order: its
    // rows are found by time and sorted. Then sort only their positions,
    // read from the time index alone, and fetch the page's rows by
    // position, rather than fetch every row of the window to sort it
    // (4,400 rows of the largest institution for a month, to answer 50).
    // A learner's completions are few: they are read in log order and
    // filtered by time, or sorted by time, from the learner's log-order
    // index, which SQLite is told to use (without statistics it would
    // take the institution's time index and filter the learner out of
    // all of it). A time index per learner cost a live batch a tenth of
    // the bytes it wrote.
    let window_by_position = page.sort == CompletionSort::Position
        && filter.user_id.is_none()
        && (filter.from.is_some() || filter.to.is_some());
    let columns = if window_by_position {
        "position"
    } else {
        COMPLETION_COLUMNS
    };
    let by_user = if filter.user_id.is_some() {
        "{by_user}"
    } else {
        ""
    };
    let mut sql =
        format!("SELECT {columns} FROM {{s}}lrn_completions{by_user} WHERE institution_id = $1");
    let mut bind = |sql: &mut String, clause: &str, value: Param| {
        params.push(value);
        sql.push_str(&clause.replace('?', &format!("${}", params.len())));
    };
    if let Some(user) = filter.user_id {
        bind(&mut sql, " AND user_id = ?", Param::Int(sql_id(user)));
    }
    if let Some(trail) = filter.trail_id {
        bind(&mut sql, " AND trail_id = ?", Param::Int(sql_id(trail)));
    }
    if let Some(from) = filter.from {
        bind(
            &mut sql,
            " AND finished_at >= ?",
            Param::Time(ceil_second(from)),
        );
    }
    if let Some(to) = filter.to {
        bind(
            &mut sql,
            " AND finished_at < ?",
            Param::Time(ceil_second(to)),
        );
    }
    match (&page.after, page.sort) {
        (None, _) => {}
        (Some(CompletionKey::Position(p)), CompletionSort::Position) => {
            bind(
                &mut sql,
                " AND position > ?",
                Param::Int(position_param(*p)),
            );
        }
        (Some(CompletionKey::FinishedAt(t, p)), CompletionSort::FinishedAt) => {
            bind(
                &mut sql,
                " AND (finished_at, position) > (?",
                Param::Time(*t),
            );
            bind(&mut sql, ", ?)", Param::Int(position_param(*p)));
        }
        _ => return Err(QueryError::KeyMismatch),
    }
    sql.push_str(match page.sort {
        CompletionSort::Position => " ORDER BY position",
        CompletionSort::FinishedAt => " ORDER BY finished_at, position",
    });
    bind(&mut sql, " LIMIT ?", Param::Int(limit_param(page.limit)));
    if window_by_position {
        sql = format!(
            "SELECT {COMPLETION_COLUMNS} FROM {{s}}lrn_completions \
             WHERE position IN ({sql}) ORDER BY position"
        );
    }
    Ok((sql, params))
}

/// SQLite's page of a time window in position order (without a learner,
/// whose completions are few): the institution's (or trail's)
/// completions in log order between the first and the last position the
/// completions of the window's UTC days have (`lrn_completion_days`),
/// filtered by time until the page is full. Completions arrive roughly in
/// time order, so this reads about a page of rows where
/// [`completions_sql`] sorts the whole window (thousands for a month of a
/// large institution). `None` for the other pages.
pub(crate) fn window_in_day_range_sql(
    institution: u64,
    filter: &CompletionFilter,
    page: &PageRequest<CompletionSort, CompletionKey>,
) -> Option<Result<(String, Vec<Param>), QueryError>> {
    if page.sort != CompletionSort::Position
        || filter.user_id.is_some()
        || (filter.from.is_none() && filter.to.is_none())
    {
        return None;
    }
    let after = match page.after {
        None => 0,
        Some(CompletionKey::Position(p)) => position_param(p).saturating_add(1),
        Some(CompletionKey::FinishedAt(..)) => return Some(Err(QueryError::KeyMismatch)),
    };
    let index = match filter.trail_id {
        Some(_) => "lrn_completions_by_trail",
        None => "lrn_completions_by_institution",
    };
    // SQLite numbers `$N` parameters in order of first appearance: bind in
    // the statement's text order.
    let mut params = vec![Param::Int(sql_id(institution))];
    let mut sql = format!(
        "SELECT {COMPLETION_COLUMNS} FROM {{s}}lrn_completions INDEXED BY {index} \
         WHERE institution_id = $1"
    );
    let mut bind = |sql: &mut String, clause: &str, value: Param| {
        params.push(value);
        sql.push_str(&clause.replace('?', &format!("${}", params.len())));
    };
    if let Some(trail) = filter.trail_id {
        bind(&mut sql, " AND trail_id = ?", Param::Int(sql_id(trail)));
    }
    let from = filter.from.map(ceil_second);
    let to = filter.to.map(ceil_second);
    let mut days = String::from(" FROM {s}lrn_completion_days WHERE institution_id = $1");
    if let Some(from) = from {
        bind(
            &mut days,
            " AND day >= ?",
            Param::Int(crate::sqlite::utc_day(from)),
        );
    }
    if let Some(to) = to {
        bind(
            &mut days,
            " AND day <= ?",
            Param::Int(crate::sqlite::utc_day(to)),
        );
    }
    // `days` holds no `?`: only the cursor's placeholder is filled here.
    bind(
        &mut sql,
        &format!(" AND position BETWEEN max((SELECT MIN(first_position){days}), ?)"),
        Param::Int(after),
    );
    sql.push_str(&format!(" AND (SELECT MAX(last_position){days})"));
    if let Some(from) = from {
        bind(&mut sql, " AND finished_at >= ?", Param::Time(from));
    }
    if let Some(to) = to {
        bind(&mut sql, " AND finished_at < ?", Param::Time(to));
    }
    bind(
        &mut sql,
        " ORDER BY position LIMIT ?",
        Param::Int(limit_param(page.limit)),
    );
    Some(Ok((sql, params)))
}

fn position_param(p: Position) -> i64 {
    i64::try_from(p).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------
// Row decoding shared by both backends.

/// The column reads both backends' rows offer.
pub(crate) trait RowRead {
    fn int(&self, i: usize) -> Result<i64, QueryError>;
    fn text(&self, i: usize) -> Result<String, QueryError>;
    /// A text column borrowed from the row, for a value that is copied
    /// into something else anyway (one allocation and copy fewer).
    fn str(&self, i: usize) -> Result<&str, QueryError>;
    fn time(&self, i: usize) -> Result<DateTime<Utc>, QueryError>;
    fn uuid(&self, i: usize) -> Result<Uuid, QueryError>;
    fn opt_text(&self, i: usize) -> Result<Option<String>, QueryError>;
}

fn count(row: &impl RowRead, i: usize) -> Result<u64, QueryError> {
    let v = row.int(i)?;
    u64::try_from(v).map_err(|_| storage(format!("negative count {v} in column {i}")))
}

fn id(row: &impl RowRead, i: usize) -> Result<u64, QueryError> {
    Ok(from_sql_id(row.int(i)?))
}

pub(crate) fn decode_summary(row: &impl RowRead) -> Result<Summary, QueryError> {
    Ok(Summary {
        institution_id: id(row, 0)?,
        completions: count(row, 1)?,
        learners: count(row, 2)?,
        trails: count(row, 3)?,
        courses: count(row, 4)?,
        first_completed_at: row.time(5)?,
        last_completed_at: row.time(6)?,
        last_position: count(row, 7)?,
    })
}

pub(crate) fn decode_trail(row: &impl RowRead) -> Result<Trail, QueryError> {
    Ok(Trail {
        trail_id: id(row, 0)?,
        name: row.text(1)?,
        completions: count(row, 2)?,
        learners: count(row, 3)?,
        first_completed_at: row.time(4)?,
        last_completed_at: row.time(5)?,
    })
}

pub(crate) fn decode_course_ref(row: &impl RowRead) -> Result<CourseRef, QueryError> {
    Ok(CourseRef {
        course_id: id(row, 0)?,
        title: row.text(1)?,
    })
}

pub(crate) fn decode_course(row: &impl RowRead) -> Result<Course, QueryError> {
    Ok(Course {
        course_id: id(row, 0)?,
        title: row.text(1)?,
        completions: count(row, 2)?,
        learners: count(row, 3)?,
    })
}

pub(crate) fn decode_learner(row: &impl RowRead) -> Result<Learner, QueryError> {
    Ok(Learner {
        user_id: id(row, 0)?,
        name: row.text(1)?,
        email: row.text(2)?,
        trails: count(row, 3)?,
        completions: count(row, 4)?,
        first_completed_at: row.time(5)?,
        last_completed_at: row.time(6)?,
    })
}

pub(crate) fn decode_learner_trail(row: &impl RowRead) -> Result<LearnerTrail, QueryError> {
    Ok(LearnerTrail {
        trail_id: id(row, 0)?,
        completions: count(row, 1)?,
        first_completed_at: row.time(2)?,
        last_completed_at: row.time(3)?,
    })
}

pub(crate) fn decode_trail_learner(row: &impl RowRead) -> Result<TrailLearner, QueryError> {
    Ok(TrailLearner {
        user_id: id(row, 0)?,
        name: row.text(1)?,
        email: row.text(2)?,
        completions: count(row, 3)?,
        first_completed_at: row.time(4)?,
        last_completed_at: row.time(5)?,
    })
}

pub(crate) fn decode_completion(row: &impl RowRead) -> Result<CompletionRow, QueryError> {
    Ok(CompletionRow {
        position: count(row, 0)?,
        event_id: row.uuid(1)?,
        user_id: id(row, 2)?,
        trail_id: id(row, 3)?,
        trail_name: row.text(4)?,
        finished_at: row.time(5)?,
        finished_at_raw: row.text(6)?,
        day: parse_day(&row.text(7)?)?,
        courses: CoursesJson::from_stored(row.str(8)?),
    })
}

pub(crate) fn decode_checkpoint(row: &impl RowRead) -> Result<(String, Position), QueryError> {
    Ok((row.text(0)?, count(row, 1)?))
}

/// The key of a list row, for the next page.
pub(crate) trait Keyed {
    fn key(&self, sort: ListSort) -> SortKey;
}

impl Keyed for Trail {
    fn key(&self, sort: ListSort) -> SortKey {
        list_key(sort, self.trail_id, &self.name, self.completions)
    }
}

impl Keyed for Course {
    fn key(&self, sort: ListSort) -> SortKey {
        list_key(sort, self.course_id, &self.title, self.completions)
    }
}

impl Keyed for Learner {
    fn key(&self, sort: ListSort) -> SortKey {
        list_key(sort, self.user_id, &self.name, self.completions)
    }
}

impl Keyed for TrailLearner {
    fn key(&self, sort: ListSort) -> SortKey {
        list_key(sort, self.user_id, &self.name, self.completions)
    }
}

fn list_key(sort: ListSort, id: u64, name: &str, completions: u64) -> SortKey {
    match sort {
        ListSort::Id => SortKey::Id(id),
        ListSort::Name => SortKey::Name(name.to_owned(), id),
        ListSort::Completions => SortKey::Completions(completions, id),
    }
}

/// Cuts the `limit + 1` rows fetched to a page.
pub(crate) fn into_page<T, K>(mut rows: Vec<T>, limit: usize, key: impl Fn(&T) -> K) -> Page<T, K> {
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = if more { rows.last().map(key) } else { None };
    Page { items: rows, next }
}

pub(crate) fn completion_key(sort: CompletionSort, row: &CompletionRow) -> CompletionKey {
    match sort {
        CompletionSort::Position => CompletionKey::Position(row.position),
        CompletionSort::FinishedAt => CompletionKey::FinishedAt(row.finished_at, row.position),
    }
}

/// Stored times: RFC 3339 text (SQLite). An instant past year 9999, which
/// builds before [`tracker_domain::TimeError::OutOfRange`] could record and
/// project, was stored with a sign (`+10000-01-01T02:59:59Z`): read as
/// chrono reads it, so such a row answers until a replay drops it.
pub(crate) fn parse_time(text: &str) -> Result<DateTime<Utc>, QueryError> {
    tracker_domain::rfc3339::parse_instant(text)
        .or_else(|_| {
            text.parse::<DateTime<chrono::FixedOffset>>()
                .map(|t| t.with_timezone(&Utc))
        })
        .map_err(|e| storage(format!("stored time {text:?}: {e}")))
}

pub(crate) fn time_text(t: DateTime<Utc>) -> String {
    sql_time(t)
}

/// A first and a later page of completions in each order (cursors at `t`).
#[cfg(test)]
pub(crate) fn completion_pages(
    t: DateTime<Utc>,
) -> [PageRequest<CompletionSort, CompletionKey>; 4] {
    [
        (CompletionSort::Position, None),
        (CompletionSort::Position, Some(CompletionKey::Position(9))),
        (CompletionSort::FinishedAt, None),
        (
            CompletionSort::FinishedAt,
            Some(CompletionKey::FinishedAt(t, 9)),
        ),
    ]
    .map(|(sort, after)| PageRequest {
        sort,
        after,
        limit: 50,
    })
}

/// Every statement shape the backends run, with sample parameters, for
/// checking their plans (`EXPLAIN`) on both backends.
#[cfg(test)]
pub(crate) fn plan_samples() -> Vec<(String, Vec<Param>)> {
    let t = DateTime::parse_from_rfc3339("2024-01-01T10:00:00Z")
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_default();
    let inst = Param::Int(7);
    let mut out: Vec<(String, Vec<Param>)> = vec![
        (SUMMARY_SQL.into(), vec![inst.clone()]),
        (LEARNERS_KNOWN_SQL.into(), vec![inst.clone()]),
        (TRAIL_SQL.into(), vec![inst.clone(), Param::Int(1)]),
        (TRAIL_COURSES_SQL.into(), vec![inst.clone(), Param::Int(1)]),
        (
            TRAIL_KNOWN_TO_LEARNERS_SQL.into(),
            vec![inst.clone(), Param::Int(1)],
        ),
        (LEARNER_SQL.into(), vec![inst.clone(), Param::Int(1)]),
        (LEARNER_TRAILS_SQL.into(), vec![inst.clone(), Param::Int(1)]),
        (learner_completions_sql(), vec![inst.clone(), Param::Int(1)]),
        (ACTIVITY_BOUNDS_SQL.into(), vec![inst.clone()]),
        (
            ACTIVITY_DAYS_SQL.into(),
            vec![
                inst.clone(),
                Param::Text("2024-01-01".into()),
                Param::Text("2024-02-01".into()),
            ],
        ),
        (
            ACTIVITY_DAY_LEARNERS_SQL.into(),
            vec![
                inst.clone(),
                Param::Text("2024-01-01".into()),
                Param::Text("2024-02-01".into()),
            ],
        ),
    ];
    for kind in [
        ListKind::Trails,
        ListKind::Courses,
        ListKind::Learners,
        ListKind::TrailLearners,
    ] {
        let sorts: &[ListSort] = if kind == ListKind::TrailLearners {
            &[ListSort::Id]
        } else {
            &[ListSort::Id, ListSort::Name, ListSort::Completions]
        };
        for sort in sorts {
            let afters = [
                None,
                Some(match sort {
                    ListSort::Id => SortKey::Id(3),
                    ListSort::Name => SortKey::Name("b".into(), 3),
                    ListSort::Completions => SortKey::Completions(5, 3),
                }),
            ];
            for after in afters {
                let page = PageRequest {
                    sort: *sort,
                    after,
                    limit: 50,
                };
                if let Ok((sql, params)) = list_sql(kind, &page) {
                    let mut all = vec![inst.clone()];
                    if kind == ListKind::TrailLearners {
                        all.push(Param::Int(1));
                    }
                    all.extend(params);
                    out.push((sql, all));
                }
            }
        }
    }
    let filters = [
        CompletionFilter::default(),
        CompletionFilter {
            user_id: Some(1),
            ..Default::default()
        },
        CompletionFilter {
            trail_id: Some(1),
            ..Default::default()
        },
        // One learner's time window.
        CompletionFilter {
            user_id: Some(1),
            from: Some(t),
            to: Some(t),
            ..Default::default()
        },
    ];
    for filter in filters {
        for page in completion_pages(t) {
            if let Ok(statement) = completions_sql(7, &filter, &page) {
                out.push(statement);
            }
        }
    }
    // A time window in time order.
    let window = CompletionFilter {
        from: Some(t),
        to: Some(t),
        ..Default::default()
    };
    let page = PageRequest {
        sort: CompletionSort::FinishedAt,
        after: None,
        limit: 50,
    };
    if let Ok(statement) = completions_sql(7, &window, &page) {
        out.push(statement);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    fn decode(courses: &CoursesJson) -> Vec<(u64, String)> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Answer {
            course_id: u64,
            title: String,
        }
        let courses: Vec<Answer> = serde_json::from_str(courses.as_str()).unwrap();
        courses
            .into_iter()
            .map(|c| (c.course_id, c.title))
            .collect()
    }

    /// The stored text of what the writers store, read as the answer's:
    /// keys renamed, titles' strings as stored.
    fn stored_and_answer(courses: &[(u64, String)]) -> (String, String) {
        let stored: Vec<_> = courses
            .iter()
            .map(|(id, title)| serde_json::json!({ "id": id, "title": title }))
            .collect();
        let answer: Vec<_> = courses
            .iter()
            .map(|(id, title)| serde_json::json!({ "course_id": id, "title": title }))
            .collect();
        (
            serde_json::Value::Array(stored).to_string(),
            // `json!` sorts keys: "course_id" before "title", as the answer.
            serde_json::Value::Array(answer).to_string(),
        )
    }

    proptest::proptest! {
        #[test]
        fn stored_courses_read_as_the_answers_courses(
            courses in proptest::collection::vec((proptest::prelude::any::<u64>(), ".*"), 0..6)
        ) {
            let (stored, answer) = stored_and_answer(&courses);
            let read = CoursesJson::from_stored(&stored);
            proptest::prop_assert_eq!(read.as_str(), answer.as_str());
            proptest::prop_assert_eq!(decode(&read), courses);
        }
    }

    #[test]
    fn titles_that_spell_keys_are_not_renamed() {
        let courses = [
            (7, r#"{"id":1}"#.to_owned()),
            (8, r#"[{"id":2,"title":"x"}]"#.to_owned()),
            (9, "{".to_owned()),
            (u64::MAX, r#"\"{\"id\":"#.to_owned()),
        ];
        let (stored, answer) = stored_and_answer(&courses);
        let read = CoursesJson::from_stored(&stored);
        assert_eq!(read.as_str(), answer);
        assert_eq!(decode(&read), courses);
    }

    #[test]
    fn render_fills_schema_and_collation_and_keeps_other_braces() {
        let sql = "SELECT '{x}' FROM {s}a{by_user} JOIN {s}b ORDER BY name{C} -- {";
        assert_eq!(
            render(sql, Dialect::Sqlite, "ignored"),
            "SELECT '{x}' FROM a INDEXED BY lrn_completions_by_user JOIN b ORDER BY name -- {"
        );
        assert_eq!(
            render(sql, Dialect::Postgres, "rm"),
            "SELECT '{x}' FROM rm.a JOIN rm.b ORDER BY name COLLATE \"C\" -- {"
        );
    }

    #[test]
    fn checkpoint_of_the_key_that_owns_the_institution() {
        let cps = vec![
            ("institutions".to_owned(), 10),
            ("institutions@0/2".to_owned(), 30),
            ("institutions@1/2".to_owned(), 20),
            ("learners".to_owned(), 7),
            ("somethingelse".to_owned(), 99),
        ];
        assert_eq!(
            consistent_through(&cps, 4, ProjectionKind::Institutions),
            30
        );
        assert_eq!(
            consistent_through(&cps, 5, ProjectionKind::Institutions),
            20
        );
        assert_eq!(consistent_through(&cps, 5, ProjectionKind::Learners), 7);
        assert_eq!(consistent_through(&[], 5, ProjectionKind::Learners), 0);
        let only_other_partition = vec![("learners@1/2".to_owned(), 50)];
        assert_eq!(
            consistent_through(&only_other_partition, 4, ProjectionKind::Learners),
            0
        );
    }

    #[test]
    fn stored_times_past_year_9999_read_back() {
        let t = parse_time("+10000-01-01T02:59:59Z").unwrap();
        assert_eq!(sql_time(t), "+10000-01-01T02:59:59Z");
        assert_eq!(
            parse_time("2024-03-05T14:07:09Z").unwrap().to_rfc3339(),
            "2024-03-05T14:07:09+00:00"
        );
        assert!(parse_time("2024-03-05").is_err());
    }

    #[test]
    fn the_earliest_dates_have_a_week_without_panicking() {
        // chrono's first date is a Thursday: no Monday before it.
        assert_eq!(bucket_start(Bucket::Week, NaiveDate::MIN), NaiveDate::MIN);
        let (start, _, buckets) = snap(Bucket::Week, NaiveDate::MIN, NaiveDate::MIN);
        assert_eq!((start, buckets), (NaiveDate::MIN, 1));
    }

    #[test]
    fn weeks_start_on_monday_and_months_on_the_first() {
        // 2024-01-03 is a Wednesday.
        assert_eq!(
            bucket_start(Bucket::Week, day("2024-01-03")),
            day("2024-01-01")
        );
        assert_eq!(
            bucket_start(Bucket::Week, day("2024-01-07")),
            day("2024-01-01")
        );
        assert_eq!(
            bucket_start(Bucket::Week, day("2024-01-08")),
            day("2024-01-08")
        );
        assert_eq!(
            bucket_start(Bucket::Month, day("2024-02-29")),
            day("2024-02-01")
        );
        assert_eq!(
            snap(Bucket::Week, day("2024-01-03"), day("2024-01-15")),
            (day("2024-01-01"), day("2024-01-21"), 3)
        );
        assert_eq!(
            snap(Bucket::Month, day("2023-12-31"), day("2024-02-01")),
            (day("2023-12-01"), day("2024-02-29"), 3)
        );
        assert_eq!(
            snap(Bucket::Day, day("2024-02-28"), day("2024-03-01")),
            (day("2024-02-28"), day("2024-03-01"), 3)
        );
    }

    #[test]
    fn buckets_include_empty_ones_and_count_learners_once() {
        let days = [
            (day("2024-01-01"), 2, 2),
            (day("2024-01-02"), 1, 1),
            (day("2024-01-15"), 4, 1),
        ];
        let pairs = [
            (day("2024-01-01"), 1),
            (day("2024-01-01"), 2),
            (day("2024-01-02"), 1),
            (day("2024-01-15"), 3),
        ];
        let weeks = bucketize(
            Bucket::Week,
            day("2024-01-01"),
            day("2024-01-21"),
            &days,
            &pairs,
        );
        let got: Vec<_> = weeks
            .iter()
            .map(|b| {
                (
                    b.start.to_string(),
                    b.end.to_string(),
                    b.completions,
                    b.learners,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("2024-01-01".into(), "2024-01-07".into(), 3, 2),
                ("2024-01-08".into(), "2024-01-14".into(), 0, 0),
                ("2024-01-15".into(), "2024-01-21".into(), 4, 1),
            ]
        );
        let daily = bucketize(
            Bucket::Day,
            day("2024-01-01"),
            day("2024-01-03"),
            &days,
            &[],
        );
        let got: Vec<_> = daily.iter().map(|b| (b.completions, b.learners)).collect();
        assert_eq!(got, [(2, 2), (1, 1), (0, 0)]);
    }

    #[test]
    fn list_sql_numbers_parameters_in_order_and_refuses_foreign_keys() {
        let page = PageRequest {
            sort: ListSort::Name,
            after: Some(SortKey::Name("b".into(), 3)),
            limit: 10,
        };
        let (sql, params) = list_sql(ListKind::TrailLearners, &page).unwrap();
        assert!(sql.contains("(l.name{C}, lt.user_id) > ($3, $4)"), "{sql}");
        assert!(sql.ends_with("LIMIT $5"), "{sql}");
        assert_eq!(params.len(), 3);
        assert_eq!(params[2], Param::Int(11));
        let wrong = PageRequest {
            sort: ListSort::Id,
            after: Some(SortKey::Completions(1, 2)),
            limit: 10,
        };
        assert!(matches!(
            list_sql(ListKind::Trails, &wrong),
            Err(QueryError::KeyMismatch)
        ));
    }

    #[test]
    fn completion_filters_bind_in_order() {
        let t = DateTime::parse_from_rfc3339("2024-01-01T10:00:00.5Z")
            .unwrap()
            .with_timezone(&Utc);
        let (sql, params) = completions_sql(
            7,
            &CompletionFilter {
                from: Some(t),
                to: None,
                trail_id: Some(5),
                user_id: None,
            },
            &PageRequest {
                sort: CompletionSort::FinishedAt,
                after: Some(CompletionKey::FinishedAt(t, 9)),
                limit: 2,
            },
        )
        .unwrap();
        assert!(sql.contains("trail_id = $2 AND finished_at >= $3"), "{sql}");
        assert!(sql.contains("(finished_at, position) > ($4, $5)"), "{sql}");
        assert!(
            sql.ends_with("ORDER BY finished_at, position LIMIT $6"),
            "{sql}"
        );
        // Rounded up: stored times are whole seconds.
        assert_eq!(params[2], Param::Time(ceil_second(t)));
        assert_eq!(time_text(ceil_second(t)), "2024-01-01T10:00:01Z");
    }
}
