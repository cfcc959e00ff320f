//! The event-store port and its adapters.
//!
//! This crate owns the append-only log: streams of immutable events, each with
//! a revision inside its stream and a gap-free global position across all
//! streams. It deals in bytes (event data is opaque JSON text) and knows
//! nothing of the domain: which events exist and what they mean is the
//! `domain` crate's business.
//!
//! Adapters:
//! - [`sqlite::SqliteEventStore`]: the embedded default (one file, WAL,
//!   `synchronous=FULL`, group commit).
//! - EventStoreDB / KurrentDB: a later adapter implements the same
//!   [`EventStore`] trait and passes the same contract suite.
#![forbid(unsafe_code)]

#[cfg(any(test, feature = "contract"))]
pub mod contract;
pub mod delivery_log;
mod sql;
pub use sql::{WAL_RESTART_FRAMES, begin_immediate, enable_wal, in_read_transaction};
pub mod sqlite;

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Datelike as _, Utc};
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A global position in the log. The first event ever appended has position 1;
/// positions are gap-free and strictly increasing. Position 0 means "before
/// everything" and is what a fresh checkpoint holds.
pub type Position = u64;

/// What the writer expects the stream to look like before its append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpectedRevision {
    /// No check.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must exist (hold at least one event).
    StreamExists,
    /// The stream's last event must have exactly this revision (revisions start at 0).
    Exact(u64),
}

/// The revision a stream is at: `None` when it holds no event.
pub type StreamRevision = Option<u64>;

/// Who, when and what a recorded event came from. Kept beside the event data
/// so audits can tie every event back to the delivery that produced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// When the receiver accepted the delivery.
    pub received_at: DateTime<Utc>,
    /// The configured source (webhook sender) it came through.
    pub source_id: String,
    /// The request id of the HTTP call that carried it.
    pub request_id: String,
    /// `sha256:<hex>` of the delivery document as recorded: the request
    /// body without the white space around it (what the event's data holds
    /// verbatim, so the hash can be checked against it).
    pub content_hash: String,
}

/// An event to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Deterministic id: appending an id that is already in the stream is an
    /// idempotent no-op that returns the original record.
    pub id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    /// JSON text, stored and returned byte for byte.
    pub data: String,
    pub metadata: EventMetadata,
}

/// An event as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    pub id: Uuid,
    pub stream: String,
    /// Revision inside its stream, from 0.
    pub revision: u64,
    /// Global position, from 1, gap-free.
    pub position: Position,
    pub event_type: String,
    pub schema_version: u32,
    /// JSON text exactly as appended.
    pub data: String,
    pub metadata: EventMetadata,
}

/// What an append did, one entry per event in the request, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    /// The revision of the stream's last event after the append: pass it as
    /// [`ExpectedRevision::Exact`] to append after it (EventStoreDB's
    /// "next expected version"). For a duplicate append this is the stream's
    /// current revision, which may have moved on since the original append.
    pub next_revision: u64,
    pub events: Vec<AppendedEvent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendedEvent {
    pub id: Uuid,
    pub revision: u64,
    pub position: Position,
    /// True when the id was already recorded in this stream: nothing was
    /// written, and `revision`/`position` are those of the first record.
    pub duplicate: bool,
}

/// Why an append was refused. Nothing of a refused append is stored.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("wrong expected revision on stream {stream}: expected {expected:?}, actual {actual:?}")]
    Conflict {
        stream: String,
        expected: ExpectedRevision,
        actual: StreamRevision,
    },
    #[error("event id {id} is already recorded in another stream ({existing_stream})")]
    IdInOtherStream { id: Uuid, existing_stream: String },
    #[error("the append mixes already recorded event ids with new ones (first recorded: {id})")]
    PartialDuplicate { id: Uuid },
    #[error("an append must carry at least one event")]
    Empty,
    /// The same id appears twice in one request: the caller built a batch
    /// that cannot be recorded (ids are unique across the whole log).
    #[error("event id {id} appears more than once in the append")]
    DuplicateIdInRequest { id: Uuid },
    /// `received_at` outside years 0000-9999 UTC: the stored form (RFC
    /// 3339) cannot write it, so the event could never be read back and
    /// would stop every reader of the log at its position.
    #[error("event {id}: received_at {received_at:?} is outside years 0000-9999 UTC")]
    ReceivedAtOutOfRange {
        id: Uuid,
        received_at: DateTime<Utc>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The checks of an append that need no stored data (step 1 of
/// [`EventStore::append`]), shared by every backend.
pub fn check_request(events: &[NewEvent]) -> Result<(), AppendError> {
    if events.is_empty() {
        return Err(AppendError::Empty);
    }
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    if let Some(event) = events.iter().find(|e| !seen.insert(e.id)) {
        return Err(AppendError::DuplicateIdInRequest { id: event.id });
    }
    if let Some(event) = events
        .iter()
        .find(|e| !(0..=9999).contains(&e.metadata.received_at.year()))
    {
        return Err(AppendError::ReceivedAtOutOfRange {
            id: event.id,
            received_at: event.metadata.received_at,
        });
    }
    Ok(())
}

/// The store could not do what was asked (I/O, corruption, shut down).
/// Never the client's fault: callers answer it as "unavailable", or a
/// damaged row (`Corrupt`, which retrying does not mend) as a server error.
/// `Clone` so that one failed group commit can be reported to every caller
/// in the group.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Storage(String),
    #[error("the store is shut down")]
    Closed,
    #[error("recorded event at position {position} is unreadable: {reason}")]
    Corrupt { position: Position, reason: String },
}

/// Direction-free, bounded read of the global log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadAll {
    /// First position to return (inclusive). 0 and 1 both mean "from the
    /// first event".
    pub from: Position,
    /// At most this many events.
    pub limit: usize,
}

/// A set of streams read together, in position order: every stream whose
/// name starts with `prefix`, and the stream named `exact` (an
/// institution's `learner-{i}-` streams and its `institution-{i}`). Put the
/// separator in the prefix (`learner-1-`), or it takes in the streams of
/// every name it begins (`learner-1` is a prefix of `learner-12-3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSet {
    prefix: String,
    exact: String,
}

impl StreamSet {
    pub fn new(prefix: impl Into<String>, exact: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            exact: exact.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn exact(&self) -> &str {
        &self.exact
    }

    /// Whether the stream named `stream` is one of the set.
    pub fn contains(&self, stream: &[u8]) -> bool {
        stream.starts_with(self.prefix.as_bytes()) || stream == self.exact.as_bytes()
    }
}

/// Events of the log the default [`EventStore::read_streams`] reads per
/// [`EventStore::read_all`] while it looks for those of the set.
const SCAN_CHUNK: usize = 1_024;

/// A stretch of the log in its stored form, for consumers that copy events
/// out without interpreting them (exports): every text field of every event
/// in one buffer, so reading a chunk costs two allocations (none when the
/// buffer is reused), not six per event, and nothing is parsed or
/// re-validated. [`EventStore::read_all_raw`] fills it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawEvents {
    bytes: Vec<u8>,
    events: Vec<RawIndex>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RawIndex {
    position: Position,
    id: Uuid,
    revision: u64,
    schema_version: u32,
    /// Where each text field ends in `bytes`, in [`RawEvent::texts`]
    /// order; each starts where the one before ends (the first at the end
    /// of the previous event's last field).
    ends: [usize; 7],
}

/// One event of [`RawEvents`]. Text fields are the bytes appended (UTF-8,
/// not re-checked on the way out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent<'a> {
    pub position: Position,
    pub id: Uuid,
    pub stream: &'a [u8],
    pub revision: u64,
    pub event_type: &'a [u8],
    pub schema_version: u32,
    /// JSON text exactly as appended.
    pub data: &'a [u8],
    /// RFC 3339, UTC. The embedded store holds nanoseconds and `Z`
    /// (`2024-01-01T00:00:00.000000000Z`); other backends write that form
    /// too, so it sorts as text.
    pub received_at: &'a [u8],
    pub source_id: &'a [u8],
    pub request_id: &'a [u8],
    pub content_hash: &'a [u8],
}

impl<'a> RawEvent<'a> {
    fn texts(&self) -> [&'a [u8]; 7] {
        [
            self.stream,
            self.event_type,
            self.data,
            self.received_at,
            self.source_id,
            self.request_id,
            self.content_hash,
        ]
    }
}

impl RawEvents {
    /// Empties it, keeping its allocations.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.events.clear();
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Bytes of text held (a chunk's size, for sizing output buffers).
    pub fn text_bytes(&self) -> usize {
        self.bytes.len()
    }

    pub fn push(&mut self, event: &RawEvent<'_>) {
        let mut ends = [0; 7];
        for (end, text) in ends.iter_mut().zip(event.texts()) {
            self.bytes.extend_from_slice(text);
            *end = self.bytes.len();
        }
        self.events.push(RawIndex {
            position: event.position,
            id: event.id,
            revision: event.revision,
            schema_version: event.schema_version,
            ends,
        });
    }

    /// Appends a decoded event in the stored form (`received_at` with
    /// nanoseconds and `Z`).
    pub fn push_recorded(&mut self, e: &RecordedEvent) {
        let received_at = sql::format_time(&e.metadata.received_at);
        self.push(&RawEvent {
            position: e.position,
            id: e.id,
            stream: e.stream.as_bytes(),
            revision: e.revision,
            event_type: e.event_type.as_bytes(),
            schema_version: e.schema_version,
            data: e.data.as_bytes(),
            received_at: received_at.as_bytes(),
            source_id: e.metadata.source_id.as_bytes(),
            request_id: e.metadata.request_id.as_bytes(),
            content_hash: e.metadata.content_hash.as_bytes(),
        });
    }

    pub fn get(&self, index: usize) -> Option<RawEvent<'_>> {
        let i = self.events.get(index)?;
        let start = index
            .checked_sub(1)
            .and_then(|p| self.events.get(p))
            .map_or(0, |p| p.ends[6]);
        let mut texts = [&[][..]; 7];
        let mut from = start;
        for (text, &end) in texts.iter_mut().zip(&i.ends) {
            *text = self.bytes.get(from..end)?;
            from = end;
        }
        let [
            stream,
            event_type,
            data,
            received_at,
            source_id,
            request_id,
            content_hash,
        ] = texts;
        Some(RawEvent {
            position: i.position,
            id: i.id,
            stream,
            revision: i.revision,
            event_type,
            schema_version: i.schema_version,
            data,
            received_at,
            source_id,
            request_id,
            content_hash,
        })
    }

    /// The events, in the order read.
    pub fn iter(&self) -> impl Iterator<Item = RawEvent<'_>> {
        (0..self.events.len()).filter_map(|i| self.get(i))
    }

    /// The position of the last event, if any.
    pub fn last_position(&self) -> Option<Position> {
        self.events.last().map(|e| e.position)
    }
}

/// A catch-up-then-live stream of every event from a position on, in
/// position order, with no gap and no repeat across the switch to live.
pub type Subscription = BoxStream<'static, Result<RecordedEvent, StoreError>>;

/// The event-store port. Every backend passes the contract suite in
/// the `contract` module (feature `contract`), run for SQLite by `tests/contract.rs`
/// of this crate.
#[async_trait]
pub trait EventStore: Send + Sync + fmt::Debug {
    /// Appends `events` to `stream` atomically: all or nothing. `Ok` means
    /// the events are durably recorded.
    ///
    /// The checks, in this order:
    /// 1. An empty `events` is [`AppendError::Empty`]; an id repeated inside
    ///    `events` is [`AppendError::DuplicateIdInRequest`]; a `received_at`
    ///    outside years 0000-9999 is [`AppendError::ReceivedAtOutOfRange`]
    ///    ([`check_request`]).
    /// 2. An id already recorded in another stream is
    ///    [`AppendError::IdInOtherStream`].
    /// 3. If every id is already recorded in `stream`, the append is an
    ///    idempotent no-op: `Ok` with `duplicate: true` and the original
    ///    revision and position of each event, whatever `expected` says (a
    ///    webhook redelivered days later gets the same answer). This holds
    ///    for concurrent appends of the same ids too: exactly one of them
    ///    records the events, and all of them see the same positions.
    /// 4. Some ids recorded in `stream` and some not is
    ///    [`AppendError::PartialDuplicate`].
    /// 5. `expected` is checked against the stream's last revision;
    ///    a mismatch is [`AppendError::Conflict`] carrying both.
    /// 6. The events get consecutive revisions after the stream's last one
    ///    (from 0) and consecutive global positions after the head (from 1).
    ///
    /// A refused append stores nothing. Store failures are
    /// [`AppendError::Store`]; after shutdown, [`StoreError::Closed`].
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedRevision,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, AppendError>;

    /// Every event of one stream, from revision `from` on, in revision order,
    /// at most `limit` of them. An unknown stream reads as empty.
    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// A bounded slice of the global log in position order.
    async fn read_all(&self, read: ReadAll) -> Result<Vec<RecordedEvent>, StoreError>;

    /// [`read_all`](Self::read_all) in the stored form, into `buf`
    /// (cleared first; its allocations are reused): the same events, for
    /// readers that copy them out (exports). Backends override it when they
    /// can skip decoding; this default decodes and re-encodes.
    async fn read_all_raw(
        &self,
        read: ReadAll,
        mut buf: RawEvents,
    ) -> Result<RawEvents, StoreError> {
        let events = self.read_all(read).await?;
        buf.clear();
        for e in &events {
            buf.push_recorded(e);
        }
        Ok(buf)
    }

    /// The events of the streams of `streams`, in position order, from
    /// position `read.from` on (inclusive; 0 and 1 both mean "from the
    /// first event"), at most `read.limit` of them. Fewer than `limit` means
    /// the set holds no further event up to the head.
    ///
    /// This default reads the whole log from `from` through
    /// [`read_all`](Self::read_all) (a chunk at a time, so in constant
    /// memory) and keeps the set's events; backends with an index on the
    /// stream name override it to read only those.
    async fn read_streams(
        &self,
        streams: &StreamSet,
        read: ReadAll,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut found = Vec::new();
        if read.limit == 0 {
            return Ok(found);
        }
        let mut from = read.from;
        loop {
            let events = self
                .read_all(ReadAll {
                    from,
                    limit: SCAN_CHUNK,
                })
                .await?;
            let read_now = events.len();
            let Some(last) = events.last().map(|e| e.position) else {
                return Ok(found);
            };
            for e in events {
                if streams.contains(e.stream.as_bytes()) {
                    found.push(e);
                    if found.len() == read.limit {
                        return Ok(found);
                    }
                }
            }
            if read_now < SCAN_CHUNK {
                return Ok(found);
            }
            from = last + 1;
        }
    }

    /// [`read_streams`](Self::read_streams) in the stored form, into `buf`
    /// (cleared first), as [`read_all_raw`](Self::read_all_raw) is to
    /// `read_all`. This default decodes and re-encodes.
    async fn read_streams_raw(
        &self,
        streams: &StreamSet,
        read: ReadAll,
        mut buf: RawEvents,
    ) -> Result<RawEvents, StoreError> {
        let events = self.read_streams(streams, read).await?;
        buf.clear();
        for e in &events {
            buf.push_recorded(e);
        }
        Ok(buf)
    }

    /// The position of the last recorded event (0 for an empty log).
    async fn head(&self) -> Result<Position, StoreError>;

    /// Catch up from `from` (inclusive), then follow new appends live.
    /// Every event is yielded exactly once, in position order. The stream
    /// yields an error item (and then ends) only if the store fails; it ends
    /// with `None` when the store is shut down.
    fn subscribe_all(&self, from: Position) -> Subscription;

    /// Cheap check that an append would be accepted right now (for `/readyz`).
    async fn writable(&self) -> Result<(), StoreError>;
}
