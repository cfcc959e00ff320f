//! What the query API answers, as the OpenAPI document describes it: JSON
//! bodies and the columns of their CSV form.

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use tracker_projections::query as q;
use utoipa::ToSchema;
use uuid::Uuid;

/// Instants and days are written as chrono's serde writes them, without
/// its general formatter where the value allows: they are most of the
/// values of a completion or learner answer.
mod text {
    pub use tracker_domain::rfc3339::{serialize_day as day, serialize_instant as instant};
}

/// The error shape of every 4xx and 5xx answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable, e.g. `invalid_parameter`, `forbidden_institution`,
    /// `institution_not_found`, `not_caught_up`.
    pub code: String,
    pub message: String,
    /// The parameter (or JSON path) at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// One institution's totals.
#[derive(Debug, Serialize, ToSchema)]
pub struct Summary {
    pub institution_id: u64,
    /// Trail completions (a learner completing a trail again counts again).
    pub completions: u64,
    /// Distinct learners with at least one completion.
    pub learners: u64,
    /// Distinct trails completed at least once.
    pub trails: u64,
    /// Distinct courses in completed trails.
    pub courses: u64,
    #[serde(serialize_with = "text::instant")]
    pub first_completed_at: DateTime<Utc>,
    #[serde(serialize_with = "text::instant")]
    pub last_completed_at: DateTime<Utc>,
    /// Log position of the institution's latest completion.
    pub last_position: u64,
}

impl From<q::Summary> for Summary {
    fn from(s: q::Summary) -> Self {
        Self {
            institution_id: s.institution_id,
            completions: s.completions,
            learners: s.learners,
            trails: s.trails,
            courses: s.courses,
            first_completed_at: s.first_completed_at,
            last_completed_at: s.last_completed_at,
            last_position: s.last_position,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Trail {
    pub trail_id: u64,
    /// The name in the latest completion.
    pub name: String,
    pub completions: u64,
    /// Distinct learners who completed it.
    pub learners: u64,
    #[serde(serialize_with = "text::instant")]
    pub first_completed_at: DateTime<Utc>,
    #[serde(serialize_with = "text::instant")]
    pub last_completed_at: DateTime<Utc>,
}

impl From<q::Trail> for Trail {
    fn from(t: q::Trail) -> Self {
        Self {
            trail_id: t.trail_id,
            name: t.name,
            completions: t.completions,
            learners: t.learners,
            first_completed_at: t.first_completed_at,
            last_completed_at: t.last_completed_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CourseRef {
    pub course_id: u64,
    pub title: String,
}

impl From<q::CourseRef> for CourseRef {
    fn from(c: q::CourseRef) -> Self {
        Self {
            course_id: c.course_id,
            title: c.title,
        }
    }
}

/// A trail with every course it has listed (by course id; titles are the
/// latest seen).
#[derive(Debug, Serialize, ToSchema)]
pub struct TrailDetail {
    pub trail: Trail,
    pub courses: Vec<CourseRef>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Course {
    pub course_id: u64,
    /// The title in the latest completion listing it.
    pub title: String,
    /// Completions of trails that list it.
    pub completions: u64,
    pub learners: u64,
}

impl From<q::Course> for Course {
    fn from(c: q::Course) -> Self {
        Self {
            course_id: c.course_id,
            title: c.title,
            completions: c.completions,
            learners: c.learners,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Learner {
    pub user_id: u64,
    /// As in the learner's latest completion.
    pub name: String,
    pub email: String,
    /// Distinct trails completed.
    pub trails: u64,
    pub completions: u64,
    #[serde(serialize_with = "text::instant")]
    pub first_completed_at: DateTime<Utc>,
    #[serde(serialize_with = "text::instant")]
    pub last_completed_at: DateTime<Utc>,
}

impl From<q::Learner> for Learner {
    fn from(l: q::Learner) -> Self {
        Self {
            user_id: l.user_id,
            name: l.name,
            email: l.email,
            trails: l.trails,
            completions: l.completions,
            first_completed_at: l.first_completed_at,
            last_completed_at: l.last_completed_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LearnerTrail {
    pub trail_id: u64,
    pub completions: u64,
    #[serde(serialize_with = "text::instant")]
    pub first_completed_at: DateTime<Utc>,
    #[serde(serialize_with = "text::instant")]
    pub last_completed_at: DateTime<Utc>,
}

/// One trail completion.
#[derive(Debug, Serialize, ToSchema)]
pub struct Completion {
    /// Log position of the `TrailCompleted` event.
    pub position: u64,
    pub event_id: Uuid,
    pub user_id: u64,
    pub trail_id: u64,
    /// The trail's name in this completion.
    pub trail_name: String,
    #[serde(serialize_with = "text::instant")]
    pub finished_at: DateTime<Utc>,
    /// As the source sent it: wall time in the source time zone.
    pub finished_at_raw: String,
    /// The day in the source time zone.
    #[serde(serialize_with = "text::day")]
    pub day: NaiveDate,
    #[schema(value_type = Vec<CourseRef>)]
    pub courses: Courses,
}

/// A completion's courses, written into the answer as the read model's JSON
/// text (`[{"course_id":1,"title":"..."}]`) instead of being decoded and
/// encoded again course by course.
///
/// Only `sonic-rs` writes it as that text (`models::json` encodes every read
/// model's answer with it): a `LazyValue` is written raw by `sonic-rs` and as
/// a wrapper object by any other serializer. `sonic-rs` parses the text as
/// it copies it, so a damaged row fails its answer (a 500) instead of
/// producing an invalid body.
#[derive(Debug)]
pub struct Courses(pub q::CoursesJson);

impl Serialize for Courses {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // sonic-rs writes a raw value only from a `LazyValue` it has parsed.
        let raw: sonic_rs::LazyValue<'_> =
            sonic_rs::from_str(self.0.as_str()).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

impl From<q::CompletionRow> for Completion {
    fn from(c: q::CompletionRow) -> Self {
        Self {
            position: c.position,
            event_id: c.event_id,
            user_id: c.user_id,
            trail_id: c.trail_id,
            trail_name: c.trail_name,
            finished_at: c.finished_at,
            finished_at_raw: c.finished_at_raw,
            day: c.day,
            courses: Courses(c.courses),
        }
    }
}

/// A learner with every trail and every completion (by position).
#[derive(Debug, Serialize, ToSchema)]
pub struct LearnerDetail {
    pub learner: Learner,
    /// Every trail the learner completed, by trail id.
    pub trails: Vec<LearnerTrail>,
    /// Every completion, by position, with its trail and courses.
    pub completions: Vec<Completion>,
}

impl From<q::LearnerDetail> for LearnerDetail {
    fn from(d: q::LearnerDetail) -> Self {
        Self {
            learner: d.learner.into(),
            trails: d
                .trails
                .into_iter()
                .map(|t| LearnerTrail {
                    trail_id: t.trail_id,
                    completions: t.completions,
                    first_completed_at: t.first_completed_at,
                    last_completed_at: t.last_completed_at,
                })
                .collect(),
            completions: d.completions.into_iter().map(Into::into).collect(),
        }
    }
}

/// A learner of one trail.
#[derive(Debug, Serialize, ToSchema)]
pub struct TrailLearner {
    pub user_id: u64,
    pub name: String,
    pub email: String,
    /// Completions of this trail by this learner.
    pub completions: u64,
    #[serde(serialize_with = "text::instant")]
    pub first_completed_at: DateTime<Utc>,
    #[serde(serialize_with = "text::instant")]
    pub last_completed_at: DateTime<Utc>,
}

impl From<q::TrailLearner> for TrailLearner {
    fn from(l: q::TrailLearner) -> Self {
        Self {
            user_id: l.user_id,
            name: l.name,
            email: l.email,
            completions: l.completions,
            first_completed_at: l.first_completed_at,
            last_completed_at: l.last_completed_at,
        }
    }
}

/// One bucket of the activity time series.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActivityBucket {
    /// First day of the bucket (source time zone).
    #[serde(serialize_with = "text::day")]
    pub start: NaiveDate,
    /// Last day of the bucket, inclusive.
    #[serde(serialize_with = "text::day")]
    pub end: NaiveDate,
    pub completions: u64,
    /// Distinct learners with a completion in the bucket.
    pub learners: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Activity {
    /// `day`, `week` (ISO, Monday to Sunday) or `month`.
    pub bucket: String,
    /// First day of the first bucket.
    #[serde(serialize_with = "text::day")]
    pub from: NaiveDate,
    /// Last day of the last bucket.
    #[serde(serialize_with = "text::day")]
    pub to: NaiveDate,
    /// Every bucket from `from` to `to`, empty ones included.
    pub items: Vec<ActivityBucket>,
}

/// A recorded event, straight from the event log.
#[derive(Debug, Serialize, ToSchema)]
pub struct Event {
    /// Global log position (gap-free from 1).
    pub position: u64,
    pub event_id: Uuid,
    /// `learner-{institution}-{user}`, `institution-{institution}`, or, for
    /// another slug naming no institution, `no-institution-{slug}[-{user}]`.
    pub stream: String,
    /// Revision in the stream, from 0.
    pub revision: u64,
    /// `TrailCompleted`, or the source's slug for other events.
    #[serde(rename = "type")]
    pub event_type: String,
    pub schema_version: u32,
    /// When the receiver accepted the delivery.
    #[serde(serialize_with = "text::instant")]
    pub received_at: DateTime<Utc>,
    pub source_id: String,
    pub request_id: String,
    /// `sha256:` of the delivery as recorded in `data.delivery`: the body
    /// as received, without the white space around it.
    pub content_hash: String,
    /// The event data exactly as recorded (it holds the delivery verbatim
    /// under `delivery`).
    #[schema(value_type = Object)]
    pub data: Box<RawValue>,
}

impl TryFrom<tracker_store::RecordedEvent> for Event {
    type Error = serde_json::Error;

    fn try_from(e: tracker_store::RecordedEvent) -> Result<Self, Self::Error> {
        Ok(Self {
            position: e.position,
            event_id: e.id,
            stream: e.stream,
            revision: e.revision,
            event_type: e.event_type,
            schema_version: e.schema_version,
            received_at: e.metadata.received_at,
            source_id: e.metadata.source_id,
            request_id: e.metadata.request_id,
            content_hash: e.metadata.content_hash,
            data: RawValue::from_string(e.data)?,
        })
    }
}

macro_rules! page {
    ($name:ident, $item:ty, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Serialize, ToSchema)]
        pub struct $name {
            pub items: Vec<$item>,
            /// Pass as `cursor` for the next page; `null` on the last page.
            pub next_cursor: Option<String>,
        }
    };
}

page!(TrailPage, Trail, "A page of trails.");
page!(CoursePage, Course, "A page of courses.");
page!(LearnerPage, Learner, "A page of learners.");
page!(
    TrailLearnerPage,
    TrailLearner,
    "A page of a trail's learners."
);
page!(CompletionPage, Completion, "A page of completions.");
page!(
    EventPage,
    Event,
    "A page of recorded events. It may hold fewer than `limit` events (even none) while more follow: a page reads a bounded stretch of the log. Follow `next_cursor` until it is `null`."
);

/// Rows as CSV: a header and one record per row, the same fields as JSON
/// (courses as JSON text).
pub trait CsvRow {
    const HEADER: &'static [&'static str];
    fn record(&self) -> Vec<String>;
}

fn time(t: &DateTime<Utc>) -> String {
    tracker_domain::rfc3339::instant_text(t)
}

impl CsvRow for Trail {
    const HEADER: &'static [&'static str] = &[
        "trail_id",
        "name",
        "completions",
        "learners",
        "first_completed_at",
        "last_completed_at",
    ];
    fn record(&self) -> Vec<String> {
        vec![
            self.trail_id.to_string(),
            self.name.clone(),
            self.completions.to_string(),
            self.learners.to_string(),
            time(&self.first_completed_at),
            time(&self.last_completed_at),
        ]
    }
}

impl CsvRow for Course {
    const HEADER: &'static [&'static str] = &["course_id", "title", "completions", "learners"];
    fn record(&self) -> Vec<String> {
        vec![
            self.course_id.to_string(),
            self.title.clone(),
            self.completions.to_string(),
            self.learners.to_string(),
        ]
    }
}

impl CsvRow for Learner {
    const HEADER: &'static [&'static str] = &[
        "user_id",
        "name",
        "email",
        "trails",
        "completions",
        "first_completed_at",
        "last_completed_at",
    ];
    fn record(&self) -> Vec<String> {
        vec![
            self.user_id.to_string(),
            self.name.clone(),
            self.email.clone(),
            self.trails.to_string(),
            self.completions.to_string(),
            time(&self.first_completed_at),
            time(&self.last_completed_at),
        ]
    }
}

impl CsvRow for TrailLearner {
    const HEADER: &'static [&'static str] = &[
        "user_id",
        "name",
        "email",
        "completions",
        "first_completed_at",
        "last_completed_at",
    ];
    fn record(&self) -> Vec<String> {
        vec![
            self.user_id.to_string(),
            self.name.clone(),
            self.email.clone(),
            self.completions.to_string(),
            time(&self.first_completed_at),
            time(&self.last_completed_at),
        ]
    }
}

impl CsvRow for Completion {
    const HEADER: &'static [&'static str] = &[
        "position",
        "event_id",
        "user_id",
        "trail_id",
        "trail_name",
        "finished_at",
        "finished_at_raw",
        "day",
        "courses",
    ];
    fn record(&self) -> Vec<String> {
        vec![
            self.position.to_string(),
            self.event_id.to_string(),
            self.user_id.to_string(),
            self.trail_id.to_string(),
            self.trail_name.clone(),
            time(&self.finished_at),
            self.finished_at_raw.clone(),
            self.day.to_string(),
            self.courses.0.as_str().to_owned(),
        ]
    }
}

impl CsvRow for ActivityBucket {
    const HEADER: &'static [&'static str] = &["start", "end", "completions", "learners"];
    fn record(&self) -> Vec<String> {
        vec![
            self.start.to_string(),
            self.end.to_string(),
            self.completions.to_string(),
            self.learners.to_string(),
        ]
    }
}

impl CsvRow for Event {
    const HEADER: &'static [&'static str] = &[
        "position",
        "event_id",
        "stream",
        "revision",
        "type",
        "schema_version",
        "received_at",
        "source_id",
        "request_id",
        "content_hash",
        "data",
    ];
    fn record(&self) -> Vec<String> {
        vec![
            self.position.to_string(),
            self.event_id.to_string(),
            self.stream.clone(),
            self.revision.to_string(),
            self.event_type.clone(),
            self.schema_version.to_string(),
            time(&self.received_at),
            self.source_id.clone(),
            self.request_id.clone(),
            self.content_hash.clone(),
            self.data.get().to_owned(),
        ]
    }
}

/// `rows` as CSV with a header row, every cell through [`cell`].
pub fn to_csv<R: CsvRow>(rows: &[R]) -> Result<Vec<u8>, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(R::HEADER)?;
    for row in rows {
        for field in row.record() {
            w.write_field(cell(&field).as_bytes())?;
        }
        w.write_record(None::<&[u8]>)?;
    }
    w.into_inner().map_err(|e| csv::Error::from(e.into_error()))
}

/// A cell that a spreadsheet would run as a formula when the file is
/// opened (OWASP's "CSV injection": it starts with `=`, `+`, `-`, `@`, a
/// tab or a carriage return) gets a leading `'`, which makes it text.
/// Names, e-mails and titles come from the source's users, who choose
/// them; no number, time or JSON cell of these rows starts so. JSON and
/// NDJSON carry every value unaltered.
fn cell(field: &str) -> std::borrow::Cow<'_, str> {
    match field.as_bytes().first() {
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r') => format!("'{field}").into(),
        _ => field.into(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;

    /// Cells a spreadsheet would evaluate are made text; every other cell,
    /// a formula character inside a name included, is written as it is.
    #[test]
    fn csv_cells_that_start_a_formula_are_made_text() {
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let learner = |name: &str, email: &str| Learner {
            user_id: 7,
            name: name.to_owned(),
            email: email.to_owned(),
            trails: 1,
            completions: 2,
            first_completed_at: at,
            last_completed_at: at,
        };
        let rows = [
            learner("=HYPERLINK(\"http://x\")", "@x.br"),
            learner("+1", "-a@x.br"),
            learner("\tTab", "\rcr"),
            learner("Ana = Bia", "ana@x.br"),
        ];
        let csv = String::from_utf8(to_csv(&rows).unwrap()).unwrap();
        let mut reader = csv::Reader::from_reader(csv.as_bytes());
        let cells: Vec<(String, String)> = reader
            .records()
            .map(|r| {
                let r = r.unwrap();
                (r[1].to_owned(), r[2].to_owned())
            })
            .collect();
        assert_eq!(
            cells,
            [
                ("'=HYPERLINK(\"http://x\")".to_owned(), "'@x.br".to_owned()),
                ("'+1".to_owned(), "'-a@x.br".to_owned()),
                ("'\tTab".to_owned(), "'\rcr".to_owned()),
                ("Ana = Bia".to_owned(), "ana@x.br".to_owned()),
            ]
        );
        assert!(csv.contains(",1,2,2023-11-14T22:13:20Z,"), "{csv}");
    }

    fn text() -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter)
    }

    /// Whole seconds (the stored times) and not, over years 0 to 9999 and
    /// a little past.
    fn instant() -> impl Strategy<Value = DateTime<Utc>> {
        (
            -62_167_219_200i64..253_402_400_000,
            prop_oneof![Just(0u32), 0u32..1_000_000_000],
        )
            .prop_map(|(s, n)| DateTime::from_timestamp(s, n).unwrap())
    }

    fn day() -> impl Strategy<Value = NaiveDate> {
        instant().prop_map(|t| t.date_naive())
    }

    fn course() -> impl Strategy<Value = CourseRef> {
        (any::<u64>(), text()).prop_map(|(course_id, title)| CourseRef { course_id, title })
    }

    fn trail() -> impl Strategy<Value = Trail> {
        (
            any::<u64>(),
            text(),
            any::<u64>(),
            any::<u64>(),
            instant(),
            instant(),
        )
            .prop_map(
                |(trail_id, name, completions, learners, first, last)| Trail {
                    trail_id,
                    name,
                    completions,
                    learners,
                    first_completed_at: first,
                    last_completed_at: last,
                },
            )
    }

    fn learner() -> impl Strategy<Value = Learner> {
        (
            any::<u64>(),
            text(),
            text(),
            any::<u64>(),
            instant(),
            instant(),
        )
            .prop_map(|(user_id, name, email, n, first, last)| Learner {
                user_id,
                name,
                email,
                trails: n / 3,
                completions: n,
                first_completed_at: first,
                last_completed_at: last,
            })
    }

    /// What a completion's JSON must be: the type as it was before its
    /// courses were written as the stored text, encoded by `serde_json`.
    #[derive(Debug, Serialize)]
    struct ExpectedCompletion {
        position: u64,
        event_id: Uuid,
        user_id: u64,
        trail_id: u64,
        trail_name: String,
        #[serde(serialize_with = "text::instant")]
        finished_at: DateTime<Utc>,
        finished_at_raw: String,
        #[serde(serialize_with = "text::day")]
        day: NaiveDate,
        courses: Vec<CourseRef>,
    }

    #[derive(Serialize)]
    struct ExpectedPage<'a> {
        items: &'a [ExpectedCompletion],
        next_cursor: Option<String>,
    }

    #[derive(Serialize)]
    struct ExpectedDetail<'a> {
        learner: &'a Learner,
        trails: &'a [LearnerTrail],
        completions: &'a [ExpectedCompletion],
    }

    /// The answer's completion, built the way a query builds it: from the
    /// courses' stored text.
    fn answered(e: &ExpectedCompletion) -> Completion {
        let stored: Vec<_> = e
            .courses
            .iter()
            .map(|c| serde_json::json!({ "id": c.course_id, "title": c.title }))
            .collect();
        let stored = serde_json::Value::Array(stored).to_string();
        Completion {
            position: e.position,
            event_id: e.event_id,
            user_id: e.user_id,
            trail_id: e.trail_id,
            trail_name: e.trail_name.clone(),
            finished_at: e.finished_at,
            finished_at_raw: e.finished_at_raw.clone(),
            day: e.day,
            courses: Courses(q::CoursesJson::from_stored(&stored)),
        }
    }

    fn completion() -> impl Strategy<Value = ExpectedCompletion> {
        (
            (any::<u64>(), any::<u128>(), any::<u64>(), any::<u64>()),
            (text(), instant(), text(), day()),
            proptest::collection::vec(course(), 0..4),
        )
            .prop_map(
                |((position, id, user_id, trail_id), (trail_name, t, raw, day), courses)| {
                    ExpectedCompletion {
                        position,
                        event_id: Uuid::from_u128(id),
                        user_id,
                        trail_id,
                        trail_name,
                        finished_at: t,
                        finished_at_raw: raw,
                        day,
                        courses,
                    }
                },
            )
    }

    fn sonic_writes<T: Serialize, E: Serialize>(
        value: &T,
        expected: &E,
    ) -> Result<(), TestCaseError> {
        let expected = serde_json::to_vec(expected).unwrap();
        let written = sonic_rs::to_vec(value).unwrap();
        prop_assert_eq!(
            String::from_utf8_lossy(&written),
            String::from_utf8_lossy(&expected)
        );
        Ok(())
    }

    fn same_bytes<T: Serialize>(value: &T) -> Result<(), TestCaseError> {
        sonic_writes(value, value)
    }

    /// Courses are written as stored: text that is not JSON fails the
    /// answer rather than reaching the client.
    #[test]
    fn damaged_stored_courses_fail_the_answer() {
        for damaged in [
            r#"[{"id":1,"title":"a}]"#,
            "",
            "[",
            r#"[{"id":1,"title":"a"}] x"#,
        ] {
            let courses = Courses(q::CoursesJson::from_stored(damaged));
            assert!(sonic_rs::to_vec(&courses).is_err(), "{damaged}");
        }
        let fine = Courses(q::CoursesJson::from_stored(r#"[{"id":1,"title":"a"}]"#));
        assert_eq!(
            sonic_rs::to_string(&fine).unwrap(),
            r#"[{"course_id":1,"title":"a"}]"#
        );
    }

    proptest! {
        /// The read models' answers are encoded with `sonic-rs`: byte for
        /// byte what `serde_json` writes, for every answer type, with any
        /// text (control characters, quotes, backslashes, any Unicode),
        /// number and time. A completion's courses, written as their stored
        /// text, are byte for byte what `serde_json` writes for the decoded
        /// courses.
        #[test]
        fn sonic_rs_writes_what_serde_json_writes(
            trails in proptest::collection::vec(trail(), 0..3),
            detail_trail in trail(),
            learners in proptest::collection::vec(learner(), 0..3),
            completions in proptest::collection::vec(completion(), 0..3),
            courses in proptest::collection::vec(course(), 0..3),
            cursor in proptest::option::of(text()),
            (a, b, n) in (day(), day(), any::<u64>()),
            s in (any::<u64>(), instant(), instant()),
        ) {
            same_bytes(&Summary {
                institution_id: s.0,
                completions: s.0 / 2,
                learners: n,
                trails: 1,
                courses: 0,
                first_completed_at: s.1,
                last_completed_at: s.2,
                last_position: u64::MAX,
            })?;
            same_bytes(&TrailPage { items: trails, next_cursor: cursor.clone() })?;
            let listed = courses.iter().map(|c| CourseRef { course_id: c.course_id, title: c.title.clone() }).collect();
            same_bytes(&TrailDetail { trail: detail_trail, courses: listed })?;
            let listed = courses
                .iter()
                .map(|c| Course { course_id: c.course_id, title: c.title.clone(), completions: n, learners: n / 2 })
                .collect();
            same_bytes(&CoursePage { items: listed, next_cursor: cursor.clone() })?;
            let of_trail = learners
                .iter()
                .map(|l| TrailLearner {
                    user_id: l.user_id,
                    name: l.name.clone(),
                    email: l.email.clone(),
                    completions: l.completions,
                    first_completed_at: l.first_completed_at,
                    last_completed_at: l.last_completed_at,
                })
                .collect();
            same_bytes(&TrailLearnerPage { items: of_trail, next_cursor: cursor.clone() })?;
            if let Some(l) = learners.first() {
                let detail = LearnerDetail {
                    learner: Learner { name: l.name.clone(), email: l.email.clone(), ..*l },
                    trails: vec![LearnerTrail { trail_id: n, completions: 2, first_completed_at: s.1, last_completed_at: s.2 }],
                    completions: completions.iter().map(answered).collect(),
                };
                let expected = ExpectedDetail { learner: &detail.learner, trails: &detail.trails, completions: &completions };
                sonic_writes(&detail, &expected)?;
            }
            same_bytes(&LearnerPage { items: learners, next_cursor: cursor.clone() })?;
            let page = CompletionPage { items: completions.iter().map(answered).collect(), next_cursor: cursor.clone() };
            sonic_writes(&page, &ExpectedPage { items: &completions, next_cursor: cursor })?;
            same_bytes(&Activity {
                bucket: "week".into(),
                from: a,
                to: b,
                items: vec![ActivityBucket { start: a, end: b, completions: n, learners: 1 }],
            })?;
        }
    }
}
