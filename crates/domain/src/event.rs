//! The events the tracker records.
//!
//! - [`TrailCompleted`] (schema version 1): a learner finished every activity
//!   of a trail. Typed, validated, projected.
//! - [`OtherEvent`]: any other slug of the same source, kept whole and typed
//!   by its slug so a future projection can use it.
//!
//! Both carry the delivery's JSON document verbatim under `delivery` in the
//! recorded data, so auditors can see every event exactly as it was received
//! (its SHA-256 is the `content_hash` in the event's metadata).
//!
//! Streams: one per learner within an institution, `learner-{institution}-{user}`:
//! a learner's whole history reads as one stream (audits, erasure requests),
//! and writes to different learners never contend. An event of another slug
//! that names no user goes to `institution-{institution}`.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::ids::{CourseId, InstitutionId, TrailId, UserId};
use crate::time::SourceTime;

/// Namespace of every event id this tracker derives (UUID v5 of
/// `urn:learning-progress-tracker:toolzz` in the URL namespace).
pub fn event_id_namespace() -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        b"urn:learning-progress-tracker:toolzz",
    )
}

/// The stream of one learner within one institution.
pub fn learner_stream(institution: InstitutionId, user: UserId) -> String {
    format!("learner-{institution}-{user}")
}

/// What every learner stream of `institution` begins with, and no stream
/// of another institution: the `-` after the id keeps institution 1's
/// `learner-1-` from taking in institution 12's `learner-12-…`.
pub fn learner_streams_prefix(institution: InstitutionId) -> String {
    format!("learner-{institution}-")
}

/// The stream of another slug's deliveries that name no institution, per
/// slug and learner (kept short: an EventStoreDB append reads its stream
/// to find redeliveries). No institution's history holds them; the whole
/// log does.
pub fn no_institution_stream(slug: &str, user: Option<UserId>) -> String {
    match user {
        Some(user) => format!("no-institution-{slug}-{user}"),
        None => format!("no-institution-{slug}"),
    }
}

/// The stream of an institution's events that name no learner.
pub fn institution_stream(institution: InstitutionId) -> String {
    format!("institution-{institution}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Learner {
    pub id: UserId,
    pub name: String,
    pub email: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Course {
    pub id: CourseId,
    pub title: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrailInfo {
    pub id: TrailId,
    pub name: String,
    pub courses: Vec<Course>,
}

/// A learner completed every activity of a trail. A past fact, never edited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrailCompleted {
    pub institution_id: InstitutionId,
    pub user: Learner,
    pub trail: TrailInfo,
    pub finished_at: SourceTime,
    pub send_at: SourceTime,
}

/// The recorded shape of `TrailCompleted` v1: the typed fact plus the zone its
/// instants were computed in and the delivery as received.
#[derive(Serialize)]
struct TrailCompletedV1Out<'a> {
    #[serde(flatten)]
    event: &'a TrailCompleted,
    source_timezone: &'a str,
    delivery: &'a RawValue,
}

/// Why recorded event data could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum EventDataError {
    #[error("event type {event_type} v{version} is not one this code reads")]
    UnknownSchema { event_type: String, version: u32 },
    #[error("recorded data does not match its schema: {0}")]
    Malformed(#[from] serde_json::Error),
}

impl TrailCompleted {
    pub const SLUG: &'static str = "activities.trail.completed";
    pub const EVENT_TYPE: &'static str = "TrailCompleted";
    pub const SCHEMA_VERSION: u32 = 1;

    /// Deterministic id: the same completion delivered again, at any time,
    /// gets the same id; the same learner finishing the same trail at another
    /// time gets a new one. `send_at` is left out on purpose: a redelivery
    /// may be stamped anew.
    pub fn event_id(&self) -> Uuid {
        let name = format!(
            "{}|{}|{}|{}|{}",
            Self::SLUG,
            self.institution_id,
            self.user.id,
            self.trail.id,
            self.finished_at.raw()
        );
        Uuid::new_v5(&event_id_namespace(), name.as_bytes())
    }

    pub fn stream(&self) -> String {
        learner_stream(self.institution_id, self.user.id)
    }

    /// The recorded data: this event's fields, the zone, and the delivery.
    pub fn to_data(
        &self,
        source_timezone: &str,
        delivery: &RawValue,
    ) -> Result<String, serde_json::Error> {
        serde_json::to_string(&TrailCompletedV1Out {
            event: self,
            source_timezone,
            delivery,
        })
    }

    /// Reads recorded data back (fields not part of the fact are ignored).
    pub fn from_data(schema_version: u32, data: &str) -> Result<Self, EventDataError> {
        if schema_version != Self::SCHEMA_VERSION {
            return Err(EventDataError::UnknownSchema {
                event_type: Self::EVENT_TYPE.to_owned(),
                version: schema_version,
            });
        }
        Ok(serde_json::from_str(data)?)
    }
}

/// An event of a slug this tracker does not project (yet). Only the envelope
/// was checked; the delivery is kept whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherEvent {
    pub slug: String,
    /// `data.institution.id` where it reads as an id.
    pub institution_id: Option<InstitutionId>,
    pub user_id: Option<UserId>,
    /// SHA-256 of the canonical form of `data` (keys sorted, no whitespace).
    pub data_digest: [u8; 32],
}

#[derive(Serialize)]
struct OtherEventV2Out<'a> {
    institution_id: Option<InstitutionId>,
    user_id: Option<UserId>,
    delivery: &'a RawValue,
}

impl OtherEvent {
    /// 2: `institution_id` may be null. 1 is the same shape with a number
    /// there always, so whatever reads 2 reads 1 too.
    pub const SCHEMA_VERSION: u32 = 2;

    /// Deterministic id from the slug, the institution and the content of
    /// `data`: a redelivery of the same content is recognised whatever its
    /// `send_at`; a different content is a different event.
    pub fn event_id(&self) -> Uuid {
        let institution = self.institution_id.map_or(String::new(), |i| i.to_string());
        let mut name = format!("{}|{institution}|", self.slug).into_bytes();
        name.extend_from_slice(&self.data_digest);
        Uuid::new_v5(&event_id_namespace(), &name)
    }

    pub fn stream(&self) -> String {
        match (self.institution_id, self.user_id) {
            (Some(institution), Some(user)) => learner_stream(institution, user),
            (Some(institution), None) => institution_stream(institution),
            (None, user) => no_institution_stream(&self.slug, user),
        }
    }

    /// The event type is the slug itself.
    pub fn event_type(&self) -> &str {
        &self.slug
    }

    pub fn to_data(&self, delivery: &RawValue) -> Result<String, serde_json::Error> {
        serde_json::to_string(&OtherEventV2Out {
            institution_id: self.institution_id,
            user_id: self.user_id,
            delivery,
        })
    }
}

#[cfg(test)]
mod stream_name_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// An institution's learner streams, and only they, begin with its
    /// prefix, even where one id begins another (1, 12, 123).
    #[test]
    fn learner_prefixes_do_not_take_in_other_institutions() {
        let id = |n: u64| InstitutionId::try_from(n).unwrap();
        let user = UserId::try_from(5).unwrap();
        for a in [1, 12, 123] {
            for b in [1, 12, 123] {
                let stream = learner_stream(id(b), user);
                assert_eq!(stream.starts_with(&learner_streams_prefix(id(a))), a == b);
                assert!(!institution_stream(id(b)).starts_with(&learner_streams_prefix(id(a))));
            }
        }
    }
}
