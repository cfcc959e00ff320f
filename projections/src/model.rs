//! What the read models need of a recorded event.

use chrono::{DateTime, Utc};
use tracker_domain::TrailCompleted;
use tracker_store::RecordedEvent;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CourseRef {
    pub id: u64,
    pub title: String,
}

/// One trail completion, flattened for the read models.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub position: u64,
    pub event_id: Uuid,
    pub institution_id: u64,
    pub user_id: u64,
    pub user_name: String,
    pub user_email: String,
    pub trail_id: u64,
    pub trail_name: String,
    pub courses: Vec<CourseRef>,
    /// As the source wrote it (wall time in the source's zone).
    pub finished_at_raw: String,
    pub finished_at: DateTime<Utc>,
    /// The calendar day in the source's zone, `yyyy-MM-dd`: the date part of
    /// the raw wall time, which is exactly the source's local day.
    pub day: String,
}

/// Why an event cannot be projected. It goes to the dead letters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

impl Completion {
    /// The event types the read models consume; every other type is skipped
    /// (and stays in the log for future projections).
    pub const EVENT_TYPES: &'static [&'static str] = &[TrailCompleted::EVENT_TYPE];

    pub fn wants(event: &RecordedEvent) -> bool {
        Self::wants_type(event.event_type.as_bytes())
    }

    /// [`Self::wants`] of an event type as stored.
    pub fn wants_type(event_type: &[u8]) -> bool {
        Self::EVENT_TYPES.iter().any(|t| t.as_bytes() == event_type)
    }

    pub fn decode(event: &RecordedEvent) -> Result<Self, DecodeError> {
        Self::decode_data(event.position, event.id, event.schema_version, &event.data)
    }

    /// [`Self::decode`] of an event's parts (a rebuild reads the log in its
    /// stored form, without the recorded event's other fields).
    pub fn decode_data(
        position: u64,
        event_id: Uuid,
        schema_version: u32,
        data: &str,
    ) -> Result<Self, DecodeError> {
        let e = TrailCompleted::from_data(schema_version, data)
            .map_err(|err| DecodeError(err.to_string()))?;
        let raw = e.finished_at.raw().to_owned();
        Ok(Self {
            position,
            event_id,
            institution_id: e.institution_id.get(),
            user_id: e.user.id.get(),
            user_name: e.user.name,
            user_email: e.user.email,
            trail_id: e.trail.id.get(),
            trail_name: e.trail.name,
            courses: e
                .trail
                .courses
                .into_iter()
                .map(|c| CourseRef {
                    id: c.id.get(),
                    title: c.title,
                })
                .collect(),
            day: raw.get(..10).unwrap_or_default().to_owned(),
            finished_at: e.finished_at.utc(),
            finished_at_raw: raw,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A completion with the given keys, for tests.
    pub(crate) fn completion(
        position: u64,
        institution: u64,
        user: u64,
        trail: u64,
        finished: &str,
        courses: &[u64],
    ) -> Completion {
        Completion {
            position,
            event_id: Uuid::from_u128(u128::from(position)),
            institution_id: institution,
            user_id: user,
            user_name: format!("L{user}"),
            user_email: format!("l{user}@x"),
            trail_id: trail,
            trail_name: format!("T{trail}"),
            courses: courses
                .iter()
                .map(|&id| CourseRef {
                    id,
                    title: format!("C{id}"),
                })
                .collect(),
            finished_at_raw: finished.to_owned(),
            finished_at: chrono::NaiveDateTime::parse_from_str(finished, "%Y-%m-%d %H:%M:%S")
                .expect("test time")
                .and_utc()
                + chrono::TimeDelta::hours(3),
            day: finished[..10].to_owned(),
        }
    }

    /// A completion an earlier build recorded with its finish in year 10000
    /// UTC (a wall time the source zone moved past 9999) is a dead letter on
    /// every backend, not a row whose time no query can read back.
    #[test]
    fn a_recorded_finish_outside_years_0000_to_9999_does_not_decode() {
        use tracker_domain::{SourceTimeZone, parse_delivery};
        let zone = SourceTimeZone::parse("UTC").unwrap();
        let body = include_str!("../../tests/fixtures/trail-completed.json")
            .replace("2022-03-10 18:56:47", "9999-12-31 23:59:59");
        let parsed = parse_delivery(body.as_bytes(), &zone).unwrap();
        let data = parsed.event_data(&zone).unwrap();
        let decoded = Completion::decode_data(1, Uuid::nil(), parsed.schema_version(), &data);
        assert_eq!(
            decoded.map(|c| c.finished_at.to_rfc3339()).ok(),
            Some("9999-12-31T23:59:59+00:00".to_owned())
        );
        let shifted = data.replace("\"9999-12-31T23:59:59Z\"", "\"+10000-01-01T02:59:59Z\"");
        assert_ne!(shifted, data);
        let refused = Completion::decode_data(1, Uuid::nil(), parsed.schema_version(), &shifted);
        let error = refused.map(|_| ()).unwrap_err().0;
        assert!(error.contains("outside the years 0000 to 9999"), "{error}");
    }
}
