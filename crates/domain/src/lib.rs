//! Pure types and rules of the learning-progress tracker. No I/O, no async.
//!
//! - [`delivery`]: parsing a webhook body into a [`Delivery`] (parse, don't
//!   validate: every value that exists is valid).
//! - [`ids`]: newtypes for the source's numeric ids.
//! - [`time`]: the source's offset-less wall-clock times and the configured
//!   source time zone.
//! - [`rfc3339`]: the text of UTC instants and days, read and written
//!   without chrono's general formatter and parser where the shape allows.
//! - [`event`]: the domain events as they are recorded (`TrailCompleted` v1 and
//!   raw events of other slugs), their deterministic ids and streams.
#![forbid(unsafe_code)]

pub mod delivery;
pub mod event;
pub mod ids;
pub mod rfc3339;
pub mod time;

pub use delivery::{Delivery, DeliveryError, ErrorCode, parse_delivery};
pub use event::{Course, Learner, OtherEvent, TrailCompleted, TrailInfo};
pub use ids::{CourseId, IdError, InstitutionId, TrailId, UserId};
pub use time::{SourceTime, SourceTimeZone, TimeError};
