//! The source's wall-clock times.
//!
//! The source writes `yyyy-MM-dd HH:mm:ss` with no offset. We keep the raw
//! string exactly as sent (it is part of the idempotency key and what auditors
//! compare) and an absolute instant computed in the configured source time
//! zone.
//!
//! A wall time can be missing from a zone (the gap when clocks jump forward)
//! or occur twice (when clocks fall back). One rule covers both, and it is the
//! one `java.time.ZonedDateTime` uses, so a platform written in Java and this
//! tracker agree:
//! - **gap**: the wall time is read with the offset in force *before* the gap,
//!   which moves it forward by the gap's length (`00:30` in a gap from `00:00`
//!   to `01:00` becomes `01:30` local);
//! - **overlap**: the earlier of the two instants (the offset in force before
//!   the transition).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, LocalResult, NaiveDateTime, Offset, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::rfc3339;

/// Why a time or a time zone was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error("must be a date and time formatted yyyy-MM-dd HH:mm:ss, got {0:?}")]
    Format(String),
    #[error("is not a real date and time: {0:?}")]
    Impossible(String),
    #[error("is not an IANA time zone name: {0:?}")]
    UnknownZone(String),
    /// A wall time near either end of years 0000-9999 that the zone moves
    /// past it in UTC: such an instant has no four-digit RFC 3339 form, so
    /// it could be neither stored nor sorted like every other.
    #[error("{0:?} is {1} in UTC, outside the years 0000 to 9999")]
    OutOfRange(String, String),
}

/// The instants a [`SourceTime`] may denote: years 0000 to 9999 in UTC.
fn within_years(raw: &str, utc: DateTime<Utc>) -> Result<DateTime<Utc>, TimeError> {
    if (0..=9999).contains(&utc.year()) {
        Ok(utc)
    } else {
        Err(TimeError::OutOfRange(raw.to_owned(), utc.to_rfc3339()))
    }
}

/// The zone the source's offset-less times are read in (an IANA name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceTimeZone(Tz);

impl SourceTimeZone {
    pub const DEFAULT_NAME: &'static str = "America/Sao_Paulo";

    pub fn parse(name: &str) -> Result<Self, TimeError> {
        Tz::from_str(name)
            .map(Self)
            .map_err(|_| TimeError::UnknownZone(name.to_owned()))
    }

    pub fn name(&self) -> &'static str {
        self.0.name()
    }

    pub fn tz(&self) -> Tz {
        self.0
    }

    /// The absolute instant of a wall time in this zone, by the module's rule.
    pub fn resolve(&self, local: NaiveDateTime) -> DateTime<Utc> {
        match self.0.from_local_datetime(&local) {
            LocalResult::Single(t) => t.with_timezone(&Utc),
            LocalResult::Ambiguous(earlier, _) => earlier.with_timezone(&Utc),
            LocalResult::None => {
                // In a gap: take the offset in force shortly before it. Gaps
                // last hours at most, so looking back up to two days always
                // lands on a wall time that exists.
                for hours_back in 1..=48 {
                    let before = local - TimeDelta::hours(hours_back);
                    if let Some(t) = self.0.from_local_datetime(&before).earliest() {
                        let offset = t.offset().fix();
                        return (local - offset).and_utc();
                    }
                }
                // No zone has a two-day gap; reading it as UTC keeps this total.
                local.and_utc()
            }
        }
    }
}

impl Default for SourceTimeZone {
    fn default() -> Self {
        Self(Tz::America__Sao_Paulo)
    }
}

impl fmt::Display for SourceTimeZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A time as the source wrote it, and the instant it denotes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RecordedTime")]
pub struct SourceTime {
    raw: String,
    #[serde(serialize_with = "crate::rfc3339::serialize_instant")]
    utc: DateTime<Utc>,
}

impl SourceTime {
    /// Parses `yyyy-MM-dd HH:mm:ss` exactly (no other shape, no leap second)
    /// and resolves it in `zone`.
    pub fn parse(raw: &str, zone: &SourceTimeZone) -> Result<Self, TimeError> {
        let local = parse_wall_time(raw)?;
        Ok(Self {
            raw: raw.to_owned(),
            utc: within_years(raw, zone.resolve(local))?,
        })
    }

    /// Rebuilds a time from what was recorded: the raw string must still be
    /// well formed; the instant is taken as recorded (the zone in force when
    /// it was received decided it), and must be within the years a new one
    /// may be (a build before that check recorded some outside them).
    pub fn from_recorded(raw: &str, utc: DateTime<Utc>) -> Result<Self, TimeError> {
        parse_wall_time(raw)?;
        Ok(Self {
            raw: raw.to_owned(),
            utc: within_years(raw, utc)?,
        })
    }

    pub fn raw(&self) -> &str {
        &self.raw
    }

    pub fn utc(&self) -> DateTime<Utc> {
        self.utc
    }
}

/// The serialized form, checked on the way back in.
#[derive(Deserialize)]
struct RecordedTime {
    raw: String,
    #[serde(deserialize_with = "crate::rfc3339::deserialize_instant")]
    utc: DateTime<Utc>,
}

impl TryFrom<RecordedTime> for SourceTime {
    type Error = TimeError;
    fn try_from(r: RecordedTime) -> Result<Self, TimeError> {
        Self::from_recorded(&r.raw, r.utc)
    }
}

fn parse_wall_time(raw: &str) -> Result<NaiveDateTime, TimeError> {
    // chrono's parser is lenient about widths and signs; the source's format
    // is fixed, so check the shape first and let chrono judge the calendar.
    let shape_ok = raw.len() == 19
        && raw.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            10 => b == b' ',
            13 | 16 => b == b':',
            _ => b.is_ascii_digit(),
        });
    if !shape_ok {
        return Err(TimeError::Format(raw.to_owned()));
    }
    // The shape is fixed, so the fields are where the shape says; chrono
    // judges the calendar (and refuses second 60, which it would otherwise
    // read as a leap second: the source never means one). Not chrono's
    // format-string parser: this runs for every event a projection reads.
    let b = raw.as_bytes();
    rfc3339::parse_date(&b[..10])
        .and_then(|day| {
            day.and_hms_opt(
                rfc3339::digits(&b[11..13])?,
                rfc3339::digits(&b[14..16])?,
                rfc3339::digits(&b[17..19])?,
            )
        })
        .ok_or_else(|| TimeError::Impossible(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any text of the source's shape: the date and time chrono's
        /// `%Y-%m-%d %H:%M:%S` reads, or refused where chrono refuses (and
        /// at second 60, which chrono reads as a leap second).
        #[test]
        fn wall_times_read_as_chrono_reads_them(
            raw in "[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}",
        ) {
            let chrono = NaiveDateTime::parse_from_str(&raw, "%Y-%m-%d %H:%M:%S").ok();
            let expected = if &raw[17..19] > "59" { None } else { chrono };
            prop_assert_eq!(parse_wall_time(&raw).ok(), expected, "{}", raw);
        }

        #[test]
        fn valid_wall_times_read_back(secs in -62_167_219_200i64..253_402_300_800) {
            let t = DateTime::from_timestamp(secs, 0).unwrap().naive_utc();
            let raw = t.format("%Y-%m-%d %H:%M:%S").to_string();
            prop_assert_eq!(parse_wall_time(&raw).ok(), Some(t));
        }
    }

    fn sp() -> SourceTimeZone {
        SourceTimeZone::default()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn documented_example_in_sao_paulo() {
        let t = SourceTime::parse("2022-03-10 18:56:47", &sp()).unwrap();
        assert_eq!(t.raw(), "2022-03-10 18:56:47");
        assert_eq!(t.utc(), utc("2022-03-10T21:56:47Z"));
    }

    #[test]
    fn zone_is_configurable() {
        let lisbon = SourceTimeZone::parse("Europe/Lisbon").unwrap();
        let t = SourceTime::parse("2022-07-01 12:00:00", &lisbon).unwrap();
        assert_eq!(t.utc(), utc("2022-07-01T11:00:00Z"));
        assert_eq!(
            SourceTimeZone::parse("Mars/Olympus"),
            Err(TimeError::UnknownZone("Mars/Olympus".into()))
        );
    }

    #[test]
    fn refuses_other_shapes() {
        for raw in [
            "2022-03-10T18:56:47",
            "2022-03-10 18:56",
            "10/03/2022 18:56:47",
            " 2022-03-10 18:56:47",
            "2022-3-10 18:56:47",
            "+2022-03-10 18:56:4",
            "2022-03-10 18:56:47Z",
            "",
        ] {
            assert_eq!(
                SourceTime::parse(raw, &sp()),
                Err(TimeError::Format(raw.into())),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn refuses_impossible_dates() {
        for raw in [
            "2022-02-30 10:00:00",
            "2023-02-29 10:00:00",
            "2022-13-01 10:00:00",
            "2022-03-10 25:00:00",
            "2022-03-10 24:00:00",
            "2022-03-10 18:60:00",
            "2022-03-10 18:56:60",
            "2022-00-10 18:56:47",
        ] {
            assert_eq!(
                SourceTime::parse(raw, &sp()),
                Err(TimeError::Impossible(raw.into())),
                "{raw:?}"
            );
        }
        assert!(SourceTime::parse("2024-02-29 10:00:00", &sp()).is_ok());
        // Year 0 is a year to chrono's `%Y` too.
        assert!(SourceTime::parse("0000-01-01 00:00:01", &sp()).is_ok());
    }

    #[test]
    fn wall_times_the_zone_moves_past_year_9999_or_before_year_0_are_refused() {
        // São Paulo is behind UTC, Tokyo ahead of it.
        let tokyo = SourceTimeZone::parse("Asia/Tokyo").unwrap();
        for (raw, zone, utc) in [
            ("9999-12-31 23:59:59", sp(), "+10000-01-01T02:59:59+00:00"),
            ("0000-01-01 00:00:00", tokyo, "-0001-12-31T14:41:01+00:00"),
        ] {
            assert_eq!(
                SourceTime::parse(raw, &zone),
                Err(TimeError::OutOfRange(raw.into(), utc.into())),
                "{raw:?}"
            );
            let error = SourceTime::parse(raw, &zone).unwrap_err().to_string();
            assert!(error.contains("outside the years 0000 to 9999"), "{error}");
        }
        // Their last and first seconds in UTC are in.
        assert!(SourceTime::parse("9999-12-31 20:59:59", &sp()).is_ok());
        let utc_zone = SourceTimeZone::parse("UTC").unwrap();
        assert!(SourceTime::parse("0000-01-01 00:00:00", &utc_zone).is_ok());
        assert!(SourceTime::parse("9999-12-31 23:59:59", &utc_zone).is_ok());
        // What an earlier build recorded outside them no longer reads back.
        let recorded = utc("9999-12-31T23:59:59Z") + TimeDelta::hours(3);
        assert!(matches!(
            SourceTime::from_recorded("9999-12-31 23:59:59", recorded),
            Err(TimeError::OutOfRange(..))
        ));
    }

    #[test]
    fn dst_gap_moves_forward_by_the_gap() {
        // São Paulo sprang forward at 2018-11-04 00:00 -03:00 to 01:00 -02:00.
        let t = SourceTime::parse("2018-11-04 00:30:00", &sp()).unwrap();
        assert_eq!(t.utc(), utc("2018-11-04T03:30:00Z"));
        // New York: 2024-03-10 02:00 EST -> 03:00 EDT.
        let ny = SourceTimeZone::parse("America/New_York").unwrap();
        let t = SourceTime::parse("2024-03-10 02:30:00", &ny).unwrap();
        assert_eq!(t.utc(), utc("2024-03-10T07:30:00Z"));
    }

    #[test]
    fn dst_overlap_takes_the_earlier_instant() {
        // São Paulo fell back at 2019-02-17 00:00 -02:00 to 2019-02-16 23:00 -03:00.
        let t = SourceTime::parse("2019-02-16 23:30:00", &sp()).unwrap();
        assert_eq!(t.utc(), utc("2019-02-17T01:30:00Z"));
    }

    #[test]
    fn recorded_time_keeps_its_instant() {
        let t =
            SourceTime::from_recorded("2022-03-10 18:56:47", utc("2022-03-10T18:56:47Z")).unwrap();
        assert_eq!(t.utc(), utc("2022-03-10T18:56:47Z"));
        assert!(SourceTime::from_recorded("junk", Utc::now()).is_err());
    }
}
