//! The read-store port: where projections keep their rows, checkpoints, dead
//! letters and leases. SQLite (embedded default) and PostgreSQL implement it
//! and give identical read models for the same events.
//!
//! **Generations.** All read-model tables live in a generation (a SQLite
//! file per projection, a PostgreSQL schema). One generation is *current*:
//! the one queries read and live projectors write. `tracker replay` builds a new generation from
//! position 0 beside the current one and switches the pointer atomically when
//! it has caught up (blue/green). A live projector notices the switch at its
//! next batch and carries on in the new generation from its checkpoint there.
//!
//! **Checkpoints** are written in the same transaction as the rows they cover.
//! **Leases** live in the generation too, so the lease check (fencing) is part
//! of that same transaction: a projector that lost its lease cannot write.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tracker_store::Position;
use uuid::Uuid;

use crate::fold::Membership;
use crate::model::Completion;
use crate::plan::{Plan, ProjectionKind};

/// Which share of the institutions a worker projects: those with
/// `institution_id % count == index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Partition {
    pub index: u32,
    pub count: u32,
}

impl Partition {
    pub const WHOLE: Partition = Partition { index: 0, count: 1 };

    /// `i/n`, with `i < n`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (i, n) = text
            .split_once('/')
            .ok_or_else(|| format!("partition {text:?}: expected i/n, e.g. 0/2"))?;
        let index: u32 = i
            .trim()
            .parse()
            .map_err(|_| format!("partition {text:?}: {i:?} is not a number"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("partition {text:?}: {n:?} is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!("partition {text:?}: need 0 <= i < n"));
        }
        Ok(Self { index, count })
    }

    pub fn owns(&self, institution_id: u64) -> bool {
        institution_id % u64::from(self.count) == u64::from(self.index)
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// A projection's checkpoint key: its name, and the partition when the work
/// is split (`institutions`, `institutions@1/2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CheckpointKey {
    pub projection: ProjectionKind,
    pub partition: Partition,
}

impl CheckpointKey {
    pub fn whole(projection: ProjectionKind) -> Self {
        Self {
            projection,
            partition: Partition::WHOLE,
        }
    }

    /// Reads back what `Display` wrote (`institutions`, `learners@1/2`).
    pub fn parse(text: &str) -> Option<Self> {
        let (name, partition) = match text.split_once('@') {
            Some((name, partition)) => (name, Partition::parse(partition).ok()?),
            None => (text, Partition::WHOLE),
        };
        Some(Self {
            projection: ProjectionKind::parse(name)?,
            partition,
        })
    }
}

impl fmt::Display for CheckpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.partition == Partition::WHOLE {
            f.write_str(self.projection.name())
        } else {
            write!(f, "{}@{}", self.projection.name(), self.partition)
        }
    }
}

/// An event a projection could not apply, kept with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub projection: String,
    pub position: Position,
    pub event_id: Uuid,
    pub event_type: String,
    pub error: String,
    pub recorded_at: DateTime<Utc>,
}

/// Who holds a lease: one per projector process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder(pub String);

impl LeaseHolder {
    pub fn new_random() -> Self {
        Self(Uuid::new_v4().to_string())
    }
}

/// A canonical dump of every read-model row, for comparing stores and
/// rebuilds. Rows are sorted; values are rendered the same on every backend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub tables: Vec<(String, Vec<Vec<String>>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadStoreError {
    #[error("read store: {0}")]
    Storage(String),
    #[error("lease {0} is held by another projector (or expired): this projector must not write")]
    LeaseLost(String),
    #[error("the current read-model generation changed from {from} to {to}")]
    GenerationChanged { from: String, to: String },
    #[error("read store schema: {0}")]
    Schema(String),
    /// The batch continues the log from a later position than the stored
    /// checkpoint: the events in between would never be applied (the
    /// runner read on from a checkpoint of another generation). It must
    /// start over from the stored checkpoint.
    #[error(
        "projection {key} is at position {checkpoint} but the batch continues from {after}: \
         events in between were read against another checkpoint"
    )]
    Gap {
        key: String,
        checkpoint: Position,
        after: Position,
    },
}

/// One batch for [`ReadStore::apply`].
#[derive(Debug, Clone)]
pub struct ApplyBatch {
    pub key: CheckpointKey,
    /// The batch holds every event of the log after this position (up to
    /// `through`): the position the runner's reading continued from. A
    /// stored checkpoint below it is a [`ReadStoreError::Gap`].
    pub after: Position,
    /// Decoded completions of this partition, in position order.
    pub completions: Vec<Completion>,
    pub dead_letters: Vec<DeadLetter>,
    /// Every event up to here was seen (applied, skipped or dead-lettered).
    pub through: Position,
    /// The lease the writer must hold (renewed by the same transaction).
    pub lease: Option<(LeaseHolder, Duration)>,
}

/// The end of a rebuild of one projection, for [`ReadStore::load_final`]:
/// every row it has besides the completion rows, already coalesced.
#[derive(Debug, Clone)]
pub struct FinalLoad {
    pub projection: ProjectionKind,
    /// The merged plan of the whole log; its `completions` are ignored (they
    /// went through [`ReadStore::load_completions`]).
    pub plan: Plan,
    /// Every membership key, sorted.
    pub membership: Membership,
    pub dead_letters: Vec<DeadLetter>,
    /// The whole projection's checkpoint: the last position read.
    pub through: Position,
}

#[async_trait]
pub trait ReadStore: Send + Sync + fmt::Debug {
    /// The generation this handle reads and writes.
    fn generation(&self) -> String;

    /// Where `key` stands. A partition with no checkpoint of its own starts
    /// where the whole projection stands (e.g. after a replay).
    async fn checkpoint(&self, key: CheckpointKey) -> Result<Position, ReadStoreError>;

    /// Applies a batch and moves the checkpoint to `through`, in one
    /// transaction. Events at or below the stored checkpoint are skipped, so
    /// a redelivered batch changes nothing. Fails with `LeaseLost` when the
    /// lease is not held, and (for a handle following the current
    /// generation) `GenerationChanged` when a rebuild switched generations.
    async fn apply(&self, batch: ApplyBatch) -> Result<(), ReadStoreError>;

    /// Takes or renews the lease `name` for `ttl`; false when another holder
    /// has it.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<bool, ReadStoreError>;

    async fn release_lease(&self, name: &str, holder: &LeaseHolder) -> Result<(), ReadStoreError>;

    /// Names of the leases held (not expired) right now.
    async fn live_leases(&self) -> Result<Vec<String>, ReadStoreError>;

    /// Every checkpoint of this generation.
    async fn checkpoints(&self) -> Result<Vec<(String, Position)>, ReadStoreError>;

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, ReadStoreError>;

    async fn dead_letter_count(&self) -> Result<u64, ReadStoreError>;

    /// A canonical dump of the read-model tables (not checkpoints or leases).
    async fn snapshot(&self) -> Result<Snapshot, ReadStoreError>;

    /// Re-reads the current-generation pointer and, if it moved, points this
    /// handle at the new generation. Returns whether it moved.
    async fn follow_current(&self) -> Result<bool, ReadStoreError>;

    /// Creates a new, empty generation and returns a handle that writes to
    /// it whatever the current pointer says.
    async fn create_generation(&self) -> Result<Box<dyn ReadStore>, ReadStoreError>;

    /// Bulk load of a rebuild, on a handle from [`Self::create_generation`]
    /// only: appends completion rows (learners projection), in position
    /// order, to a generation nothing was applied to. Not a checkpointed
    /// write: the generation is only usable after [`Self::load_final`].
    /// Shared, not owned: the rebuild folds the same rows while they are
    /// written.
    async fn load_completions(&self, rows: Arc<[Completion]>) -> Result<(), ReadStoreError>;

    /// Bulk load of a rebuild, on a handle from [`Self::create_generation`]
    /// only: writes one projection's rows, membership keys, dead letters
    /// and checkpoint into a generation nothing was applied to (rows that
    /// exist already make it fail rather than count twice). Afterwards the
    /// projection continues with [`Self::apply`] as if it had applied the
    /// log up to `through`.
    async fn load_final(&self, load: FinalLoad) -> Result<(), ReadStoreError>;

    /// Makes everything this handle wrote durable. A generation being built
    /// may be written with relaxed durability (nobody reads it, and a crash
    /// only abandons it); `replay` seals it before making it current.
    async fn seal(&self) -> Result<(), ReadStoreError> {
        Ok(())
    }

    /// Makes `generation` current (atomically), and drops generations older
    /// than the one it replaces.
    async fn switch_to(&self, generation: &str) -> Result<(), ReadStoreError>;
}

/// Longest lease kept: ten years (PostgreSQL intervals are bounded, and
/// expiry times are milliseconds in an i64).
const MAX_LEASE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A lease's length in milliseconds, at most [`MAX_LEASE`].
pub(crate) fn lease_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.min(MAX_LEASE).as_millis()).unwrap_or(i64::MAX)
}
