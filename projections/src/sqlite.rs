//! The embedded read store: two SQLite files per generation, one per
//! projection (`readmodels/<generation>.institutions.sqlite`,
//! `readmodels/<generation>.learners.sqlite`), and
//! `readmodels/control.sqlite`, which names the current generation.
//!
//! SQLite has one writer per file: with a file each, the two projections
//! write at the same time, each on its own connection, instead of taking
//! turns on one. Each file holds its projection's rows with the checkpoints,
//! leases and dead letters that must commit with them.
//!
//! Ids are the source's `u64`s stored in SQLite's signed 64-bit integers bit
//! for bit (`as i64`): every id round-trips exactly; ids above 2^63-1, which
//! no real platform issues, would sort before small ones.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::types::ToSqlOutput;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use rustc_hash::FxHashSet;
use tracker_store::Position;

use crate::fold::Membership;
use crate::model::Completion;
use crate::plan::{MembershipKeys, Plan, ProjectionKind, membership_keys, plan, sorted};
use crate::readstore::{
    ApplyBatch, CheckpointKey, DeadLetter, FinalLoad, LeaseHolder, ReadStore, ReadStoreError,
    Snapshot, lease_ms,
};

const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Page cache of a live projector's connection, in KiB.
const LIVE_CACHE_KIB: i64 = 131_072;
/// WAL pages (4 KiB each: 256 MiB) past which a live projector's commit
/// checkpoints the WAL itself, so that it can start over. Four times the
/// event log's [`tracker_store::WAL_RESTART_FRAMES`]: a projector's batch
/// rewrites pages all over its file, and the larger the WAL between two
/// restarts, the more of those rewrites reach the file as one copy.
pub const LIVE_WAL_FRAMES: u32 = 65_536;

/// What each projection's file has besides its own tables: the checkpoints,
/// leases and dead letters written in the same transactions as its rows.
const COMMON_SCHEMA: &str = r#"
CREATE TABLE checkpoints (
    key      TEXT PRIMARY KEY,
    position INTEGER NOT NULL
);
CREATE TABLE dead_letters (
    projection  TEXT    NOT NULL,
    position    INTEGER NOT NULL,
    event_id    TEXT    NOT NULL,
    event_type  TEXT    NOT NULL,
    error       TEXT    NOT NULL,
    recorded_at TEXT    NOT NULL,
    PRIMARY KEY (projection, position)
);
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
);
"#;

const INSTITUTIONS_SCHEMA: &str = r#"
-- institutions projection
CREATE TABLE inst_summary (
    institution_id     INTEGER PRIMARY KEY,
    completions        INTEGER NOT NULL,
    learners           INTEGER NOT NULL,
    trails             INTEGER NOT NULL,
    courses            INTEGER NOT NULL,
    first_completed_at TEXT    NOT NULL,
    last_completed_at  TEXT    NOT NULL,
    last_position      INTEGER NOT NULL
);
CREATE TABLE inst_trails (
    institution_id     INTEGER NOT NULL,
    trail_id           INTEGER NOT NULL,
    name               TEXT    NOT NULL,
    name_position      INTEGER NOT NULL,
    completions        INTEGER NOT NULL,
    learners           INTEGER NOT NULL,
    first_completed_at TEXT    NOT NULL,
    last_completed_at  TEXT    NOT NULL,
    PRIMARY KEY (institution_id, trail_id)
) WITHOUT ROWID;
CREATE TABLE inst_courses (
    institution_id INTEGER NOT NULL,
    course_id      INTEGER NOT NULL,
    title          TEXT    NOT NULL,
    title_position INTEGER NOT NULL,
    completions    INTEGER NOT NULL,
    learners       INTEGER NOT NULL,
    PRIMARY KEY (institution_id, course_id)
) WITHOUT ROWID;
CREATE TABLE inst_trail_courses (
    institution_id INTEGER NOT NULL,
    trail_id       INTEGER NOT NULL,
    course_id      INTEGER NOT NULL,
    PRIMARY KEY (institution_id, trail_id, course_id)
) WITHOUT ROWID;
CREATE INDEX inst_trail_courses_by_course ON inst_trail_courses (institution_id, course_id, trail_id);
CREATE TABLE inst_daily (
    institution_id INTEGER NOT NULL,
    day            TEXT    NOT NULL,
    completions    INTEGER NOT NULL,
    learners       INTEGER NOT NULL,
    PRIMARY KEY (institution_id, day)
) WITHOUT ROWID;
CREATE TABLE inst_m_learners (institution_id INTEGER NOT NULL, user_id INTEGER NOT NULL,
    PRIMARY KEY (institution_id, user_id)) WITHOUT ROWID;
CREATE TABLE inst_m_trails (institution_id INTEGER NOT NULL, trail_id INTEGER NOT NULL,
    PRIMARY KEY (institution_id, trail_id)) WITHOUT ROWID;
CREATE TABLE inst_m_courses (institution_id INTEGER NOT NULL, course_id INTEGER NOT NULL,
    PRIMARY KEY (institution_id, course_id)) WITHOUT ROWID;
CREATE TABLE inst_m_trail_learners (institution_id INTEGER NOT NULL, trail_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL, PRIMARY KEY (institution_id, trail_id, user_id)) WITHOUT ROWID;
CREATE TABLE inst_m_course_learners (institution_id INTEGER NOT NULL, course_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL, PRIMARY KEY (institution_id, course_id, user_id)) WITHOUT ROWID;
CREATE TABLE inst_m_day_learners (institution_id INTEGER NOT NULL, day TEXT NOT NULL,
    user_id INTEGER NOT NULL, PRIMARY KEY (institution_id, day, user_id)) WITHOUT ROWID;
-- The query API: every sort of every list is an index range (keyset pages).
CREATE INDEX inst_trails_by_name ON inst_trails (institution_id, name, trail_id);
CREATE INDEX inst_trails_by_completions ON inst_trails (institution_id, completions, trail_id);
CREATE INDEX inst_courses_by_title ON inst_courses (institution_id, title, course_id);
CREATE INDEX inst_courses_by_completions ON inst_courses (institution_id, completions, course_id);
"#;

const LEARNERS_SCHEMA: &str = r#"
-- learners projection
CREATE TABLE lrn_learners (
    institution_id     INTEGER NOT NULL,
    user_id            INTEGER NOT NULL,
    name               TEXT    NOT NULL,
    email              TEXT    NOT NULL,
    profile_position   INTEGER NOT NULL,
    trails             INTEGER NOT NULL,
    completions        INTEGER NOT NULL,
    first_completed_at TEXT    NOT NULL,
    last_completed_at  TEXT    NOT NULL,
    PRIMARY KEY (institution_id, user_id)
) WITHOUT ROWID;
CREATE TABLE lrn_learner_trails (
    institution_id     INTEGER NOT NULL,
    user_id            INTEGER NOT NULL,
    trail_id           INTEGER NOT NULL,
    completions        INTEGER NOT NULL,
    first_completed_at TEXT    NOT NULL,
    last_completed_at  TEXT    NOT NULL,
    PRIMARY KEY (institution_id, user_id, trail_id)
) WITHOUT ROWID;
CREATE INDEX lrn_learner_trails_by_trail ON lrn_learner_trails (institution_id, trail_id, user_id);
-- `event_id` has no unique index: the event log records an id once (the
-- embedded log's unique index; on EventStoreDB, within its stream, and a
-- completion's id is derived from its institution, learner, trail and
-- finish time, its stream from the institution and learner), the
-- projections read it in position order, and the index cost a random-key
-- insert per completion.
CREATE TABLE lrn_completions (
    position        INTEGER PRIMARY KEY,
    event_id        TEXT    NOT NULL,
    institution_id  INTEGER NOT NULL,
    user_id         INTEGER NOT NULL,
    trail_id        INTEGER NOT NULL,
    trail_name      TEXT    NOT NULL,
    finished_at_raw TEXT    NOT NULL,
    finished_at     TEXT    NOT NULL,
    day             TEXT    NOT NULL,
    courses         TEXT    NOT NULL
);
CREATE INDEX lrn_completions_by_time ON lrn_completions (institution_id, finished_at, position);
CREATE INDEX lrn_completions_by_user ON lrn_completions (institution_id, user_id, position);
CREATE INDEX lrn_completions_by_trail ON lrn_completions (institution_id, trail_id, position);
CREATE TABLE lrn_m_trail_learners (institution_id INTEGER NOT NULL, trail_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL, PRIMARY KEY (institution_id, trail_id, user_id)) WITHOUT ROWID;
-- The query API: every sort of every list is an index range (keyset pages).
CREATE INDEX lrn_learners_by_name ON lrn_learners (institution_id, name, user_id);
CREATE INDEX lrn_learners_by_completions ON lrn_learners (institution_id, completions, user_id);
CREATE INDEX lrn_completions_by_institution ON lrn_completions (institution_id, position);
CREATE INDEX lrn_completions_by_user_time ON lrn_completions (institution_id, user_id, finished_at, position);
CREATE INDEX lrn_completions_by_trail_time ON lrn_completions (institution_id, trail_id, finished_at, position);
"#;

/// The first and last positions of each institution's completions per UTC
/// day (days since the Unix epoch): where in log order a time window's
/// completions are, so a page of a window in position order scans that
/// range of the institution's completions instead of sorting the whole
/// window. Written with the completions, in the same transaction; a file
/// from before is filled from its completions here. `unixepoch()` reads no
/// year outside 0-9999, and a stored instant is outside them only when a
/// four-digit local wall time was shifted by the source zone past either
/// end: then it is on 10000-01-01 (day 2932897) or -0001-12-31 (day
/// -719529).
const LEARNERS_COMPLETION_DAYS: &str = r#"
CREATE TABLE lrn_completion_days (
    institution_id INTEGER NOT NULL,
    day            INTEGER NOT NULL,
    first_position INTEGER NOT NULL,
    last_position  INTEGER NOT NULL,
    PRIMARY KEY (institution_id, day)
) WITHOUT ROWID;
INSERT INTO lrn_completion_days
SELECT institution_id,
       CASE WHEN s IS NOT NULL THEN (s - ((s % 86400) + 86400) % 86400) / 86400
            WHEN finished_at LIKE '+%' THEN 2932897
            ELSE -719529 END,
       MIN(position), MAX(position)
FROM (SELECT institution_id, finished_at, unixepoch(finished_at) AS s, position
      FROM lrn_completions)
GROUP BY 1, 2;
"#;

/// `lrn_m_trail_learners` held the keys of `lrn_learner_trails_by_trail`:
/// a learner's trail is new exactly when its `lrn_learner_trails` row is,
/// so the live projector looks that row up instead (see `insert_new_keys`).
/// The table cost ~6% of the pages a live batch wrote to this file.
const LEARNERS_NO_TRAIL_KEYS: &str = "DROP TABLE lrn_m_trail_learners;";

/// A learner's completions by time were the sixth index on
/// `lrn_completions`, on a random key: a tenth of the bytes a live batch
/// wrote. A learner has few completions; the queries read them from
/// `lrn_completions_by_user` and filter or sort them (`completions_sql`).
const LEARNERS_NO_USER_TIME_INDEX: &str = "DROP INDEX lrn_completions_by_user_time;";

/// Schema of a projection's file; `PRAGMA user_version` counts what is
/// applied.
fn migrations(kind: ProjectionKind) -> &'static [&'static str] {
    match kind {
        ProjectionKind::Institutions => &[COMMON_SCHEMA, INSTITUTIONS_SCHEMA],
        ProjectionKind::Learners => &[
            COMMON_SCHEMA,
            LEARNERS_SCHEMA,
            LEARNERS_COMPLETION_DAYS,
            LEARNERS_NO_TRAIL_KEYS,
            LEARNERS_NO_USER_TIME_INDEX,
        ],
    }
}

/// [`LEARNERS_COMPLETION_DAYS`]'s day of an instant.
pub(crate) fn utc_day(t: DateTime<Utc>) -> i64 {
    t.timestamp().div_euclid(86_400)
}

const CONTROL_MIGRATIONS: &[&str] = &[r#"
CREATE TABLE generations (
    name       TEXT PRIMARY KEY,
    number     INTEGER NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE current_generation (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL REFERENCES generations (name)
);
"#];

/// The read-model tables in a snapshot, with their sort keys and the
/// projection that writes them.
pub(crate) const SNAPSHOT_TABLES: &[(&str, &str, ProjectionKind)] = &[
    (
        "inst_summary",
        "institution_id",
        ProjectionKind::Institutions,
    ),
    (
        "inst_trails",
        "institution_id, trail_id",
        ProjectionKind::Institutions,
    ),
    (
        "inst_courses",
        "institution_id, course_id",
        ProjectionKind::Institutions,
    ),
    (
        "inst_trail_courses",
        "institution_id, trail_id, course_id",
        ProjectionKind::Institutions,
    ),
    (
        "inst_daily",
        "institution_id, day",
        ProjectionKind::Institutions,
    ),
    (
        "lrn_learners",
        "institution_id, user_id",
        ProjectionKind::Learners,
    ),
    (
        "lrn_learner_trails",
        "institution_id, user_id, trail_id",
        ProjectionKind::Learners,
    ),
    ("lrn_completions", "position", ProjectionKind::Learners),
];

fn storage(e: impl std::fmt::Display) -> ReadStoreError {
    ReadStoreError::Storage(e.to_string())
}

/// The source's ids, bit for bit, in SQLite's integers.
pub fn sql_id(id: u64) -> i64 {
    id as i64
}

pub fn from_sql_id(id: i64) -> u64 {
    id as u64
}

pub fn sql_time(t: DateTime<Utc>) -> String {
    let mut buf = [0; 20];
    match tracker_domain::rfc3339::write_instant(t, &mut buf) {
        Some(text) => text.to_owned(),
        None => t.to_rfc3339_opts(SecondsFormat::Secs, true),
    }
}

pub(crate) fn sql_position(p: Position) -> Result<i64, ReadStoreError> {
    i64::try_from(p).map_err(|_| storage(format!("position {p} out of range")))
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn open(path: &Path, migrations: &[&str]) -> Result<Connection, ReadStoreError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| storage(format!("creating {}: {e}", parent.display())))?;
    }
    let mut conn =
        Connection::open(path).map_err(|e| storage(format!("opening {}: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(storage)?;
    tracker_store::enable_wal(&conn, BUSY_TIMEOUT)
        .map_err(|e| storage(format!("{}: {e}", path.display())))?;
    // Read models can be rebuilt from the event log; NORMAL still never
    // corrupts, it may only lose the last commits on power loss, which the
    // checkpoint (in the same transaction) then replays.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(storage)?;
    conn.set_prepared_statement_cache_capacity(64);
    // Several processes may open the same files at once (`serve` and
    // `project` starting together): read the version and migrate under the
    // write lock, so exactly one of them migrates.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(storage)?;
    let applied: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(storage)?;
    let applied = usize::try_from(applied).unwrap_or(usize::MAX);
    if applied > migrations.len() {
        return Err(ReadStoreError::Schema(format!(
            "{} has schema version {applied}, newer than this build knows ({})",
            path.display(),
            migrations.len()
        )));
    }
    for sql in migrations.iter().skip(applied) {
        tx.execute_batch(sql).map_err(storage)?;
    }
    tx.pragma_update(None, "user_version", migrations.len() as i64)
        .map_err(storage)?;
    tx.commit().map_err(storage)?;
    Ok(conn)
}

/// Index of a projection's file in [`Files::writers`].
fn slot(kind: ProjectionKind) -> usize {
    match kind {
        ProjectionKind::Institutions => 0,
        ProjectionKind::Learners => 1,
    }
}

/// How much below the process's CPU priority a writer thread runs (a nice
/// value, added to the process's, at most 19).
const WRITER_NICENESS: i32 = 10;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A projection file's connection, owned by a thread of its own that runs
/// the jobs sent to it one at a time. A live generation's writer runs at a
/// lower CPU priority than the rest of the process ([`WRITER_NICENESS`];
/// a rebuild's does not, its own fold is all it competes with): in `serve`
/// the projector shares the cores with the receiver, whose answers are
/// waited for, while read models only have to follow. With both
/// projections applying at once, the receiver's median latency at 6,000
/// webhooks/s went from 9 to 21-25 ms without this, and to 5-7 ms with it,
/// the projection lag unchanged. When the last handle to it is dropped,
/// the thread runs the jobs already sent, closes the connection (which
/// empties the WAL if it was the file's last) and is joined, so a store
/// dropped at shutdown leaves its files closed. A job that panics fails
/// only its own call.
#[derive(Clone)]
struct Writer {
    thread: Arc<WriterThread>,
}

struct WriterThread {
    /// `None` once dropping: closes the queue.
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(handle) = self.handle.take()
            && handle.thread().id() != std::thread::current().id()
        {
            let _ = handle.join();
        }
    }
}

impl Writer {
    fn start(name: String, mut conn: Connection, lower: bool) -> Result<Self, ReadStoreError> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                if lower {
                    lower_this_threads_priority();
                }
                while let Ok(job) = queue.recv() {
                    // A panic unwinds out of the job (an open transaction
                    // rolls back as it drops) and fails that call only.
                    let ran =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut conn)));
                    if ran.is_err() {
                        tracing::error!("a read store job panicked; the writer goes on");
                    }
                }
            })
            .map_err(|e| storage(format!("cannot start a read store writer: {e}")))?;
        Ok(Self {
            thread: Arc::new(WriterThread {
                jobs: Some(jobs),
                handle: Some(handle),
            }),
        })
    }

    async fn run<T, F>(&self, generation: String, f: F) -> Result<T, ReadStoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &str) -> Result<T, ReadStoreError> + Send + 'static,
    {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = done.send(f(conn, &generation));
        });
        let stopped = || storage("the read store writer thread stopped");
        let jobs = self.thread.jobs.as_ref().ok_or_else(stopped)?;
        jobs.send(job).map_err(|_| stopped())?;
        result
            .await
            .map_err(|_| storage("a read store job failed without an answer (it panicked)"))?
    }
}

/// Lowers the calling thread's CPU priority by [`WRITER_NICENESS`] (Linux:
/// the nice value is per thread). Failing to only means it keeps the
/// process's priority.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getpriority_process, setpriority_process};
        let this = Some(rustix::thread::gettid());
        let lowered = getpriority_process(this)
            .map(|nice| (nice + WRITER_NICENESS).min(19))
            .and_then(|nice| setpriority_process(this, nice));
        if let Err(e) = lowered {
            tracing::debug!(error = %e, "read store writer keeps the process's CPU priority");
        }
    }
}

/// A generation's files, each with its own connection and writer thread: a
/// batch of one projection never waits for the other's.
struct Files {
    generation: String,
    writers: [Writer; 2],
}

impl Files {
    /// `live`: the writers of a generation that follows the current
    /// pointer, at a lower CPU priority.
    fn open(
        generation: String,
        live: bool,
        mut open: impl FnMut(ProjectionKind) -> Result<Connection, ReadStoreError>,
    ) -> Result<Self, ReadStoreError> {
        let [institutions, learners] = ProjectionKind::ALL;
        let writer = |kind: ProjectionKind, conn| {
            Writer::start(format!("read-store-{}", kind.name()), conn, live)
        };
        Ok(Self {
            writers: [
                writer(institutions, open(institutions)?)?,
                writer(learners, open(learners)?)?,
            ],
            generation,
        })
    }
}

/// The embedded read store. Cheap to clone.
#[derive(Clone)]
pub struct SqliteReadStore {
    dir: PathBuf,
    files: Arc<Mutex<Files>>,
    control: Arc<Mutex<Connection>>,
    /// A handle that follows the current pointer (live projector, queries);
    /// a rebuild's handle stays on its own generation.
    follows_current: bool,
    /// Checkpoints the current generation in the background; `None` when it
    /// could not start (the projector's commits then checkpoint, as
    /// SQLite does by default) and for a generation being built.
    checkpointer: Option<Arc<Checkpointer>>,
}

/// Copies the current generation's WALs into their files every second from
/// a thread and connections of its own (`PRAGMA wal_checkpoint(PASSIVE)`:
/// it never waits for the projector or the readers), so that a projector's
/// commit never stops to run a checkpoint. It follows the current pointer
/// in `control.sqlite`, so a rebuild's switch moves it too. Stopped when
/// the last handle is dropped.
struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// A page rewritten by several batches within this time is copied
    /// into the file once: at 100 ms a live projector in 512-event batches
    /// wrote 136 KB per event, at one second (with [`LIVE_WAL_FRAMES`])
    /// 79 KB. Nothing waits for it: readers read the WAL, and a commit in
    /// the WAL survives a crash of the process. On power loss the read
    /// models' `synchronous = NORMAL` may lose the last commits, rows and
    /// checkpoint together, which the projector then applies again.
    const EVERY: Duration = Duration::from_secs(1);

    fn start(dir: &Path) -> Result<Self, ReadStoreError> {
        let control = Connection::open(dir.join("control.sqlite")).map_err(storage)?;
        control.busy_timeout(BUSY_TIMEOUT).map_err(storage)?;
        let dir = dir.to_path_buf();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("read-store-checkpointer".into())
            .spawn(move || {
                let mut target: Option<(String, Vec<Connection>)> = None;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(Self::EVERY)
                {
                    if let Err(e) = Self::checkpoint(&control, &dir, &mut target) {
                        tracing::warn!(error = %e, "read store checkpoint failed");
                        target = None;
                    }
                }
            })
            .map_err(|e| storage(format!("cannot start the read store checkpointer: {e}")))?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    fn checkpoint(
        control: &Connection,
        dir: &Path,
        target: &mut Option<(String, Vec<Connection>)>,
    ) -> Result<(), ReadStoreError> {
        let Some(current) = current_generation(control)? else {
            return Ok(());
        };
        if target.as_ref().is_none_or(|(name, _)| *name != current) {
            let conns = ProjectionKind::ALL
                .into_iter()
                .map(|kind| {
                    let conn =
                        Connection::open(projection_path(dir, &current, kind)).map_err(storage)?;
                    conn.busy_timeout(BUSY_TIMEOUT).map_err(storage)?;
                    Ok(conn)
                })
                .collect::<Result<_, ReadStoreError>>()?;
            *target = Some((current, conns));
        }
        if let Some((_, conns)) = target {
            for conn in conns {
                conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    .map_err(storage)?;
            }
        }
        Ok(())
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Opens a projection's file for a handle that follows the current pointer:
/// with a background checkpointer its commits leave checkpoints to it, but
/// for one past [`LIVE_WAL_FRAMES`] pages of WAL, which
/// lets the WAL start over (a checkpoint from another connection never does
/// while the projector commits back to back, and the WAL would grow for the
/// whole of a catch-up).
fn open_live(
    dir: &Path,
    generation: &str,
    kind: ProjectionKind,
    checkpointer: bool,
) -> Result<Connection, ReadStoreError> {
    let conn = open(&projection_path(dir, generation, kind), migrations(kind))?;
    // A projector's batch reads and updates rows all over the read models
    // (membership keys, counters, their sort indexes); with SQLite's 2 MiB
    // default most of those pages came from the kernel on every batch
    // (`pread` copies were a fifth of a catching-up projector's profile).
    conn.pragma_update(None, "cache_size", -LIVE_CACHE_KIB)
        .map_err(storage)?;
    // A statement that writes many rows (a hundred completions or
    // membership keys) keeps a copy of each page it changes, to undo itself
    // alone if it fails. SQLite spills that copy to a temporary file past
    // 64 KiB, which such statements always pass: a `pwrite` and a kernel
    // page per page changed. Keep it in memory: it is freed at the end of
    // each statement. Not for a rebuild's files (`open_building`), whose
    // `seal` would then sort every index in memory instead of in runs
    // merged from temporary files (the tenth day in the bench's history).
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(storage)?;
    if checkpointer {
        conn.pragma_update(None, "wal_autocheckpoint", LIVE_WAL_FRAMES)
            .map_err(storage)?;
    }
    Ok(conn)
}

/// Opens a projection's file of a generation being built: nobody reads it
/// until `seal` and the switch, and a crash before then only abandons it, so
/// it is written without a journal or waiting for the disk, with a large
/// page cache, and without the secondary (read-side) indexes, which are
/// built once at `seal` from sorted data instead of updated row by row.
fn open_building(
    dir: &Path,
    generation: &str,
    kind: ProjectionKind,
) -> Result<Connection, ReadStoreError> {
    let path = projection_path(dir, generation, kind);
    // A leftover file of an abandoned rebuild with the same name would hold
    // stale rows: start empty.
    remove_database(&path);
    let conn = open(&path, migrations(kind))?;
    conn.pragma_update(None, "journal_mode", "OFF")
        .map_err(storage)?;
    conn.pragma_update(None, "synchronous", "OFF")
        .map_err(storage)?;
    conn.pragma_update(None, "cache_size", -262_144)
        .map_err(storage)?;
    // `seal` sorts every read index: let SQLite's sorter use a second core.
    conn.pragma_update(None, "threads", 2).map_err(storage)?;
    defer_secondary_indexes(&conn)?;
    Ok(conn)
}

/// The page cache (`PRAGMA cache_size`, negative: KiB) while `seal` builds
/// the read indexes: SQLite's default.
const SORT_CACHE_KIB: i64 = -2_048;

/// Builds a file's read indexes, returns it to WAL and full durability,
/// and flushes it.
fn seal_file(conn: &Connection, path: &Path) -> Result<(), ReadStoreError> {
    // SQLite's sorter keeps as many keys in memory as the page cache holds.
    // With the build's 256 MiB cache it sorts a 1M-row index in one block,
    // walking memory far larger than the CPU's caches; with a small cache it
    // sorts runs that fit them and merges those (spilled to temporary
    // files), on the second core too (`PRAGMA threads`). Measured with the
    // `sqlite3` shell on a learners file of 1M completions, its 9 read
    // indexes: 7.9-8.3 s with 256 MiB, 3.8-4.4 s with 1-2 MiB.
    let build_cache: i64 = conn
        .query_row("PRAGMA cache_size", [], |r| r.get(0))
        .map_err(storage)?;
    conn.pragma_update(None, "cache_size", SORT_CACHE_KIB)
        .map_err(storage)?;
    restore_deferred_indexes(conn)?;
    conn.pragma_update(None, "cache_size", build_cache)
        .map_err(storage)?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
        .map_err(storage)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(storage)?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .map_err(storage)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(storage)?;
    // Everything above was written without a journal or a sync, and a
    // checkpoint of an empty WAL syncs nothing: flush the file before the
    // pointer can name it.
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| storage(format!("syncing {}: {e}", path.display())))
}

impl std::fmt::Debug for SqliteReadStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteReadStore")
            .field("dir", &self.dir)
            .field("follows_current", &self.follows_current)
            .finish_non_exhaustive()
    }
}

impl SqliteReadStore {
    /// Opens the read store in `dir` (creating it, and a first generation,
    /// if needed), on the current generation.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ReadStoreError> {
        let dir = dir.as_ref().to_path_buf();
        let mut control = open(&dir.join("control.sqlite"), CONTROL_MIGRATIONS)?;
        // Under the write lock, so two processes opening a new directory
        // agree on one first generation.
        let tx = control
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(storage)?;
        let generation = match current_generation(&tx)? {
            Some(g) => g,
            None => {
                let g = new_generation_name(&tx)?;
                tx.execute(
                    "INSERT INTO current_generation (id, name) VALUES (1, ?1)",
                    [&g],
                )
                .map_err(storage)?;
                g
            }
        };
        tx.commit().map_err(storage)?;
        if generation_path(&dir, &generation).exists() {
            tracing::warn!(
                %generation,
                "read models of an older layout (one file for both projections): \
                 the projections start over in one file each; `tracker replay` rebuilds them faster"
            );
        }
        let checkpointer = match Checkpointer::start(&dir) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::warn!(error = %e, "read store: no background checkpointer; commits checkpoint");
                None
            }
        };
        let files = Files::open(generation.clone(), true, |kind| {
            open_live(&dir, &generation, kind, checkpointer.is_some())
        })?;
        Ok(Self {
            dir,
            files: Arc::new(Mutex::new(files)),
            control: Arc::new(Mutex::new(control)),
            follows_current: true,
            checkpointer,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bulk loads bypass the checkpoint: only into a generation being built.
    fn building(&self) -> Result<(), ReadStoreError> {
        if self.follows_current {
            return Err(storage(
                "bulk loads go only into a generation being built (create_generation)",
            ));
        }
        Ok(())
    }

    /// Runs `f` on the connection of `kind`'s file of this handle's
    /// generation, on that file's writer thread. The two files' writers are
    /// independent: `f` waits only for its own file's jobs.
    pub async fn with_conn<T, F>(&self, kind: ProjectionKind, f: F) -> Result<T, ReadStoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &str) -> Result<T, ReadStoreError> + Send + 'static,
    {
        let (generation, writer) = {
            let files = lock(&self.files)?;
            (files.generation.clone(), files.writers[slot(kind)].clone())
        };
        writer.run(generation, f).await
    }

    /// `f` on each projection's file in turn, results in
    /// [`ProjectionKind::ALL`] order.
    async fn with_each<T, F>(&self, f: F) -> Result<Vec<T>, ReadStoreError>
    where
        T: Send + 'static,
        F: Fn(&mut Connection) -> Result<T, ReadStoreError> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        let mut out = Vec::with_capacity(ProjectionKind::ALL.len());
        for kind in ProjectionKind::ALL {
            let f = Arc::clone(&f);
            out.push(self.with_conn(kind, move |conn, _| f(conn)).await?);
        }
        Ok(out)
    }

    async fn with_control<T, F>(&self, f: F) -> Result<T, ReadStoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, ReadStoreError> + Send + 'static,
    {
        let control = Arc::clone(&self.control);
        tokio::task::spawn_blocking(move || {
            let mut guard = control
                .lock()
                .map_err(|_| storage("control connection lock poisoned"))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| storage(format!("read store task failed: {e}")))?
    }
}

fn lock(files: &Mutex<Files>) -> Result<MutexGuard<'_, Files>, ReadStoreError> {
    files
        .lock()
        .map_err(|_| storage("read store connection lock poisoned"))
}

/// Drops the explicit `CREATE INDEX` indexes (not the primary keys and
/// unique constraints the writes rely on), remembering their SQL in the file.
fn defer_secondary_indexes(conn: &Connection) -> Result<(), ReadStoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS deferred_indexes (name TEXT PRIMARY KEY, sql TEXT NOT NULL);
         INSERT OR IGNORE INTO deferred_indexes
           SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL;",
    )
    .map_err(storage)?;
    let names: Vec<String> = conn
        .prepare("SELECT name FROM deferred_indexes")
        .map_err(storage)?
        .query_map([], |r| r.get(0))
        .map_err(storage)?
        .collect::<Result<_, _>>()
        .map_err(storage)?;
    for name in names {
        conn.execute_batch(&format!("DROP INDEX IF EXISTS \"{name}\""))
            .map_err(storage)?;
    }
    Ok(())
}

/// Builds the indexes `defer_secondary_indexes` dropped.
fn restore_deferred_indexes(conn: &Connection) -> Result<(), ReadStoreError> {
    let has_table: bool = conn
        .query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'deferred_indexes'",
            [],
            |r| r.get(0),
        )
        .map_err(storage)?;
    if !has_table {
        return Ok(());
    }
    let ddl: Vec<String> = conn
        .prepare("SELECT sql FROM deferred_indexes ORDER BY name")
        .map_err(storage)?
        .query_map([], |r| r.get(0))
        .map_err(storage)?
        .collect::<Result<_, _>>()
        .map_err(storage)?;
    let mut batch = String::from("BEGIN;");
    for sql in ddl {
        batch.push_str(&sql.replacen("CREATE INDEX", "CREATE INDEX IF NOT EXISTS", 1));
        batch.push(';');
    }
    batch.push_str("DROP TABLE deferred_indexes; COMMIT;");
    conn.execute_batch(&batch).map_err(storage)
}

/// A projection's file of a generation.
pub(crate) fn projection_path(dir: &Path, generation: &str, kind: ProjectionKind) -> PathBuf {
    dir.join(format!("{generation}.{}.sqlite", kind.name()))
}

/// The one file of a generation of the layout before the projections had a
/// file each; still removed with its generation.
fn generation_path(dir: &Path, generation: &str) -> PathBuf {
    dir.join(format!("{generation}.sqlite"))
}

/// Removes a database file with its WAL and shared-memory files.
fn remove_database(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.to_path_buf().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// Removes every file of a generation.
fn remove_generation(dir: &Path, generation: &str) {
    remove_database(&generation_path(dir, generation));
    for kind in ProjectionKind::ALL {
        remove_database(&projection_path(dir, generation, kind));
    }
}

fn current_generation(control: &Connection) -> Result<Option<String>, ReadStoreError> {
    control
        .query_row(
            "SELECT name FROM current_generation WHERE id = 1",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(storage)
}

/// Registers and returns the next generation's name (`g1`, `g2`, ...).
fn new_generation_name(control: &Connection) -> Result<String, ReadStoreError> {
    let next: i64 = control
        .query_row(
            "SELECT COALESCE(MAX(number), 0) + 1 FROM generations",
            [],
            |r| r.get(0),
        )
        .map_err(storage)?;
    let name = format!("g{next}");
    control
        .execute(
            "INSERT INTO generations (name, number, created_at) VALUES (?1, ?2, ?3)",
            params![name, next, sql_time(Utc::now())],
        )
        .map_err(storage)?;
    Ok(name)
}

fn read_checkpoint(conn: &Connection, key: CheckpointKey) -> Result<Position, ReadStoreError> {
    let own: Option<i64> = conn
        .query_row(
            "SELECT position FROM checkpoints WHERE key = ?1",
            [key.to_string()],
            |r| r.get(0),
        )
        .optional()
        .map_err(storage)?;
    let position = match own {
        Some(p) => Some(p),
        None if key.partition != crate::readstore::Partition::WHOLE => conn
            .query_row(
                "SELECT position FROM checkpoints WHERE key = ?1",
                [CheckpointKey::whole(key.projection).to_string()],
                |r| r.get(0),
            )
            .optional()
            .map_err(storage)?,
        None => None,
    };
    Ok(position.and_then(|p| u64::try_from(p).ok()).unwrap_or(0))
}

/// Inserts the keys, returning those that were not there before.
fn insert_new_keys(
    tx: &Transaction<'_>,
    kind: ProjectionKind,
    keys: &MembershipKeys,
) -> Result<MembershipKeys, ReadStoreError> {
    fn pairs(
        tx: &Transaction<'_>,
        sql: &str,
        keys: &FxHashSet<(u64, u64)>,
    ) -> Result<FxHashSet<(u64, u64)>, ReadStoreError> {
        let mut stmt = tx.prepare_cached(sql).map_err(storage)?;
        let mut new = FxHashSet::default();
        // In key order: consecutive inserts land on the same B-tree pages
        // instead of random ones (a hash set's order).
        let mut sorted: Vec<_> = keys.iter().copied().collect();
        sorted.sort_unstable();
        for (a, b) in sorted {
            if stmt
                .execute(params![sql_id(a), sql_id(b)])
                .map_err(storage)?
                == 1
            {
                new.insert((a, b));
            }
        }
        Ok(new)
    }
    fn triples(
        tx: &Transaction<'_>,
        sql: &str,
        keys: &FxHashSet<(u64, u64, u64)>,
    ) -> Result<FxHashSet<(u64, u64, u64)>, ReadStoreError> {
        let mut stmt = tx.prepare_cached(sql).map_err(storage)?;
        let mut new = FxHashSet::default();
        let mut sorted: Vec<_> = keys.iter().copied().collect();
        sorted.sort_unstable();
        for (a, b, c) in sorted {
            if stmt
                .execute(params![sql_id(a), sql_id(b), sql_id(c)])
                .map_err(storage)?
                == 1
            {
                new.insert((a, b, c));
            }
        }
        Ok(new)
    }
    let mut new = MembershipKeys::default();
    match kind {
        ProjectionKind::Institutions => {
            new.institution_learners = pairs(
                tx,
                "INSERT OR IGNORE INTO inst_m_learners VALUES (?1, ?2)",
                &keys.institution_learners,
            )?;
            new.institution_trails = pairs(
                tx,
                "INSERT OR IGNORE INTO inst_m_trails VALUES (?1, ?2)",
                &keys.institution_trails,
            )?;
            new.institution_courses = pairs(
                tx,
                "INSERT OR IGNORE INTO inst_m_courses VALUES (?1, ?2)",
                &keys.institution_courses,
            )?;
            new.trail_learners = triples(
                tx,
                "INSERT OR IGNORE INTO inst_m_trail_learners VALUES (?1, ?2, ?3)",
                &keys.trail_learners,
            )?;
            new.course_learners = triples(
                tx,
                "INSERT OR IGNORE INTO inst_m_course_learners VALUES (?1, ?2, ?3)",
                &keys.course_learners,
            )?;
            new.trail_courses = triples(
                tx,
                "INSERT OR IGNORE INTO inst_trail_courses VALUES (?1, ?2, ?3)",
                &keys.trail_courses,
            )?;
            let mut stmt = tx
                .prepare_cached("INSERT OR IGNORE INTO inst_m_day_learners VALUES (?1, ?2, ?3)")
                .map_err(storage)?;
            let mut sorted: Vec<_> = keys.day_learners.iter().collect();
            sorted.sort_unstable();
            for (i, day, u) in sorted {
                if stmt
                    .execute(params![sql_id(*i), day, sql_id(*u)])
                    .map_err(storage)?
                    == 1
                {
                    new.day_learners.insert((*i, day.clone(), *u));
                }
            }
        }
        ProjectionKind::Learners => {
            // A learner's trail is new exactly when its `lrn_learner_trails`
            // row is: that row is written in this transaction, which holds
            // the file's write lock, so a lookup answers what an `INSERT OR
            // IGNORE` into a key table would, without writing one.
            let mut stmt = tx
                .prepare_cached(
                    "SELECT 1 FROM lrn_learner_trails
                     WHERE institution_id = ?1 AND trail_id = ?2 AND user_id = ?3",
                )
                .map_err(storage)?;
            for &(i, t, u) in &keys.trail_learners {
                if !stmt
                    .exists(params![sql_id(i), sql_id(t), sql_id(u)])
                    .map_err(storage)?
                {
                    new.trail_learners.insert((i, t, u));
                }
            }
        }
    }
    Ok(new)
}

fn write_plan(tx: &Transaction<'_>, p: &Plan) -> Result<(), ReadStoreError> {
    if !p.summaries.is_empty() {
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO inst_summary VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (institution_id) DO UPDATE SET
                   completions = completions + excluded.completions,
                   learners = learners + excluded.learners,
                   trails = trails + excluded.trails,
                   courses = courses + excluded.courses,
                   first_completed_at = MIN(first_completed_at, excluded.first_completed_at),
                   last_completed_at = MAX(last_completed_at, excluded.last_completed_at),
                   last_position = MAX(last_position, excluded.last_position)",
            )
            .map_err(storage)?;
        for (i, s) in sorted(&p.summaries) {
            stmt.execute(params![
                sql_id(*i),
                s.completions as i64,
                s.new_learners as i64,
                s.new_trails as i64,
                s.new_courses as i64,
                sql_time(s.span.first),
                sql_time(s.span.last),
                sql_position(s.last_position)?,
            ])
            .map_err(storage)?;
        }
    }
    // A later name or title is set by an `UPDATE` of its own, before the
    // upsert and only when it differs: SQLite rewrites the entry of an
    // index on every column a statement assigns, changed or not, and the
    // name and title indexes (`*_by_name`, `*_by_title`) were a tenth of
    // the pages a live batch wrote (see `Rename`).
    if !p.trails.is_empty() {
        let mut rename_trail = Rename::prepare(
            tx,
            "UPDATE inst_trails SET name = ?3
             WHERE institution_id = ?1 AND trail_id = ?2 AND name_position < ?4 AND name <> ?3",
        )?;
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO inst_trails VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (institution_id, trail_id) DO UPDATE SET
                   name_position = MAX(name_position, excluded.name_position),
                   completions = completions + excluded.completions,
                   learners = learners + excluded.learners,
                   first_completed_at = MIN(first_completed_at, excluded.first_completed_at),
                   last_completed_at = MAX(last_completed_at, excluded.last_completed_at)",
            )
            .map_err(storage)?;
        for ((i, t), d) in sorted(&p.trails) {
            rename_trail.set((*i, *t), &d.name.value, sql_position(d.name.position)?)?;
            stmt.execute(params![
                sql_id(*i),
                sql_id(*t),
                d.name.value,
                sql_position(d.name.position)?,
                d.completions as i64,
                d.new_learners as i64,
                sql_time(d.span.first),
                sql_time(d.span.last),
            ])
            .map_err(storage)?;
        }
    }
    if !p.courses.is_empty() {
        let mut rename_course = Rename::prepare(
            tx,
            "UPDATE inst_courses SET title = ?3
             WHERE institution_id = ?1 AND course_id = ?2 AND title_position < ?4 AND title <> ?3",
        )?;
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO inst_courses VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (institution_id, course_id) DO UPDATE SET
                   title_position = MAX(title_position, excluded.title_position),
                   completions = completions + excluded.completions,
                   learners = learners + excluded.learners",
            )
            .map_err(storage)?;
        for ((i, c), d) in sorted(&p.courses) {
            rename_course.set((*i, *c), &d.title.value, sql_position(d.title.position)?)?;
            stmt.execute(params![
                sql_id(*i),
                sql_id(*c),
                d.title.value,
                sql_position(d.title.position)?,
                d.completions as i64,
                d.new_learners as i64,
            ])
            .map_err(storage)?;
        }
    }
    if !p.days.is_empty() {
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO inst_daily VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (institution_id, day) DO UPDATE SET
                   completions = completions + excluded.completions,
                   learners = learners + excluded.learners",
            )
            .map_err(storage)?;
        for ((i, day), d) in sorted(&p.days) {
            stmt.execute(params![
                sql_id(*i),
                day,
                d.completions as i64,
                d.new_learners as i64
            ])
            .map_err(storage)?;
        }
    }
    if !p.learners.is_empty() {
        let mut rename_learner = Rename::prepare(
            tx,
            "UPDATE lrn_learners SET name = ?3
             WHERE institution_id = ?1 AND user_id = ?2 AND profile_position < ?4 AND name <> ?3",
        )?;
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO lrn_learners VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (institution_id, user_id) DO UPDATE SET
                   email = CASE WHEN excluded.profile_position > profile_position THEN excluded.email ELSE email END,
                   profile_position = MAX(profile_position, excluded.profile_position),
                   trails = trails + excluded.trails,
                   completions = completions + excluded.completions,
                   first_completed_at = MIN(first_completed_at, excluded.first_completed_at),
                   last_completed_at = MAX(last_completed_at, excluded.last_completed_at)",
            )
            .map_err(storage)?;
        for ((i, u), d) in sorted(&p.learners) {
            rename_learner.set(
                (*i, *u),
                &d.profile.value.0,
                sql_position(d.profile.position)?,
            )?;
            stmt.execute(params![
                sql_id(*i),
                sql_id(*u),
                d.profile.value.0,
                d.profile.value.1,
                sql_position(d.profile.position)?,
                d.new_trails as i64,
                d.completions as i64,
                sql_time(d.span.first),
                sql_time(d.span.last),
            ])
            .map_err(storage)?;
        }
    }
    if !p.learner_trails.is_empty() {
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO lrn_learner_trails VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (institution_id, user_id, trail_id) DO UPDATE SET
                   completions = completions + excluded.completions,
                   first_completed_at = MIN(first_completed_at, excluded.first_completed_at),
                   last_completed_at = MAX(last_completed_at, excluded.last_completed_at)",
            )
            .map_err(storage)?;
        for ((i, u, t), d) in sorted(&p.learner_trails) {
            stmt.execute(params![
                sql_id(*i),
                sql_id(*u),
                sql_id(*t),
                d.completions as i64,
                sql_time(d.span.first),
                sql_time(d.span.last),
            ])
            .map_err(storage)?;
        }
    }
    if !p.completions.is_empty() {
        write_completions(tx, &p.completions)?;
    }
    Ok(())
}

/// A prepared rename (`sql`: `?1`, `?2` the row's key, `?3` the name, `?4`
/// its position). It runs before the row's upsert, which moves the
/// position but never assigns the name: the `UPDATE` matches only a row
/// whose stored name is older and different, so a name seen again writes
/// nothing, and its index entry stays put.
struct Rename<'t>(rusqlite::CachedStatement<'t>);

impl<'t> Rename<'t> {
    fn prepare(tx: &'t Transaction<'_>, sql: &str) -> Result<Self, ReadStoreError> {
        tx.prepare_cached(sql).map(Self).map_err(storage)
    }

    fn set(&mut self, (a, b): (u64, u64), name: &str, position: i64) -> Result<(), ReadStoreError> {
        self.0
            .execute(params![sql_id(a), sql_id(b), name, position])
            .map(|_| ())
            .map_err(storage)
    }
}

fn write_completions(tx: &Transaction<'_>, rows: &[Completion]) -> Result<(), ReadStoreError> {
    // In position order, so many rows to a statement (see `insert_sorted`).
    insert_sorted(tx, "lrn_completions", rows, |c| {
        let event_id = c
            .event_id
            .hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer())
            .to_owned();
        Ok([
            ToSqlOutput::from(sql_position(c.position)?),
            ToSqlOutput::from(event_id),
            ToSqlOutput::from(sql_id(c.institution_id)),
            ToSqlOutput::from(sql_id(c.user_id)),
            ToSqlOutput::from(sql_id(c.trail_id)),
            ToSqlOutput::from(c.trail_name.as_str()),
            ToSqlOutput::from(c.finished_at_raw.as_str()),
            ToSqlOutput::from(sql_time(c.finished_at)),
            ToSqlOutput::from(c.day.as_str()),
            ToSqlOutput::from(courses_json(c)),
        ])
    })?;
    // (institution, day) -> (first, last) of this batch.
    let mut days: Vec<((u64, i64), (Position, Position))> = rows
        .iter()
        .map(|c| {
            let key = (c.institution_id, utc_day(c.finished_at));
            (key, (c.position, c.position))
        })
        .collect();
    days.sort_unstable();
    days.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.1.1 = kept.1.1.max(later.1.1);
        }
        same
    });
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO lrn_completion_days VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (institution_id, day) DO UPDATE SET
               first_position = MIN(first_position, excluded.first_position),
               last_position = MAX(last_position, excluded.last_position)
             WHERE excluded.first_position < first_position
                OR excluded.last_position > last_position",
        )
        .map_err(storage)?;
    for ((institution, day), (first, last)) in days {
        stmt.execute(params![
            sql_id(institution),
            day,
            sql_position(first)?,
            sql_position(last)?
        ])
        .map_err(storage)?;
    }
    Ok(())
}

/// Rows per `INSERT` of rows that come in key order (a rebuild's membership
/// keys, completion rows in position order). A statement of many rows
/// keeps SQLite's cursor where the last row went, so each row lands beside
/// the one before; a statement per row descends the B-tree from its root
/// every time. 4M sorted triples into a `WITHOUT ROWID` table (a Rust
/// example with this crate's SQLite): 1.57 s one row per statement, 0.73 s
/// a hundred.
const LOAD_ROWS: usize = 100;

/// Inserts `rows` (in key order) into `table`, `LOAD_ROWS` per statement.
fn insert_sorted<'a, T, const N: usize>(
    tx: &Transaction<'_>,
    table: &str,
    rows: &'a [T],
    values: impl Fn(&'a T) -> Result<[ToSqlOutput<'a>; N], ReadStoreError>,
) -> Result<(), ReadStoreError> {
    let row = format!("({})", ["?"; N].join(", "));
    let sql = |count: usize| {
        format!(
            "INSERT INTO {table} VALUES {}",
            vec![row.as_str(); count].join(", ")
        )
    };
    let mut chunks = rows.chunks_exact(LOAD_ROWS);
    if chunks.len() > 0 {
        // Cached: live batches of completions use it batch after batch.
        // The remainder's statement is not (up to 99 sizes per table would
        // push the live path's statements out of the cache).
        let mut full = tx.prepare_cached(&sql(LOAD_ROWS)).map_err(storage)?;
        for chunk in &mut chunks {
            bind_rows(&mut full, chunk, &values)?;
        }
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut stmt = tx.prepare(&sql(rest.len())).map_err(storage)?;
        bind_rows(&mut stmt, rest, &values)?;
    }
    Ok(())
}

fn bind_rows<'a, T, const N: usize>(
    stmt: &mut rusqlite::Statement<'_>,
    rows: &'a [T],
    values: impl Fn(&'a T) -> Result<[ToSqlOutput<'a>; N], ReadStoreError>,
) -> Result<(), ReadStoreError> {
    let mut index = 0;
    for row in rows {
        for value in values(row)? {
            index += 1;
            stmt.raw_bind_parameter(index, value).map_err(storage)?;
        }
    }
    stmt.raw_execute().map_err(storage)?;
    Ok(())
}

/// Plain inserts (a key already there is an error, not skipped), in the
/// order given: the tables' key order, so every insert appends.
fn load_membership(
    tx: &Transaction<'_>,
    kind: ProjectionKind,
    m: &Membership,
) -> Result<(), ReadStoreError> {
    let id = |id: u64| ToSqlOutput::from(sql_id(id));
    let pairs = |table: &str, keys: &[(u64, u64)]| {
        insert_sorted(tx, table, keys, |(a, b)| Ok([id(*a), id(*b)]))
    };
    let triples = |table: &str, keys: &[(u64, u64, u64)]| {
        insert_sorted(tx, table, keys, |(a, b, c)| Ok([id(*a), id(*b), id(*c)]))
    };
    match kind {
        ProjectionKind::Institutions => {
            pairs("inst_m_learners", &m.institution_learners)?;
            pairs("inst_m_trails", &m.institution_trails)?;
            pairs("inst_m_courses", &m.institution_courses)?;
            triples("inst_m_trail_learners", &m.trail_learners)?;
            triples("inst_m_course_learners", &m.course_learners)?;
            triples("inst_trail_courses", &m.trail_courses)?;
            insert_sorted(tx, "inst_m_day_learners", &m.day_learners, |(i, d, u)| {
                let day = m
                    .days
                    .get(*d as usize)
                    .ok_or_else(|| storage(format!("day index {d} out of range")))?;
                Ok([id(*i), ToSqlOutput::from(day.as_str()), id(*u)])
            })?;
        }
        // A learner's trails are the `lrn_learner_trails` rows.
        ProjectionKind::Learners => {}
    }
    Ok(())
}

fn load_final_blocking(conn: &mut Connection, load: FinalLoad) -> Result<(), ReadStoreError> {
    let FinalLoad {
        projection,
        mut plan,
        membership,
        dead_letters,
        through,
    } = load;
    plan.completions.clear();
    // `inst_trail_courses` is a membership table too: written from there.
    plan.trail_courses.clear();
    let tx = conn.transaction().map_err(storage)?;
    write_plan(&tx, &plan)?;
    load_membership(&tx, projection, &membership)?;
    {
        let mut stmt = tx
            .prepare("INSERT INTO dead_letters VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
            .map_err(storage)?;
        for d in &dead_letters {
            stmt.execute(params![
                d.projection,
                sql_position(d.position)?,
                d.event_id.to_string(),
                d.event_type,
                d.error,
                sql_time(d.recorded_at),
            ])
            .map_err(storage)?;
        }
    }
    tx.execute(
        "INSERT INTO checkpoints (key, position) VALUES (?1, ?2)",
        params![
            CheckpointKey::whole(projection).to_string(),
            sql_position(through)?
        ],
    )
    .map_err(storage)?;
    tx.commit().map_err(storage)
}

/// `[{"id":1,"title":"..."}]`, the same text on every backend.
pub fn courses_json(c: &Completion) -> String {
    // Serialized straight from the completion (no `serde_json::Value` per
    // course: this runs once per completion of a rebuild). Fields in the
    // order a `json!` object prints them (sorted keys), so the text is the
    // one stored before.
    #[derive(serde::Serialize)]
    struct Course<'a> {
        id: u64,
        title: &'a str,
    }
    struct Courses<'a>(&'a [crate::model::CourseRef]);
    impl serde::Serialize for Courses<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter().map(|c| Course {
                id: c.id,
                title: &c.title,
            }))
        }
    }
    serde_json::to_string(&Courses(&c.courses)).unwrap_or_else(|_| String::from("[]"))
}

fn apply_blocking(
    conn: &mut Connection,
    generation: &str,
    control: Option<&Mutex<Connection>>,
    batch: ApplyBatch,
) -> Result<(), ReadStoreError> {
    if let Some(control) = control {
        let control = control
            .lock()
            .map_err(|_| storage("control connection lock poisoned"))?;
        if let Some(current) = current_generation(&control)?
            && current != generation
        {
            return Err(ReadStoreError::GenerationChanged {
                from: generation.to_owned(),
                to: current,
            });
        }
    }
    let tx = tracker_store::begin_immediate(conn).map_err(storage)?;
    let key = batch.key;
    let key_text = key.to_string();
    if let Some((holder, ttl)) = &batch.lease {
        let now = now_ms();
        let renewed = tx
            .execute(
                "UPDATE leases SET expires_at = ?1 WHERE name = ?2 AND holder = ?3 AND expires_at > ?4",
                params![now.saturating_add(lease_ms(*ttl)), key_text, holder.0, now],
            )
            .map_err(storage)?;
        if renewed != 1 {
            return Err(ReadStoreError::LeaseLost(key_text));
        }
    }
    let checkpoint = read_checkpoint(&tx, key)?;
    if batch.through <= checkpoint {
        // Redelivered: already applied, nothing to do but keep the lease
        // renewed above (the runner counts on every batch renewing it).
        return tx.commit().map_err(storage);
    }
    if checkpoint < batch.after {
        return Err(ReadStoreError::Gap {
            key: key.to_string(),
            checkpoint,
            after: batch.after,
        });
    }
    let completions: Vec<Completion> = batch
        .completions
        .into_iter()
        .filter(|c| c.position > checkpoint)
        .collect();
    let keys = membership_keys(key.projection, &completions);
    let new = insert_new_keys(&tx, key.projection, &keys)?;
    let p = plan(key.projection, &completions, &new);
    write_plan(&tx, &p)?;
    {
        let mut stmt = tx
            .prepare_cached("INSERT OR IGNORE INTO dead_letters VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
            .map_err(storage)?;
        for d in batch
            .dead_letters
            .iter()
            .filter(|d| d.position > checkpoint)
        {
            stmt.execute(params![
                d.projection,
                sql_position(d.position)?,
                d.event_id.to_string(),
                d.event_type,
                d.error,
                sql_time(d.recorded_at),
            ])
            .map_err(storage)?;
        }
    }
    tx.execute(
        "INSERT INTO checkpoints (key, position) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET position = MAX(position, excluded.position)",
        params![key_text, sql_position(batch.through)?],
    )
    .map_err(storage)?;
    tx.commit().map_err(storage)
}

/// The file a lease lives in: a lease is named by the checkpoint key it
/// guards, so it is renewed in the transaction that moves that checkpoint.
fn lease_kind(name: &str) -> ProjectionKind {
    CheckpointKey::parse(name).map_or(ProjectionKind::Institutions, |k| k.projection)
}

fn read_dead_letters(conn: &Connection, limit: usize) -> Result<Vec<DeadLetter>, ReadStoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT projection, position, event_id, event_type, error, recorded_at
             FROM dead_letters ORDER BY position, projection LIMIT ?1",
        )
        .map_err(storage)?;
    let rows = stmt
        .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
            ))
        })
        .map_err(storage)?;
    rows.map(|r| {
        let (projection, position, event_id, event_type, error, at) = r.map_err(storage)?;
        Ok(DeadLetter {
            projection,
            position: u64::try_from(position).unwrap_or(0),
            event_id: event_id.parse().map_err(storage)?,
            event_type,
            error,
            recorded_at: DateTime::parse_from_rfc3339(&at)
                .map_err(storage)?
                .with_timezone(&Utc),
        })
    })
    .collect()
}

/// Every row of `table`, sorted by `order`, rendered as text.
fn dump_table(
    conn: &Connection,
    table: &str,
    order: &str,
) -> Result<Vec<Vec<String>>, ReadStoreError> {
    let mut stmt = conn
        .prepare(&format!("SELECT * FROM {table} ORDER BY {order}"))
        .map_err(storage)?;
    let columns = stmt.column_count();
    stmt.query_map([], |r| {
        (0..columns)
            .map(|i| {
                Ok(match r.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => "null".to_owned(),
                    rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                    rusqlite::types::ValueRef::Real(v) => v.to_string(),
                    rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    rusqlite::types::ValueRef::Blob(b) => format!("{b:?}"),
                })
            })
            .collect::<Result<Vec<String>, rusqlite::Error>>()
    })
    .map_err(storage)?
    .collect::<Result<Vec<_>, _>>()
    .map_err(storage)
}

#[async_trait]
impl ReadStore for SqliteReadStore {
    fn generation(&self) -> String {
        lock(&self.files)
            .map(|f| f.generation.clone())
            .unwrap_or_default()
    }

    async fn checkpoint(&self, key: CheckpointKey) -> Result<Position, ReadStoreError> {
        self.with_conn(key.projection, move |conn, _| read_checkpoint(conn, key))
            .await
    }

    async fn apply(&self, batch: ApplyBatch) -> Result<(), ReadStoreError> {
        let control = self.follows_current.then(|| Arc::clone(&self.control));
        self.with_conn(batch.key.projection, move |conn, generation| {
            apply_blocking(conn, generation, control.as_deref(), batch)
        })
        .await
    }

    async fn load_completions(&self, rows: Arc<[Completion]>) -> Result<(), ReadStoreError> {
        self.building()?;
        self.with_conn(ProjectionKind::Learners, move |conn, _| {
            let tx = conn.transaction().map_err(storage)?;
            write_completions(&tx, &rows)?;
            tx.commit().map_err(storage)
        })
        .await
    }

    async fn load_final(&self, load: FinalLoad) -> Result<(), ReadStoreError> {
        self.building()?;
        self.with_conn(load.projection, move |conn, _| {
            load_final_blocking(conn, load)
        })
        .await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<bool, ReadStoreError> {
        let (name, holder) = (name.to_owned(), holder.0.clone());
        self.with_conn(lease_kind(&name), move |conn, _| {
            let now = now_ms();
            let changed = conn
                .execute(
                    "INSERT INTO leases (name, holder, expires_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
                     WHERE leases.holder = excluded.holder OR leases.expires_at <= ?4",
                    params![name, holder, now.saturating_add(lease_ms(ttl)), now],
                )
                .map_err(storage)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &LeaseHolder) -> Result<(), ReadStoreError> {
        let (name, holder) = (name.to_owned(), holder.0.clone());
        self.with_conn(lease_kind(&name), move |conn, _| {
            conn.execute(
                "UPDATE leases SET expires_at = 0 WHERE name = ?1 AND holder = ?2",
                params![name, holder],
            )
            .map_err(storage)?;
            Ok(())
        })
        .await
    }

    async fn live_leases(&self) -> Result<Vec<String>, ReadStoreError> {
        let each = self
            .with_each(|conn| {
                let mut stmt = conn
                    .prepare_cached("SELECT name FROM leases WHERE expires_at > ?1")
                    .map_err(storage)?;
                let rows = stmt
                    .query_map([now_ms()], |r| r.get::<_, String>(0))
                    .map_err(storage)?;
                rows.map(|r| r.map_err(storage))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        let mut names: Vec<String> = each.into_iter().flatten().collect();
        names.sort_unstable();
        Ok(names)
    }

    async fn checkpoints(&self) -> Result<Vec<(String, Position)>, ReadStoreError> {
        let each = self
            .with_each(|conn| {
                let mut stmt = conn
                    .prepare_cached("SELECT key, position FROM checkpoints")
                    .map_err(storage)?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                    .map_err(storage)?;
                rows.map(|r| {
                    r.map(|(k, p)| (k, u64::try_from(p).unwrap_or(0)))
                        .map_err(storage)
                })
                .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        let mut all: Vec<(String, Position)> = each.into_iter().flatten().collect();
        all.sort_unstable();
        Ok(all)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, ReadStoreError> {
        let each = self
            .with_each(move |conn| read_dead_letters(conn, limit))
            .await?;
        let mut all: Vec<DeadLetter> = each.into_iter().flatten().collect();
        all.sort_by(|a, b| (a.position, &a.projection).cmp(&(b.position, &b.projection)));
        all.truncate(limit);
        Ok(all)
    }

    async fn dead_letter_count(&self) -> Result<u64, ReadStoreError> {
        let each = self
            .with_each(|conn| {
                let n: i64 = conn
                    .query_row("SELECT COUNT(*) FROM dead_letters", [], |r| r.get(0))
                    .map_err(storage)?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
            .await?;
        Ok(each.into_iter().sum())
    }

    async fn snapshot(&self) -> Result<Snapshot, ReadStoreError> {
        let mut tables = Vec::with_capacity(SNAPSHOT_TABLES.len());
        for (table, order, kind) in SNAPSHOT_TABLES {
            let rows = self
                .with_conn(*kind, move |conn, _| dump_table(conn, table, order))
                .await?;
            tables.push(((*table).to_owned(), rows));
        }
        Ok(Snapshot { tables })
    }

    async fn follow_current(&self) -> Result<bool, ReadStoreError> {
        if !self.follows_current {
            return Ok(false);
        }
        let current = self.with_control(|c| current_generation(c)).await?;
        let Some(current) = current else {
            return Ok(false);
        };
        if current == self.generation() {
            return Ok(false);
        }
        let dir = self.dir.clone();
        let files = Arc::clone(&self.files);
        let checkpointer = self.checkpointer.is_some();
        tokio::task::spawn_blocking(move || {
            let opened = Files::open(current.clone(), true, |kind| {
                open_live(&dir, &current, kind, checkpointer)
            })?;
            // The old writers are joined as they drop (each closes its file,
            // which may copy a WAL): outside the lock, which every call takes.
            let old = std::mem::replace(&mut *lock(&files)?, opened);
            drop(old);
            Ok::<_, ReadStoreError>(())
        })
        .await
        .map_err(|e| storage(format!("read store task failed: {e}")))??;
        Ok(true)
    }

    async fn create_generation(&self) -> Result<Box<dyn ReadStore>, ReadStoreError> {
        let dir = self.dir.clone();
        let control = Arc::clone(&self.control);
        let generation = self.with_control(|c| new_generation_name(c)).await?;
        let files = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || {
                Files::open(generation.clone(), false, |kind| {
                    open_building(&dir, &generation, kind)
                })
            }
        })
        .await
        .map_err(|e| storage(format!("read store task failed: {e}")))??;
        Ok(Box::new(SqliteReadStore {
            dir,
            files: Arc::new(Mutex::new(files)),
            control,
            follows_current: false,
            checkpointer: None,
        }))
    }

    async fn seal(&self) -> Result<(), ReadStoreError> {
        // Both files at once: each builds its own read indexes on its own
        // connection.
        let seal = |kind: ProjectionKind| {
            let dir = self.dir.clone();
            self.with_conn(kind, move |conn, generation| {
                seal_file(conn, &projection_path(&dir, generation, kind))
            })
        };
        let [institutions, learners] = ProjectionKind::ALL;
        tokio::try_join!(seal(institutions), seal(learners))?;
        // The files' directory entries, before the pointer can name them.
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| storage(format!("syncing {}: {e}", self.dir.display())))
    }

    async fn switch_to(&self, generation: &str) -> Result<(), ReadStoreError> {
        let generation = generation.to_owned();
        let dir = self.dir.clone();
        let obsolete = self
            .with_control(move |c| {
                let tx = tracker_store::begin_immediate(c).map_err(storage)?;
                let number: i64 = tx
                    .query_row(
                        "SELECT number FROM generations WHERE name = ?1",
                        [&generation],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(storage)?
                    .ok_or_else(|| storage(format!("no generation named {generation}")))?;
                let previous: Option<i64> = tx
                    .query_row(
                        "SELECT g.number FROM current_generation c JOIN generations g ON g.name = c.name",
                        [],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(storage)?;
                tx.execute(
                    "INSERT INTO current_generation (id, name) VALUES (1, ?1)
                     ON CONFLICT (id) DO UPDATE SET name = excluded.name",
                    [&generation],
                )
                .map_err(storage)?;
                // Keep the generation just replaced (for a look back or a
                // switch back); drop the ones before it.
                let keep_from = previous.unwrap_or(number).min(number);
                let mut stmt = tx
                    .prepare("SELECT name FROM generations WHERE number < ?1")
                    .map_err(storage)?;
                let old: Vec<String> = stmt
                    .query_map([keep_from], |r| r.get(0))
                    .map_err(storage)?
                    .collect::<Result<_, _>>()
                    .map_err(storage)?;
                drop(stmt);
                tx.execute("DELETE FROM generations WHERE number < ?1", [keep_from])
                    .map_err(storage)?;
                tx.commit().map_err(storage)?;
                Ok(old)
            })
            .await?;
        for old in obsolete {
            remove_generation(&dir, &old);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::model::tests::completion;

    /// The stored text of a completion's courses must not change with how it
    /// is produced: it is compared across stores and rebuilds.
    #[test]
    fn courses_json_is_the_json_value_text() {
        let mut c = completion(1, 1, 1, 1, "2024-01-01 10:00:00", &[3, u64::MAX, 3]);
        c.courses[0].title = "Programação \"Funcional\" \\ ü\n\u{1}".into();
        let expected: Vec<_> = c
            .courses
            .iter()
            .map(|course| serde_json::json!({ "id": course.id, "title": course.title }))
            .collect();
        assert_eq!(
            courses_json(&c),
            serde_json::Value::Array(expected).to_string()
        );
        c.courses.clear();
        assert_eq!(courses_json(&c), "[]");
    }
}
