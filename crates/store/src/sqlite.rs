//! The embedded event store: one SQLite file (WAL, `synchronous=FULL`) with a
//! single writer thread that commits concurrent appends together.
//!
//! Writes: every [`EventStore::append`] becomes a request on a bounded
//! channel to one OS thread that owns the only read-write connection. The
//! thread takes whatever is queued (up to [`SqliteOptions::max_batch`]
//! requests), applies each request inside its own SAVEPOINT of a single
//! `BEGIN IMMEDIATE` transaction, commits once (one fsync for the group) and
//! only then answers the callers. Because the whole group runs in one
//! transaction on one connection, a request sees the events of the requests
//! before it in the group: two appends of the same id racing in one group
//! resolve to one record and one "duplicate" answer.
//!
//! Reads run on tokio's blocking threads over read-only connections, so they
//! neither wait for nor delay a group commit. After every commit the writer
//! publishes the new head on a `watch` channel, which live subscriptions wait
//! on once caught up.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::ValueRef;
use rusqlite::{CachedStatement, Connection, OptionalExtension, Row, params};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::sql::{self, Durability, ReadPool};
use crate::{
    AppendError, AppendOutcome, AppendedEvent, EventMetadata, EventStore, ExpectedRevision,
    NewEvent, Position, RawEvent, RawEvents, ReadAll, RecordedEvent, StoreError, StreamRevision,
    StreamSet, Subscription,
};

/// Schema migrations, applied in order; `PRAGMA user_version` is the number
/// already applied. Never edit a released entry: add a new one.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE events (
    position       INTEGER PRIMARY KEY CHECK (position >= 1),
    id             BLOB    NOT NULL UNIQUE CHECK (length(id) = 16),
    stream         TEXT    NOT NULL,
    revision       INTEGER NOT NULL CHECK (revision >= 0),
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL CHECK (schema_version >= 0),
    data           TEXT    NOT NULL,
    received_at    TEXT    NOT NULL,
    source_id      TEXT    NOT NULL,
    request_id     TEXT    NOT NULL,
    content_hash   TEXT    NOT NULL,
    UNIQUE (stream, revision)
);

-- The log is immutable: the code has no update or delete path, and these
-- make a hand-written one (or an operator's sqlite3 session) fail too.
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are immutable: UPDATE refused');
END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are immutable: DELETE refused');
END;

-- Gap-free positions and revisions are what consumers rely on to know they
-- missed nothing; the writer assigns them, the database double-checks.
CREATE TRIGGER events_position_gap_free BEFORE INSERT ON events
WHEN NEW.position <> COALESCE((SELECT MAX(position) FROM events), 0) + 1
BEGIN
    SELECT RAISE(ABORT, 'events.position must be the head + 1');
END;
CREATE TRIGGER events_revision_gap_free BEFORE INSERT ON events
WHEN NEW.revision <> COALESCE((SELECT MAX(revision) FROM events WHERE stream = NEW.stream), -1) + 1
BEGIN
    SELECT RAISE(ABORT, 'events.revision must be the stream revision + 1');
END;
"#];

/// The columns `decode_event` reads, followed by `$rest`; a macro so the
/// statement text is a constant (statement-cache lookups do not allocate).
macro_rules! select_events {
    ($rest:literal) => {
        concat!(
            "SELECT position, id, stream, revision, event_type, schema_version, data, \
             received_at, source_id, request_id, content_hash FROM events ",
            $rest
        )
    };
}

/// The positions of a [`StreamSet`]'s events in `?4..?5`, in no order:
/// `?1`/`?2` bound the prefix's range of stream names (`?2` is the least
/// name above every name with the prefix), `?3` is the exact stream. They
/// come from the `(stream, revision)` index alone (it holds the rowid,
/// which is the position): two range searches of it. Written so rather
/// than as one `WHERE (range OR stream = ?3) AND position >= ?4`, which
/// SQLite may answer by walking the whole table. `INDEXED BY` the `UNIQUE
/// (stream, revision)` index (the name SQLite gives it: the table's second
/// UNIQUE constraint) holds SQLite to that plan: with statistics
/// (`ANALYZE`) of a log where the range is a large share, it chose to walk
/// the whole table in position order instead, and a plan without the index
/// now fails to prepare rather than run slowly. `+position` keeps the
/// position bound off the table's rowid search. The range leaves out `?3`,
/// so no position comes twice. The caller sorts them: SQLite's sorter (a
/// temporary B-tree) took three times as long as the walk itself.
macro_rules! select_stream_set_positions {
    () => {
        "SELECT position FROM events INDEXED BY sqlite_autoindex_events_2 \
            WHERE stream >= ?1 AND stream < ?2 AND stream <> ?3 \
                AND +position >= ?4 AND +position < ?5 \
         UNION ALL \
         SELECT position FROM events INDEXED BY sqlite_autoindex_events_2 \
            WHERE stream = ?3 AND +position >= ?4 AND +position < ?5"
    };
}

/// One [`EventStore::read_streams`] on SQLite, in one read transaction: the
/// set's positions from [`select_stream_set_positions!`], then its rows
/// read one by one by position.
///
/// Every walk of that index range costs the whole range (its key is the
/// stream, not the position): 18 ms for the largest institution of a
/// 1M-event log, most of an export chunk's time when each chunk walked it
/// again. So a walk gathers the positions of up to [`Self::AHEAD`] reads
/// of this size, and keeps them in [`SetPositions`] for the reads that go
/// on from any of them (an export's next chunk, a client's next page,
/// which may begin inside this read). A window of positions
/// (`?4..?5`) bounds what a walk returns and sorts: it starts at
/// [`Self::FIRST_WINDOW`] times what the walk gathers and grows fourfold
/// while the read is short, so a sparse set takes a few walks of its
/// (small) range.
struct StreamSetRead {
    lo: String,
    hi: rusqlite::types::Value,
    exact: String,
    from: i64,
    limit: i64,
}

impl StreamSetRead {
    const FIRST_WINDOW: i64 = 4;
    /// Reads of this size one walk gathers positions for ...
    const AHEAD: i64 = 64;
    /// ... but no more positions than this (512 KiB) beyond the read's own.
    const MOST_AHEAD: i64 = 65_536;

    /// `None` for a read of nothing.
    fn new(streams: &StreamSet, read: ReadAll) -> Option<Self> {
        if read.limit == 0 {
            return None;
        }
        let hi = match prefix_successor(streams.prefix()) {
            Some(above) => rusqlite::types::Value::Text(above),
            // No text is above every name with the prefix; a blob sorts
            // after every text.
            None => rusqlite::types::Value::Blob(Vec::new()),
        };
        Some(Self {
            lo: streams.prefix().to_owned(),
            hi,
            exact: streams.exact().to_owned(),
            from: sql::to_i64(read.from, "position")
                .unwrap_or(i64::MAX)
                .max(1),
            limit: sql::limit_to_i64(read.limit),
        })
    }

    /// Hands each row to `row`, in position order, up to the limit or the
    /// head as it was when the positions were read.
    fn run(
        self,
        conn: &Connection,
        kept: &SetPositions,
        row: impl FnMut(&Row<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        sql::in_read_transaction(conn, |conn| self.read(conn, kept, row))
    }

    fn read(
        &self,
        conn: &Connection,
        kept: &SetPositions,
        mut row: impl FnMut(&Row<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut found = kept
            .take(&self.lo, &self.exact, self.from)
            .unwrap_or_else(|| Found {
                lo: self.lo.clone(),
                exact: self.exact.clone(),
                from: self.from,
                until: self.from,
                positions: VecDeque::new(),
            });
        found.skip_to(self.from);
        if found.len() < self.limit {
            let walks = self.walk(conn, &mut found)?;
            kept.walks.fetch_add(walks, Ordering::Relaxed);
        }
        let mut stmt = conn.prepare_cached(select_events!("WHERE position = ?1"))?;
        let limit = usize::try_from(self.limit).unwrap_or(usize::MAX);
        for &position in found.positions.iter().take(limit) {
            let mut rows = stmt.query([position])?;
            let Some(r) = rows.next()? else {
                return Err(StoreError::Corrupt {
                    position: u64::try_from(position).unwrap_or(0),
                    reason: "in the stream index but not in the log".to_owned(),
                });
            };
            row(r)?;
        }
        // Kept from this read's first position, not after its last: a
        // page that is full before the end of its read (one with a time
        // filter reads a chunk at a time) ends inside it, and the next
        // page goes on from there.
        kept.keep(found);
        Ok(())
    }

    /// Adds the set's next positions to `found` until it holds this read's
    /// or the walks reached the head; returns how many walks it made.
    fn walk(&self, conn: &Connection, found: &mut Found) -> Result<u64, StoreError> {
        let head = sql::to_i64(read_head(conn)?, "position")?;
        let gather = self
            .limit
            .saturating_mul(Self::AHEAD)
            .min(Self::MOST_AHEAD)
            .max(self.limit);
        let mut stmt = conn.prepare_cached(select_stream_set_positions!())?;
        let mut window = gather.saturating_mul(Self::FIRST_WINDOW);
        let mut walks = 0;
        while found.len() < self.limit && found.until <= head {
            walks += 1;
            // Only positions up to the head read above: every one of them
            // is in the log (and stays: it is immutable and gap-free), so
            // what the walk finds below `until` is all the set has there.
            let mut until = found.until.saturating_add(window).min(head + 1);
            let mut positions = stmt
                .query_map(
                    params![self.lo, self.hi, self.exact, found.until, until],
                    |r| r.get::<_, i64>(0),
                )?
                .collect::<Result<Vec<_>, _>>()?;
            positions.sort_unstable();
            let room = usize::try_from(gather - found.len()).unwrap_or(usize::MAX);
            if positions.len() > room {
                positions.truncate(room);
                // Cut short: what follows the last kept is not kept.
                if let Some(&last) = positions.last() {
                    until = last + 1;
                }
            }
            found.positions.extend(positions);
            found.until = until;
            window = window.saturating_mul(4);
        }
        Ok(walks)
    }
}

/// The positions of a set's events between `from` and `until`, all of
/// them, in order.
struct Found {
    lo: String,
    exact: String,
    from: i64,
    until: i64,
    positions: VecDeque<i64>,
}

impl Found {
    fn len(&self) -> i64 {
        i64::try_from(self.positions.len()).unwrap_or(i64::MAX)
    }

    /// Drops the positions before `from`, which must be in `from..=until`.
    fn skip_to(&mut self, from: i64) {
        let before = self.positions.partition_point(|&p| p < from);
        self.positions.drain(..before);
        self.from = from;
        self.until = self.until.max(from);
    }
}

/// Positions walks found, for the reads that go on from any of them (a few
/// sets at once: concurrent exports and clients).
#[derive(Default)]
struct SetPositions {
    found: Mutex<VecDeque<Found>>,
    /// Walks of a set's index range made (for tests).
    walks: AtomicU64,
}

impl SetPositions {
    /// Sets kept: at most [`StreamSetRead::MOST_AHEAD`] positions each.
    const KEPT: usize = 8;

    /// The kept positions of this set that a read from `from` can go on
    /// with, taken out (one read uses them at a time).
    fn take(&self, lo: &str, exact: &str, from: i64) -> Option<Found> {
        let mut kept = self.found.lock().ok()?;
        let i = kept
            .iter()
            .position(|f| f.lo == lo && f.exact == exact && f.from <= from && from < f.until)?;
        kept.remove(i)
    }

    /// Keeps what `found` knows, if anything: its positions, or that the
    /// set has none between `from` and `until` (the last read of an
    /// export then walks nothing).
    fn keep(&self, found: Found) {
        if found.until <= found.from {
            return;
        }
        // A poisoned lock only loses what would have saved a walk.
        if let Ok(mut kept) = self.found.lock() {
            kept.push_front(found);
            kept.truncate(Self::KEPT);
        }
    }
}

/// The least text above every text starting with `prefix` in SQLite's
/// BINARY order (bytes, which for UTF-8 is code point order): the prefix
/// with its last character incremented (`learner-12-` -> `learner-12.`),
/// dropping trailing characters that cannot be. `None` when there is no
/// such text (an empty prefix).
fn prefix_successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match u32::from(last) {
            0xD7FF => Some('\u{E000}'),
            n => n.checked_add(1).and_then(char::from_u32),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// Tunables of [`SqliteEventStore::open_with`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Most append requests committed in one transaction.
    pub max_batch: usize,
    /// Append requests that may wait for the writer before `append` itself
    /// waits (backpressure).
    pub queue_capacity: usize,
    /// Read-only connections kept open between reads.
    pub max_idle_readers: usize,
    /// Events a subscription reads per query while catching up.
    pub subscription_batch: usize,
    /// How often a caught-up subscription looks at the file even though
    /// this process committed nothing: another process (a `tracker serve`
    /// beside a `tracker project`) may append to the same file. Appends made
    /// through this handle wake subscriptions at once.
    pub poll_interval: Duration,
    /// How long the writer waits for a lock held by another process (an
    /// operator's sqlite3 session) before failing the group.
    pub busy_timeout: Duration,
    /// How often the background checkpointer copies the WAL into the
    /// database file (see `Checkpointer`: a longer interval writes fewer
    /// bytes, a shorter one keeps the WAL smaller).
    pub checkpoint_interval: Duration,
    /// WAL size, in pages (frames), above which the WAL is made to start
    /// over once the checkpointer has copied it (see `Checkpointer`).
    pub wal_restart_frames: u32,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            max_batch: 1024,
            queue_capacity: 4096,
            max_idle_readers: 4,
            subscription_batch: 512,
            poll_interval: Duration::from_millis(20),
            busy_timeout: sql::BUSY_TIMEOUT,
            checkpoint_interval: Duration::from_secs(1),
            wal_restart_frames: sql::WAL_RESTART_FRAMES,
        }
    }
}

/// What the writer has done since the store was opened: the ratio of the two
/// is the group-commit factor (appends per fsync), worth exporting as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Transactions committed (or attempted) for appends.
    pub groups: u64,
    /// Append requests those transactions carried.
    pub appends: u64,
}

#[derive(Default)]
struct Counters {
    groups: AtomicU64,
    appends: AtomicU64,
}

/// The embedded [`EventStore`]. Cheap to clone: clones share one writer
/// thread and one read pool. The writer stops when [`close`](Self::close) is
/// called or the last clone is dropped, after finishing the queued appends.
#[derive(Clone)]
pub struct SqliteEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// `None` once shutdown began: new appends are refused with `Closed`.
    requests: Mutex<Option<mpsc::Sender<Request>>>,
    writer: sql::WriterThread,
    /// Set by the writer thread when it ends because it was told to, so a
    /// vanished writer can be told apart from a crashed one.
    stopped_cleanly: Arc<AtomicBool>,
    readers: Arc<ReadPool>,
    head: watch::Receiver<Position>,
    subscription_batch: usize,
    poll_interval: Duration,
    counters: Arc<Counters>,
    stream_sets: Arc<SetPositions>,
}

enum Request {
    Append {
        stream: String,
        expected: ExpectedRevision,
        events: Vec<NewEvent>,
        reply: oneshot::Sender<Result<AppendOutcome, AppendError>>,
    },
    CheckWritable {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

impl SqliteEventStore {
    /// Opens (creating if needed) the event log at `path` with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, SqliteOptions::default())
    }

    /// Opens (creating file and parent directory if needed) the event log at
    /// `path`, migrates its schema and starts the writer thread.
    pub fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let conn = sql::open_writer(&path, Durability::Full, options.busy_timeout, MIGRATIONS)?;
        let cache = sql::WriterCache::new(&conn)?;
        let head = read_head(&conn)?;
        let (head_tx, head_rx) = watch::channel(head);
        let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
        let stopped_cleanly = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let writer = Writer {
            conn,
            cache,
            path: path.clone(),
            head: head_tx,
            max_batch: options.max_batch.max(1),
            checkpoint_interval: options.checkpoint_interval,
            wal_restart_frames: options.wal_restart_frames,
            stopped_cleanly: Arc::clone(&stopped_cleanly),
            counters: Arc::clone(&counters),
        };
        let thread = sql::WriterThread::spawn("event-store-writer", move || writer.run(rx))?;
        Ok(Self {
            inner: Arc::new(Inner {
                readers: Arc::new(ReadPool::new(path.clone(), options.max_idle_readers)),
                path,
                requests: Mutex::new(Some(tx)),
                writer: thread,
                stopped_cleanly,
                head: head_rx,
                subscription_batch: options.subscription_batch.max(1),
                poll_interval: options.poll_interval.max(Duration::from_millis(1)),
                counters,
                stream_sets: Arc::default(),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Group-commit counters since open.
    pub fn commit_stats(&self) -> CommitStats {
        CommitStats {
            groups: self.inner.counters.groups.load(Ordering::Relaxed),
            appends: self.inner.counters.appends.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting appends, lets the writer commit what is already
    /// queued, waits for its thread to end and closes the read connections.
    /// Later appends (on any clone) return `Closed`; live subscriptions end.
    /// Every call, concurrent or later, returns only once the writer has
    /// ended.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.inner.stop_accepting()?;
        self.inner.writer.ended().await;
        self.inner.readers.close();
        if self.inner.stopped_cleanly.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(StoreError::Storage("the writer thread panicked".into()))
        }
    }

    async fn send(&self, request: Request) -> Result<(), StoreError> {
        // Clone the sender rather than hold the lock across the await; a
        // clone in flight keeps the writer draining until it is delivered.
        let sender = self
            .inner
            .requests
            .lock()
            .map_err(|_| StoreError::Storage("event store handle lock poisoned".into()))?
            .clone()
            .ok_or(StoreError::Closed)?;
        sender
            .send(request)
            .await
            .map_err(|_| self.inner.writer_gone())
    }
}

impl Inner {
    fn stop_accepting(&self) -> Result<(), StoreError> {
        self.requests
            .lock()
            .map_err(|_| StoreError::Storage("event store handle lock poisoned".into()))?
            .take();
        Ok(())
    }

    fn writer_gone(&self) -> StoreError {
        writer_gone(&self.stopped_cleanly)
    }
}

fn writer_gone(stopped_cleanly: &AtomicBool) -> StoreError {
    if stopped_cleanly.load(Ordering::Acquire) {
        StoreError::Closed
    } else {
        StoreError::Storage("the event store writer thread stopped unexpectedly".into())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping the last sender ends the writer's loop once it has
        // committed what is queued; joining makes "dropped" mean "done".
        let requests = self.requests.get_mut().unwrap_or_else(|p| p.into_inner());
        requests.take();
        if self.writer.join() {
            tracing::error!("the event store writer thread panicked");
        }
        self.readers.close();
    }
}

impl fmt::Debug for SqliteEventStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteEventStore")
            .field("path", &self.inner.path)
            .field("head", &*self.inner.head.borrow())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl EventStore for SqliteEventStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedRevision,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, AppendError> {
        // Checks that need no database are answered here, off the writer.
        crate::check_request(&events)?;
        let (reply, answer) = oneshot::channel();
        self.send(Request::Append {
            stream: stream.to_owned(),
            expected,
            events,
            reply,
        })
        .await?;
        answer.await.map_err(|_| self.inner.writer_gone())?
    }

    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let stream = stream.to_owned();
        let from = sql::to_i64(from, "revision").unwrap_or(i64::MAX);
        let limit = sql::limit_to_i64(limit);
        self.inner
            .readers
            .run(move |conn| {
                let mut stmt = conn.prepare_cached(select_events!(
                    "WHERE stream = ?1 AND revision >= ?2 ORDER BY revision LIMIT ?3"
                ))?;
                collect_events(stmt.query(params![stream, from, limit])?)
            })
            .await
    }

    async fn read_all(&self, read: ReadAll) -> Result<Vec<RecordedEvent>, StoreError> {
        read_all(&self.inner.readers, read).await
    }

    async fn read_all_raw(&self, read: ReadAll, buf: RawEvents) -> Result<RawEvents, StoreError> {
        read_all_raw(&self.inner.readers, read, buf).await
    }

    async fn read_streams(
        &self,
        streams: &StreamSet,
        read: ReadAll,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let Some(read) = StreamSetRead::new(streams, read) else {
            return Ok(Vec::new());
        };
        let kept = Arc::clone(&self.inner.stream_sets);
        self.inner
            .readers
            .run(move |conn| {
                let mut events = Vec::new();
                read.run(conn, &kept, |row| {
                    events.push(decode_event(row)?);
                    Ok(())
                })?;
                Ok(events)
            })
            .await
    }

    async fn read_streams_raw(
        &self,
        streams: &StreamSet,
        read: ReadAll,
        mut buf: RawEvents,
    ) -> Result<RawEvents, StoreError> {
        buf.clear();
        let Some(read) = StreamSetRead::new(streams, read) else {
            return Ok(buf);
        };
        let kept = Arc::clone(&self.inner.stream_sets);
        self.inner
            .readers
            .run(move |conn| {
                read.run(conn, &kept, |row| push_raw(&mut buf, row))?;
                Ok(buf)
            })
            .await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        self.inner.readers.run(read_head).await
    }

    fn subscribe_all(&self, from: Position) -> Subscription {
        let state = Follow {
            readers: Arc::clone(&self.inner.readers),
            head: self.inner.head.clone(),
            stopped_cleanly: Arc::clone(&self.inner.stopped_cleanly),
            next: from.max(1),
            batch: self.inner.subscription_batch,
            poll_interval: self.inner.poll_interval,
            buffered: VecDeque::new(),
            writer_stopped: false,
            done: false,
        };
        Box::pin(futures::stream::unfold(state, |mut state| async move {
            let item = state.next_item().await?;
            Some((item, state))
        }))
    }

    async fn writable(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::CheckWritable { reply }).await?;
        answer.await.map_err(|_| self.inner.writer_gone())?
    }
}

async fn read_all(
    readers: &Arc<ReadPool>,
    read: ReadAll,
) -> Result<Vec<RecordedEvent>, StoreError> {
    readers
        .run(move |conn| {
            let mut events = Vec::new();
            each_in_log(conn, read, |row| {
                events.push(decode_event(row)?);
                Ok(())
            })?;
            Ok(events)
        })
        .await
}

/// The columns copied as they are stored: no `String` per field, no UTF-8
/// check, no time parsing (an export of the whole log spent most of its
/// time on those when it read through `read_all`).
async fn read_all_raw(
    readers: &Arc<ReadPool>,
    read: ReadAll,
    mut buf: RawEvents,
) -> Result<RawEvents, StoreError> {
    buf.clear();
    readers
        .run(move |conn| {
            each_in_log(conn, read, |row| push_raw(&mut buf, row))?;
            Ok(buf)
        })
        .await
}

/// Hands each event of `read` (positions from `read.from`, at most
/// `read.limit`) to `row`, in position order. Positions are gap-free, so a
/// missing one means a damaged file: it is reported, not read past, since an
/// export or a replay that skipped it would look complete.
fn each_in_log(
    conn: &Connection,
    read: ReadAll,
    mut row: impl FnMut(&Row<'_>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    if read.limit == 0 {
        return Ok(());
    }
    let from = sql::to_i64(read.from, "position").unwrap_or(i64::MAX);
    let limit = sql::limit_to_i64(read.limit);
    let mut stmt = conn.prepare_cached(select_events!(
        "WHERE position >= ?1 ORDER BY position LIMIT ?2"
    ))?;
    let mut rows = stmt.query(params![from, limit])?;
    let mut next = read.from.max(1);
    while let Some(r) = rows.next()? {
        let position: i64 = r.get(0)?;
        if u64::try_from(position) != Ok(next) {
            return Err(StoreError::Corrupt {
                position: u64::try_from(position).unwrap_or(0),
                reason: format!("expected position {next} next in the log"),
            });
        }
        row(r)?;
        next += 1;
    }
    Ok(())
}

fn push_raw(buf: &mut RawEvents, row: &Row<'_>) -> Result<(), StoreError> {
    let raw_position: i64 = row.get(0)?;
    let position = u64::try_from(raw_position).map_err(|_| StoreError::Corrupt {
        position: 0,
        reason: format!("negative position {raw_position}"),
    })?;
    let corrupt = |reason: String| StoreError::Corrupt { position, reason };
    let text = |index: usize| text_column(row, index, position);
    let id = row
        .get_ref(1)?
        .as_blob()
        .map_err(|err| corrupt(format!("bad event id: {err}")))
        .and_then(|bytes| {
            Uuid::from_slice(bytes).map_err(|err| corrupt(format!("bad event id: {err}")))
        })?;
    let revision: i64 = row.get(3)?;
    let schema_version: i64 = row.get(5)?;
    buf.push(&RawEvent {
        position,
        id,
        stream: text(2)?,
        revision: u64::try_from(revision)
            .map_err(|_| corrupt(format!("negative revision {revision}")))?,
        event_type: text(4)?,
        schema_version: u32::try_from(schema_version)
            .map_err(|_| corrupt(format!("schema version {schema_version} out of range")))?,
        data: text(6)?,
        received_at: text(7)?,
        source_id: text(8)?,
        request_id: text(9)?,
        content_hash: text(10)?,
    });
    Ok(())
}

/// A text column's bytes; anything else in it is a damaged row.
fn text_column<'r>(
    row: &'r Row<'_>,
    index: usize,
    position: Position,
) -> Result<&'r [u8], StoreError> {
    match row.get_ref(index)? {
        ValueRef::Text(bytes) => Ok(bytes),
        other => Err(StoreError::Corrupt {
            position,
            reason: format!("column {index} holds {:?}, not text", other.data_type()),
        }),
    }
}

/// A text column as an owned string; bytes that are not UTF-8, or a value
/// that is not text, are a damaged row.
fn string_column(row: &Row<'_>, index: usize, position: Position) -> Result<String, StoreError> {
    let bytes = text_column(row, index, position)?;
    String::from_utf8(bytes.to_vec()).map_err(|err| StoreError::Corrupt {
        position,
        reason: format!("column {index} is not UTF-8: {err}"),
    })
}

fn read_head(conn: &Connection) -> Result<Position, StoreError> {
    let head: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(position), 0) FROM events")?
        .query_row([], |row| row.get(0))?;
    u64::try_from(head).map_err(|_| StoreError::Corrupt {
        position: 0,
        reason: format!("negative head position {head}"),
    })
}

fn collect_events(mut rows: rusqlite::Rows<'_>) -> Result<Vec<RecordedEvent>, StoreError> {
    let mut events = Vec::new();
    while let Some(row) = rows.next()? {
        events.push(decode_event(row)?);
    }
    Ok(events)
}

fn decode_event(row: &Row<'_>) -> Result<RecordedEvent, StoreError> {
    let raw_position: i64 = row.get(0)?;
    let position = u64::try_from(raw_position).map_err(|_| StoreError::Corrupt {
        position: 0,
        reason: format!("negative position {raw_position}"),
    })?;
    let corrupt = |reason: String| StoreError::Corrupt { position, reason };
    let id = row
        .get_ref(1)?
        .as_blob()
        .map_err(|err| corrupt(format!("bad event id: {err}")))
        .and_then(|bytes| {
            Uuid::from_slice(bytes).map_err(|err| corrupt(format!("bad event id: {err}")))
        })?;
    let text = |index: usize| string_column(row, index, position);
    let revision: i64 = row.get(3)?;
    let schema_version: i64 = row.get(5)?;
    let received_at = text(7)?;
    Ok(RecordedEvent {
        id,
        stream: text(2)?,
        revision: u64::try_from(revision)
            .map_err(|_| corrupt(format!("negative revision {revision}")))?,
        position,
        event_type: text(4)?,
        schema_version: u32::try_from(schema_version)
            .map_err(|_| corrupt(format!("schema version {schema_version} out of range")))?,
        data: text(6)?,
        metadata: EventMetadata {
            received_at: sql::parse_time(&received_at).map_err(corrupt)?,
            source_id: text(8)?,
            request_id: text(9)?,
            content_hash: text(10)?,
        },
    })
}

/// State of one live subscription. It holds the read pool and the head
/// watch, not the store, so that it does not keep the writer alive: when the
/// store shuts down the watch closes and the subscription ends.
struct Follow {
    readers: Arc<ReadPool>,
    head: watch::Receiver<Position>,
    stopped_cleanly: Arc<AtomicBool>,
    /// The position of the next event to yield.
    next: Position,
    batch: usize,
    poll_interval: Duration,
    buffered: VecDeque<RecordedEvent>,
    writer_stopped: bool,
    done: bool,
}

impl Follow {
    async fn next_item(&mut self) -> Option<Result<RecordedEvent, StoreError>> {
        loop {
            if let Some(event) = self.buffered.pop_front() {
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            // Mark the current head as seen BEFORE reading: a commit that
            // lands after this line (even during the read) changes the value
            // again, so the wait below returns at once and nothing is missed.
            self.head.borrow_and_update();
            let read = ReadAll {
                from: self.next,
                limit: self.batch,
            };
            let events = match read_all(&self.readers, read).await {
                Ok(events) => events,
                // The store was closed under us: end quietly, as documented.
                Err(StoreError::Closed) => {
                    self.done = true;
                    return None;
                }
                Err(err) => {
                    self.done = true;
                    return Some(Err(err));
                }
            };
            if events.is_empty() {
                if self.writer_stopped {
                    // Drained what the last commits wrote; nothing more comes.
                    self.done = true;
                    return if self.stopped_cleanly.load(Ordering::Acquire) {
                        None
                    } else {
                        Some(Err(writer_gone(&self.stopped_cleanly)))
                    };
                }
                match tokio::time::timeout(self.poll_interval, self.head.changed()).await {
                    // Our writer committed, or it is time to look for
                    // another process's appends.
                    Ok(Ok(())) | Err(_) => {}
                    // The writer is gone; read once more for whatever it
                    // committed before going, then end.
                    Ok(Err(_)) => self.writer_stopped = true,
                }
                continue;
            }
            // `read_all` hands over positions from `self.next` without a gap
            // (a hole is its error above), so the next read starts after them.
            self.next += events.len() as u64;
            self.buffered.extend(events);
        }
    }
}

/// The writer thread: owns the only read-write connection.
struct Writer {
    conn: Connection,
    cache: sql::WriterCache,
    path: PathBuf,
    head: watch::Sender<Position>,
    max_batch: usize,
    checkpoint_interval: Duration,
    wal_restart_frames: u32,
    stopped_cleanly: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

struct PendingAppend {
    stream: String,
    expected: ExpectedRevision,
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Result<AppendOutcome, AppendError>>,
}

/// Why one request of a group was not applied.
enum Refusal {
    /// The request was refused; the rest of the group goes on.
    Append(AppendError),
    /// The database failed; the request is answered with it and its
    /// savepoint rolled back.
    Store(StoreError),
}

impl From<rusqlite::Error> for Refusal {
    fn from(err: rusqlite::Error) -> Self {
        Refusal::Store(err.into())
    }
}

impl From<StoreError> for Refusal {
    fn from(err: StoreError) -> Self {
        Refusal::Store(err)
    }
}

impl Writer {
    fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        // WAL checkpoints run on their own thread and connection, so a
        // commit never copies the WAL into the file; the writer only runs
        // the short checkpoint that lets the WAL start over when the
        // checkpointer asks (see `Checkpointer`). Without a checkpointer
        // (it failed to start), the writer checkpoints itself.
        let checkpointer = match Checkpointer::start(
            &self.path,
            self.checkpoint_interval,
            self.wal_restart_frames,
        ) {
            Ok(c) => match self.conn.pragma_update(None, "wal_autocheckpoint", 0) {
                Ok(()) => Some(c),
                Err(err) => {
                    tracing::warn!(error = %err, "event store: keeping checkpoints on the writer");
                    None
                }
            },
            Err(err) => {
                tracing::warn!(error = %err, "event store: no background checkpointer; the writer checkpoints");
                None
            }
        };
        let mut appends = Vec::new();
        let mut checks = Vec::new();
        // `None` once every sender is gone: shutdown, after the queue drained.
        while let Some(first) = requests.blocking_recv() {
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(request) = next {
                match request {
                    Request::Append {
                        stream,
                        expected,
                        events,
                        reply,
                    } => appends.push(PendingAppend {
                        stream,
                        expected,
                        events,
                        reply,
                    }),
                    Request::CheckWritable { reply } => checks.push(reply),
                }
                taken += 1;
                next = if taken < self.max_batch {
                    requests.try_recv().ok()
                } else {
                    None
                };
            }
            if !checks.is_empty() {
                let result = self.check_writable();
                for reply in checks.drain(..) {
                    // The caller may have given up waiting; nothing to do.
                    let _ = reply.send(result.clone());
                }
            }
            if !appends.is_empty() {
                self.commit_group(std::mem::take(&mut appends));
                if let Err(err) = self.cache.after_commit(&self.conn) {
                    tracing::warn!(error = %err, "event store: cannot size the page cache");
                }
            }
            if let Some(c) = &checkpointer
                && c.rewind.swap(false, Ordering::AcqRel)
                && let Err(err) = self
                    .conn
                    .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            {
                tracing::warn!(error = %err, "event store: checkpoint before rewinding the WAL failed");
            }
        }
        drop(checkpointer);
        self.stopped_cleanly.store(true, Ordering::Release);
    }

    fn check_writable(&mut self) -> Result<(), StoreError> {
        let tx = sql::begin_immediate(&mut self.conn)?;
        tx.rollback()?;
        Ok(())
    }

    /// Applies a group in one transaction and answers every request only
    /// after the COMMIT, so no caller hears `Ok` for something not durable.
    fn commit_group(&mut self, group: Vec<PendingAppend>) {
        self.counters.groups.fetch_add(1, Ordering::Relaxed);
        self.counters
            .appends
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        match self.apply_group(&group) {
            Ok((results, head)) => {
                self.head.send_if_modified(|published| {
                    let changed = *published != head;
                    *published = head;
                    changed
                });
                for (request, result) in group.into_iter().zip(results) {
                    let _ = request.reply.send(result);
                }
            }
            Err(err) => {
                tracing::error!(error = %err, requests = group.len(), "event store group commit failed");
                // Even refusals are withdrawn: they may have been decided
                // against events of this group that are now rolled back.
                for request in group {
                    let _ = request.reply.send(Err(AppendError::Store(err.clone())));
                }
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn apply_group(
        &mut self,
        group: &[PendingAppend],
    ) -> Result<(Vec<Result<AppendOutcome, AppendError>>, Position), StoreError> {
        let tx = sql::begin_immediate(&mut self.conn)?;
        // Read inside the write lock rather than trust a cached value: it is
        // one index seek per group and stays right whatever happened before.
        let mut head = read_head(&tx)?;
        let mut results = Vec::with_capacity(group.len());
        let mut statements = Statements::new(&tx)?;
        for request in group {
            // `apply_one` decides its refusals before it writes, then writes
            // one INSERT per event. One event (every webhook delivery) is
            // one statement, which SQLite undoes by itself when it fails,
            // so it needs no savepoint of its own: the SAVEPOINT and RELEASE
            // were a tenth of the writer's instructions per append. Several
            // events take a savepoint, so that a failed INSERT takes the
            // request's earlier rows with it; its statements are cached,
            // since rusqlite's `Savepoint` parses its SQL at every use.
            let savepoint = request.events.len() > 1;
            if savepoint {
                run_cached(&tx, "SAVEPOINT request")?;
            }
            match apply_one(&mut statements, head, request) {
                Ok((outcome, new_head)) => {
                    if savepoint {
                        run_cached(&tx, "RELEASE request")?;
                    }
                    head = new_head;
                    results.push(Ok(outcome));
                }
                Err(refusal) => {
                    // Undoes whatever the request wrote; if even that fails,
                    // or an error ended the transaction (SQLite rolls it
                    // back on some I/O errors), the whole group fails.
                    if savepoint {
                        run_cached(&tx, "ROLLBACK TO request")?;
                        run_cached(&tx, "RELEASE request")?;
                    } else if tx.is_autocommit() {
                        return Err(match refusal {
                            Refusal::Store(err) => err,
                            Refusal::Append(err) => StoreError::Storage(format!(
                                "the group's transaction ended at a refusal: {err}"
                            )),
                        });
                    }
                    results.push(Err(match refusal {
                        Refusal::Append(err) => err,
                        Refusal::Store(err) => {
                            tracing::error!(error = %err, stream = %request.stream, "append failed inside a group");
                            AppendError::Store(err)
                        }
                    }));
                }
            }
        }
        drop(statements);
        tx.commit()?;
        Ok((results, head))
    }
}

/// Copies the WAL into the database file from a connection and thread of
/// its own, every `every` (`PRAGMA wal_checkpoint(PASSIVE)`: it never
/// blocks the writer or readers), fsyncing the file (`synchronous=FULL`).
/// Stopped, and a last full checkpoint run, when dropped.
///
/// A page rewritten by many commits between two passes is copied once, so
/// a longer interval writes fewer bytes: appends dirty a random leaf of the
/// id index and of the stream index each, and at 100 ms those leaves were
/// copied about once per event, at 1 s several events share each copy.
///
/// A checkpoint from another connection never makes the WAL start over
/// while the writer commits back to back (SQLite rewinds only when a writer
/// begins and finds every frame copied): under sustained appends the WAL
/// grew by every page written (3.4 GB after 300k events), each frame going
/// into a new file block that the kernel zeroes first (a fifth of the
/// writer's CPU). So once the WAL holds more than `rewind_above` frames, a
/// pass repeats until it has nearly caught up and then raises `rewind`; the
/// writer, between two groups, checkpoints the few frames written since
/// (no other writer can add any meanwhile), and its next commit rewinds.
struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    handle: Option<JoinHandle<()>>,
    rewind: Arc<AtomicBool>,
}

impl Checkpointer {
    /// Frames left to copy below which a pass counts as caught up.
    const CAUGHT_UP: i64 = 1_024;
    /// Passes per round at most, caught up or not.
    const MAX_PASSES: usize = 4;

    fn start(path: &Path, every: Duration, rewind_above: u32) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let rewind = Arc::new(AtomicBool::new(false));
        let wanted = Arc::clone(&rewind);
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("event-store-checkpointer".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(every)
                {
                    match Self::round(&conn) {
                        Ok(frames) if frames > i64::from(rewind_above) => {
                            wanted.store(true, Ordering::Release);
                        }
                        Ok(_) => {}
                        Err(err) => tracing::warn!(error = %err, "event store checkpoint failed"),
                    }
                }
                if let Err(err) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                {
                    tracing::warn!(error = %err, "event store final checkpoint failed");
                }
            })
            .map_err(|err| StoreError::Storage(format!("cannot start checkpointer: {err}")))?;
        Ok(Self {
            stop,
            handle: Some(handle),
            rewind,
        })
    }

    /// Passive passes until nearly caught up; the WAL's size in frames.
    fn round(conn: &Connection) -> rusqlite::Result<i64> {
        let mut frames = 0;
        for _ in 0..Self::MAX_PASSES {
            let (log, copied): (i64, i64) =
                conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                    Ok((row.get(1)?, row.get(2)?))
                })?;
            frames = log;
            if log - copied < Self::CAUGHT_UP {
                break;
            }
        }
        Ok(frames)
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(handle) = self.handle.take()
            && handle.join().is_err()
        {
            tracing::error!("the event store checkpointer thread panicked");
        }
    }
}

/// The writer's statements (named so that a test can find them in the
/// connection's statement cache).
const SELECT_BY_ID: &str = "SELECT stream, revision, position FROM events WHERE id = ?1";
const SELECT_STREAM_REVISION: &str = "SELECT MAX(revision) FROM events WHERE stream = ?1";
const INSERT_EVENT: &str = "INSERT INTO events (position, id, stream, revision, event_type, \
     schema_version, data, received_at, source_id, request_id, content_hash) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

/// Runs a statement that returns no rows, prepared once per connection.
fn run_cached(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// The statements of an append, taken from the connection's statement
/// cache once per group: `prepare_cached` at every use looked each one up
/// by its SQL text and returned it afterwards, three times per append.
struct Statements<'c> {
    by_id: CachedStatement<'c>,
    stream_revision: CachedStatement<'c>,
    insert: CachedStatement<'c>,
}

impl<'c> Statements<'c> {
    fn new(conn: &'c Connection) -> Result<Self, StoreError> {
        Ok(Self {
            by_id: conn.prepare_cached(SELECT_BY_ID)?,
            stream_revision: conn.prepare_cached(SELECT_STREAM_REVISION)?,
            insert: conn.prepare_cached(INSERT_EVENT)?,
        })
    }
}

/// Applies one append on the group's transaction. Returns the outcome and
/// the head after it.
fn apply_one(
    statements: &mut Statements<'_>,
    head: Position,
    request: &PendingAppend,
) -> Result<(AppendOutcome, Position), Refusal> {
    let stream = request.stream.as_str();
    let mut recorded = Vec::new();
    for event in &request.events {
        let existing = statements
            .by_id
            .query_row([event.id.as_bytes().as_slice()], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            })
            .optional()?;
        let Some((existing_stream, revision, position)) = existing else {
            continue;
        };
        if existing_stream != stream {
            return Err(Refusal::Append(AppendError::IdInOtherStream {
                id: event.id,
                existing_stream,
            }));
        }
        recorded.push(AppendedEvent {
            id: event.id,
            revision: non_negative(revision, position)?,
            position: non_negative(position, position)?,
            duplicate: true,
        });
    }

    let current = stream_revision(&mut statements.stream_revision, stream)?;
    if recorded.len() == request.events.len() {
        // Ids are unique in the log, so the stream holds at least these.
        let next_revision = current.unwrap_or_default();
        return Ok((
            AppendOutcome {
                next_revision,
                events: recorded,
            },
            head,
        ));
    }
    if let Some(first) = recorded.first() {
        return Err(Refusal::Append(AppendError::PartialDuplicate {
            id: first.id,
        }));
    }

    let accepted = match request.expected {
        ExpectedRevision::Any => true,
        ExpectedRevision::NoStream => current.is_none(),
        ExpectedRevision::StreamExists => current.is_some(),
        ExpectedRevision::Exact(revision) => current == Some(revision),
    };
    if !accepted {
        return Err(Refusal::Append(AppendError::Conflict {
            stream: stream.to_owned(),
            expected: request.expected,
            actual: current,
        }));
    }

    let insert = &mut statements.insert;
    let mut appended = Vec::with_capacity(request.events.len());
    let mut position = head;
    let mut revision = current.map_or(0, |r| r + 1);
    for event in &request.events {
        position += 1;
        insert.execute(params![
            sql::to_i64(position, "position")?,
            event.id.as_bytes().as_slice(),
            stream,
            sql::to_i64(revision, "revision")?,
            event.event_type,
            i64::from(event.schema_version),
            event.data,
            sql::format_time(&event.metadata.received_at),
            event.metadata.source_id,
            event.metadata.request_id,
            event.metadata.content_hash,
        ])?;
        appended.push(AppendedEvent {
            id: event.id,
            revision,
            position,
            duplicate: false,
        });
        revision += 1;
    }
    Ok((
        AppendOutcome {
            next_revision: revision - 1,
            events: appended,
        },
        position,
    ))
}

fn stream_revision(
    statement: &mut CachedStatement<'_>,
    stream: &str,
) -> Result<StreamRevision, StoreError> {
    let last: Option<i64> = statement.query_row([stream], |row| row.get(0))?;
    last.map(|r| non_negative(r, 0)).transpose()
}

fn non_negative(value: i64, position: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt {
        position: u64::try_from(position).unwrap_or_default(),
        reason: format!("negative value {value}"),
    })
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod raw_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use chrono::TimeZone as _;

    fn event(i: u64, data: &str) -> NewEvent {
        NewEvent {
            id: Uuid::from_u128(u128::from(i) + 1),
            event_type: "TrailCompleted".into(),
            schema_version: 1,
            data: data.into(),
            metadata: EventMetadata {
                // Whole seconds, milliseconds, microseconds, nanoseconds.
                received_at: chrono::Utc
                    .timestamp_opt(1_700_000_000, [0, 5_000_000, 7_000, 9][i as usize % 4])
                    .unwrap(),
                source_id: "src \"q\"".into(),
                request_id: format!("req-{i}"),
                content_hash: format!("sha256:{i:064x}"),
            },
        }
    }

    fn test_writer(conn: Connection, path: &Path) -> Writer {
        let (head, _) = watch::channel(0);
        Writer {
            cache: sql::WriterCache::new(&conn).unwrap(),
            conn,
            path: path.to_owned(),
            head,
            max_batch: 16,
            checkpoint_interval: Duration::from_secs(1),
            wal_restart_frames: 1_000,
            stopped_cleanly: Arc::default(),
            counters: Arc::default(),
        }
    }

    fn pending(stream: &str, events: Vec<NewEvent>) -> PendingAppend {
        PendingAppend {
            stream: stream.into(),
            expected: ExpectedRevision::Any,
            events,
            reply: oneshot::channel().0,
        }
    }

    /// A writer connection left inside a transaction (by a ROLLBACK that
    /// failed) does not refuse every later group: the next one rolls the
    /// leftover back and commits.
    #[test]
    fn a_group_after_a_transaction_left_open_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.sqlite");
        let conn =
            sql::open_writer(&path, Durability::Full, Duration::from_secs(1), MIGRATIONS).unwrap();
        let mut writer = test_writer(conn, &path);
        writer.conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        let (results, head) = writer
            .apply_group(&[pending("a", vec![event(1, "{}")])])
            .unwrap();
        assert!(results[0].is_ok());
        assert_eq!(head, 1);
        assert!(writer.conn.is_autocommit(), "the group committed");
    }

    /// A request whose INSERT fails inside a group takes back exactly its
    /// own rows and nothing else: a one-event request (written without a
    /// savepoint: SQLite undoes the failed statement) and a two-event one
    /// whose second INSERT fails after the first succeeded (its savepoint).
    /// The group's other requests commit, gap-free.
    #[test]
    fn a_failed_insert_in_a_group_takes_back_only_its_own_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.sqlite");
        let conn =
            sql::open_writer(&path, Durability::Full, Duration::from_secs(1), MIGRATIONS).unwrap();
        // Fails an INSERT that `apply_one`'s checks let through.
        conn.execute_batch(
            "CREATE TEMP TRIGGER poison BEFORE INSERT ON main.events \
             WHEN NEW.request_id = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned'); END;",
        )
        .unwrap();
        let mut writer = test_writer(conn, &path);
        let poisoned = |i: u64| {
            let mut e = event(i, "{}");
            e.metadata.request_id = "poison".into();
            e
        };
        let group = [
            pending("a", vec![event(1, "{}")]),
            pending("p", vec![poisoned(2)]),
            pending("m", vec![event(3, "{}"), poisoned(4)]),
            pending("b", vec![event(5, "{}")]),
        ];
        let (results, head) = writer.apply_group(&group).unwrap();
        assert_eq!(head, 2);
        let accepted: Vec<bool> = results.iter().map(Result::is_ok).collect();
        assert_eq!(accepted, [true, false, false, true]);
        assert!(writer.conn.is_autocommit(), "the group committed");
        let stored: Vec<(i64, String, String)> = writer
            .conn
            .prepare("SELECT position, stream, request_id FROM events ORDER BY position")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            stored,
            [
                (1, "a".to_owned(), "req-1".to_owned()),
                (2, "b".to_owned(), "req-5".to_owned()),
            ]
        );
    }

    /// The raw read holds exactly what `read_all` decodes, whichever the
    /// chunk boundaries.
    #[tokio::test]
    async fn raw_reads_equal_decoded_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteEventStore::open(dir.path().join("events.sqlite")).unwrap();
        for i in 0..10u64 {
            let data = format!("{{\"n\": {i},\n \"name\": \"Jo\u{e3}o \\\" \u{1F600}\"}}");
            store
                .append(
                    &format!("learner-1-{}", i % 3),
                    ExpectedRevision::Any,
                    vec![event(i, &data)],
                )
                .await
                .unwrap();
        }
        let decoded = store
            .read_all(ReadAll {
                from: 0,
                limit: 100,
            })
            .await
            .unwrap();
        let mut expected = RawEvents::default();
        for e in &decoded {
            expected.push_recorded(e);
        }
        let mut buf = RawEvents::default();
        let mut got = RawEvents::default();
        let mut from = 0;
        loop {
            buf = store
                .read_all_raw(ReadAll { from, limit: 3 }, buf)
                .await
                .unwrap();
            if buf.is_empty() {
                break;
            }
            for e in buf.iter() {
                got.push(&e);
            }
            from = buf.last_position().unwrap() + 1;
        }
        assert_eq!(got.len(), 10);
        assert_eq!(got, expected);
        let third = got.get(2).unwrap();
        assert_eq!(third.position, 3);
        assert_eq!(third.stream, b"learner-1-2");
        assert_eq!(third.received_at, b"2023-11-14T22:13:20.000007000Z");
        assert_eq!(third.data, decoded[2].data.as_bytes());
        assert!(got.get(10).is_none());
        let empty = store
            .read_all_raw(ReadAll { from: 11, limit: 3 }, buf)
            .await
            .unwrap();
        assert!(empty.is_empty());
    }
}

#[cfg(test)]
mod writer_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The writer's statements are compiled once, not again at every
    /// append: without the query planner stability guarantee SQLite
    /// re-prepared one of them whenever its bound values changed (once per
    /// append: a third of the instructions of the `append_throughput`
    /// example).
    #[test]
    fn appends_reuse_their_compiled_statements() {
        let dir = tempfile::tempdir().unwrap();
        let conn = sql::open_writer(
            &dir.path().join("events.sqlite"),
            Durability::Full,
            Duration::from_secs(1),
            MIGRATIONS,
        )
        .unwrap();
        let mut head = 0;
        let mut statements = Statements::new(&conn).unwrap();
        for n in 0..20u64 {
            let (reply, _answer) = oneshot::channel();
            let request = PendingAppend {
                stream: format!("learner-{}-{n}", n % 3),
                expected: ExpectedRevision::Any,
                events: vec![crate::contract::event(n, "{}")],
                reply,
            };
            let Ok((_, new_head)) = apply_one(&mut statements, head, &request) else {
                panic!("append {n} refused");
            };
            head = new_head;
        }
        drop(statements);
        assert_eq!(head, 20);
        for sql in [SELECT_BY_ID, SELECT_STREAM_REVISION, INSERT_EVENT] {
            let stmt = conn.prepare_cached(sql).unwrap();
            // The cached statement is the one the appends ran.
            let runs = stmt.get_status(rusqlite::StatementStatus::Run);
            assert!(runs >= 20, "ran {runs} times: {sql}");
            let reprepared = stmt.get_status(rusqlite::StatementStatus::RePrepare);
            assert_eq!(reprepared, 0, "re-prepared {reprepared} times: {sql}");
        }
    }
}
