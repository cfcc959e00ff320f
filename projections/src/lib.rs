//! Projection workers and read models.
//!
//! Two projections, each with its own checkpoint and tables:
//! - `institutions`: per-institution summary, trails, courses, daily activity;
//! - `learners`: per-learner progress and one row per completion.
//!
//! [`plan`] holds the rules (pure), [`fold`] folds a whole rebuild in
//! memory, [`runner`] reads the log and applies batches ([`decode`] shares
//! decoded events between the runners of a process), [`readstore`] is the
//! port that SQLite ([`sqlite`]) and PostgreSQL implement, and [`replay`]
//! rebuilds everything blue/green.
#![forbid(unsafe_code)]

pub mod decode;
pub mod fold;
pub mod model;
pub mod plan;
pub mod postgres;
pub mod query;
pub mod readstore;
pub mod replay;
pub mod runner;
pub mod sqlite;

pub use model::Completion;
pub use plan::ProjectionKind;
pub use query::{QueryError, ReadModelQueries};
pub use readstore::{CheckpointKey, Partition, ReadStore, ReadStoreError};
