//! RFC 3339 text of UTC instants (`2024-03-05T14:07:09Z`) and of days
//! (`2024-03-05`), read and written by the shortest route.
//!
//! The read models store every instant and day in these shapes and the query
//! API answers in them: a page of 50 completions reads and writes a few
//! hundred of them. chrono's general formatter goes through `core::fmt` one
//! piece at a time (and serde_json escapes each piece), and its parser
//! interprets a format description; together they were a fifth of the
//! instructions of a one-learner answer. These functions handle the one shape
//! directly and give anything else to chrono, so their results are always
//! chrono's (the tests compare them).

use chrono::{
    DateTime, Datelike, FixedOffset, NaiveDate, ParseError, SecondsFormat, Timelike, Utc,
};
use serde::de::{self, Visitor};
use serde::{Deserializer, Serialize, Serializer};

/// `YYYY-MM-DDTHH:MM:SSZ`.
const INSTANT_LEN: usize = 20;
/// `YYYY-MM-DD`.
const DAY_LEN: usize = 10;

/// The text chrono gives `t` with [`SecondsFormat::AutoSi`] and `Z` (as its
/// serde `Serialize` does), written into `buf` when `t` has whole seconds and
/// a four-digit year; `None` otherwise (use chrono then).
pub fn write_instant(t: DateTime<Utc>, buf: &mut [u8; INSTANT_LEN]) -> Option<&str> {
    if t.nanosecond() != 0 {
        return None;
    }
    write_date(t.date_naive(), &mut buf[..DAY_LEN])?;
    buf[10] = b'T';
    two(&mut buf[11..13], t.hour());
    buf[13] = b':';
    two(&mut buf[14..16], t.minute());
    buf[16] = b':';
    two(&mut buf[17..19], t.second());
    buf[19] = b'Z';
    std::str::from_utf8(buf).ok()
}

/// `t` as chrono's serde form (`AutoSi`, `Z`), e.g. `2024-03-05T14:07:09Z`.
pub fn instant_text(t: &DateTime<Utc>) -> String {
    let mut buf = [0; INSTANT_LEN];
    match write_instant(*t, &mut buf) {
        Some(text) => text.to_owned(),
        None => t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
    }
}

/// The text chrono gives `day` (`%Y-%m-%d`, as its `Debug` and serde
/// `Serialize` do), written into `buf` for four-digit years; `None`
/// otherwise.
pub fn write_day(day: NaiveDate, buf: &mut [u8; DAY_LEN]) -> Option<&str> {
    write_date(day, buf)?;
    std::str::from_utf8(buf).ok()
}

/// An instant as RFC 3339 text, in UTC: `YYYY-MM-DDTHH:MM:SSZ` directly,
/// anything else as [`DateTime::parse_from_rfc3339`] reads it.
pub fn parse_instant(text: &str) -> Result<DateTime<Utc>, ParseError> {
    match fast_instant(text.as_bytes()) {
        Some(t) => Ok(t),
        None => DateTime::parse_from_rfc3339(text).map(|t| t.with_timezone(&Utc)),
    }
}

/// A day as `%Y-%m-%d` text: `YYYY-MM-DD` directly, anything else as
/// [`NaiveDate::parse_from_str`] reads it.
pub fn parse_day(text: &str) -> Result<NaiveDate, ParseError> {
    if let Some(day) = parse_date(text.as_bytes()) {
        return Ok(day);
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
}

/// `DateTime<Utc>` as chrono's serde `Serialize` writes it, through
/// [`write_instant`] when the value allows: for `#[serde(serialize_with)]`.
pub fn serialize_instant<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0; INSTANT_LEN];
    match write_instant(*t, &mut buf) {
        Some(text) => s.serialize_str(text),
        None => t.serialize(s),
    }
}

/// `NaiveDate` as chrono's serde `Serialize` writes it, through
/// [`write_day`] when the value allows: for `#[serde(serialize_with)]`.
pub fn serialize_day<S: Serializer>(d: &NaiveDate, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0; DAY_LEN];
    match write_day(*d, &mut buf) {
        Some(text) => s.serialize_str(text),
        None => d.serialize(s),
    }
}

/// `DateTime<Utc>` as chrono's serde `Deserialize` reads it (its `FromStr`
/// for a fixed offset, converted to UTC), with the recorded shape
/// `YYYY-MM-DDTHH:MM:SSZ` read directly: for `#[serde(deserialize_with)]`.
pub fn deserialize_instant<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    struct Instant;
    impl Visitor<'_> for Instant {
        type Value = DateTime<Utc>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an RFC 3339 formatted date and time string")
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            match fast_instant(text.as_bytes()) {
                Some(t) => Ok(t),
                None => text
                    .parse::<DateTime<FixedOffset>>()
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(E::custom),
            }
        }
    }
    d.deserialize_str(Instant)
}

/// `YYYY-MM-DDTHH:MM:SSZ`, a valid date and time (no second 60).
fn fast_instant(b: &[u8]) -> Option<DateTime<Utc>> {
    if b.len() != INSTANT_LEN || b[10] != b'T' || b[13] != b':' || b[16] != b':' || b[19] != b'Z' {
        return None;
    }
    let day = parse_date(&b[..DAY_LEN])?;
    let t = day.and_hms_opt(
        digits(&b[11..13])?,
        digits(&b[14..16])?,
        digits(&b[17..19])?,
    )?;
    Some(t.and_utc())
}

fn write_date(day: NaiveDate, buf: &mut [u8]) -> Option<()> {
    let year = u32::try_from(day.year()).ok().filter(|y| *y <= 9999)?;
    two(&mut buf[0..2], year / 100);
    two(&mut buf[2..4], year % 100);
    buf[4] = b'-';
    two(&mut buf[5..7], day.month());
    buf[7] = b'-';
    two(&mut buf[8..10], day.day());
    Some(())
}

fn two(out: &mut [u8], v: u32) {
    out[0] = b'0' + (v / 10 % 10) as u8;
    out[1] = b'0' + (v % 10) as u8;
}

/// `YYYY-MM-DD`, exactly ten bytes, a valid date.
pub(crate) fn parse_date(b: &[u8]) -> Option<NaiveDate> {
    if b.len() != DAY_LEN || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let year = digits(&b[0..4])?;
    NaiveDate::from_ymd_opt(
        i32::try_from(year).ok()?,
        digits(&b[5..7])?,
        digits(&b[8..10])?,
    )
}

/// ASCII digits as a number; `None` if any byte is not a digit.
pub(crate) fn digits(b: &[u8]) -> Option<u32> {
    b.iter().try_fold(0u32, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn chrono_serde(t: &DateTime<Utc>) -> String {
        serde_json::to_value(t)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    fn chrono_day(d: NaiveDate) -> String {
        serde_json::to_value(d)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    proptest! {
        /// Every instant from year 0 to 9999, whole seconds or not: the
        /// text is chrono's, and reading it back gives the instant.
        #[test]
        fn instants_read_and_write_as_chrono_does(
            secs in -62_167_219_200i64..253_402_300_800,
            nanos in prop_oneof![Just(0u32), 0u32..1_000_000_000],
        ) {
            let t = Utc.timestamp_opt(secs, nanos).unwrap();
            let text = instant_text(&t);
            prop_assert_eq!(&text, &chrono_serde(&t));
            prop_assert_eq!(parse_instant(&text).ok(), Some(t));
            let mut buf = [0; INSTANT_LEN];
            let fast = write_instant(t, &mut buf).is_some();
            prop_assert_eq!(fast, nanos == 0 && t.year() >= 0);
        }

        /// Through serde, as a field: the JSON chrono's own `Serialize`
        /// writes.
        #[test]
        fn serializes_as_chrono_does(
            secs in -62_167_219_200i64..253_402_300_800,
            nanos in prop_oneof![Just(0u32), 0u32..1_000_000_000],
        ) {
            #[derive(serde::Serialize)]
            struct Fast {
                #[serde(serialize_with = "serialize_instant")]
                t: DateTime<Utc>,
                #[serde(serialize_with = "serialize_day")]
                d: NaiveDate,
            }
            #[derive(serde::Serialize)]
            struct Chrono {
                t: DateTime<Utc>,
                d: NaiveDate,
            }
            let t = Utc.timestamp_opt(secs, nanos).unwrap();
            let d = t.date_naive();
            prop_assert_eq!(
                serde_json::to_string(&Fast { t, d }).unwrap(),
                serde_json::to_string(&Chrono { t, d }).unwrap()
            );
        }

        /// Every day: chrono's text, read back as the day.
        #[test]
        fn days_read_and_write_as_chrono_does(days in -800_000i64..3_000_000) {
            let day = NaiveDate::from_num_days_from_ce_opt(days as i32).unwrap();
            let mut buf = [0; DAY_LEN];
            if let Some(text) = write_day(day, &mut buf) {
                prop_assert_eq!(text, chrono_day(day));
            } else {
                prop_assert!(!(0..=9999).contains(&day.year()));
            }
            let text = chrono_day(day);
            prop_assert_eq!(parse_day(&text).ok(), NaiveDate::parse_from_str(&text, "%Y-%m-%d").ok());
        }

        /// Any text of the right length: the same answer as chrono, value
        /// or error.
        #[test]
        fn any_text_parses_as_chrono_parses(
            text in "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z|[0-9 +:TZtz.-]{0,24}",
        ) {
            let ours = parse_instant(&text).ok();
            let theirs = DateTime::parse_from_rfc3339(&text).ok().map(|t| t.with_timezone(&Utc));
            prop_assert_eq!(ours, theirs, "{}", text);
            let day = text.get(..DAY_LEN).unwrap_or(&text);
            prop_assert_eq!(
                parse_day(day).ok(),
                NaiveDate::parse_from_str(day, "%Y-%m-%d").ok(),
                "{}", day
            );
        }
    }

    /// What chrono's own `Deserialize` makes of a JSON string, and what
    /// `deserialize_instant` makes of it: the same value or both an error.
    fn both_deserialize(text: &str) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
        #[derive(serde::Deserialize)]
        struct Fast(#[serde(deserialize_with = "deserialize_instant")] DateTime<Utc>);
        let json = serde_json::to_string(text).unwrap();
        (
            serde_json::from_str::<Fast>(&json).ok().map(|f| f.0),
            serde_json::from_str::<DateTime<Utc>>(&json).ok(),
        )
    }

    proptest! {
        #[test]
        fn deserializes_as_chrono_does(
            text in "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z|[0-9 +:TZtz.-]{0,26}",
        ) {
            let (ours, theirs) = both_deserialize(&text);
            prop_assert_eq!(ours, theirs, "{}", text);
        }

        #[test]
        fn reads_back_what_chrono_wrote(
            secs in -62_167_219_200i64..253_402_300_800,
            nanos in prop_oneof![Just(0u32), 0u32..1_000_000_000],
        ) {
            let t = Utc.timestamp_opt(secs, nanos).unwrap();
            let (ours, theirs) = both_deserialize(&chrono_serde(&t));
            prop_assert_eq!(ours, Some(t));
            prop_assert_eq!(theirs, Some(t));
        }
    }

    #[test]
    fn edges() {
        for text in [
            "2024-02-29T23:59:59Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2016-12-31T23:59:60Z",
            "0000-01-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "9999-12-31T23:59:59Z",
            "2024-01-01t00:00:00z",
            "2024-01-01T00:00:00+00:00",
            "2024-01-01T00:00:00.5Z",
            "+2024-01-01T00:00:00Z",
            "２０２４-01-01T00:00:00Z",
        ] {
            let (ours, theirs) = both_deserialize(text);
            assert_eq!(ours, theirs, "{text}");
            assert_eq!(
                parse_instant(text).ok(),
                DateTime::parse_from_rfc3339(text)
                    .ok()
                    .map(|t| t.with_timezone(&Utc)),
                "{text}"
            );
        }
        for text in [
            "2024-02-30",
            "2024-2-3",
            "0000-01-01",
            "2024-01-01 ",
            "1-01-01",
        ] {
            assert_eq!(
                parse_day(text).ok(),
                NaiveDate::parse_from_str(text, "%Y-%m-%d").ok(),
                "{text}"
            );
        }
    }
}
