//! Plumbing shared by the SQLite-backed parts of this crate: opening files,
//! versioned migrations, timestamp encoding and a small pool of read-only
//! connections used from blocking threads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

use crate::StoreError;

/// A store's writer thread, whose end every `close` waits for: the first
/// caller and any concurrent or later one alike, so that none hears "closed"
/// while queued work is still being committed.
pub(crate) struct WriterThread {
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
    ended: tokio::sync::watch::Receiver<bool>,
}

/// Marks the thread ended when dropped: when `run` returns or unwinds.
struct Ended(tokio::sync::watch::Sender<bool>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

impl WriterThread {
    pub(crate) fn spawn(
        name: &str,
        run: impl FnOnce() + Send + 'static,
    ) -> Result<Self, StoreError> {
        let (ended_tx, ended) = tokio::sync::watch::channel(false);
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let _ended = Ended(ended_tx);
                run();
            })
            .map_err(|err| StoreError::Storage(format!("cannot start writer thread: {err}")))?;
        Ok(Self {
            handle: Mutex::new(Some(handle)),
            ended,
        })
    }

    /// Waits until the thread has returned or panicked.
    pub(crate) async fn ended(&self) {
        let mut ended = self.ended.clone();
        // An error means the sender is gone, which it only is once ended.
        let _ = ended.wait_for(|ended| *ended).await;
        self.join();
    }

    /// Waits for the thread to end (blocking) and reaps it; true if it
    /// panicked. Only the first call joins.
    pub(crate) fn join(&self) -> bool {
        let handle = self
            .handle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        handle.is_some_and(|h| h.join().is_err())
    }
}

/// How long a connection waits for a lock held by another connection before
/// giving up. Only checkpoints and other processes (operators' tools) contend
/// with our single writer, so this is a safety net rather than a tuning knob.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        StoreError::Storage(err.to_string())
    }
}

/// The `synchronous` setting of a writer connection.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Durability {
    /// fsync on every commit: the event log, where `Ok` means durable.
    Full,
    /// fsync at checkpoints only: the delivery log, a troubleshooting aid
    /// that may lose its last records on power loss.
    Normal,
}

/// WAL size in pages (frames; 64 MiB of 4 KiB pages) past which a database
/// whose checkpoints run on another connection has its writer checkpoint
/// too, so that the WAL starts over: a checkpoint from another connection
/// never rewinds the WAL of a writer that commits back to back.
pub const WAL_RESTART_FRAMES: u32 = 16_384;

/// `PRAGMA journal_mode = WAL`, returning the mode the file is in. Retried
/// for up to `timeout` while other connections hold a file that is not in
/// WAL yet: the switch needs the file to itself, and SQLite answers BUSY at
/// once instead of through the busy handler (processes opening a new data
/// directory together).
pub fn enable_wal(conn: &Connection, timeout: Duration) -> rusqlite::Result<String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            done => return done,
        }
    }
}

/// Opens (creating file and parent directory) the one read-write connection
/// of a database, in WAL mode, and brings its schema up to date.
pub(crate) fn open_writer(
    path: &Path,
    durability: Durability,
    busy_timeout: Duration,
    migrations: &[&str],
) -> Result<Connection, StoreError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|err| {
            StoreError::Storage(format!(
                "cannot create directory {}: {err}",
                parent.display()
            ))
        })?;
    }
    let mut conn = Connection::open(path).map_err(|err| {
        StoreError::Storage(format!("cannot open database {}: {err}", path.display()))
    })?;
    conn.busy_timeout(busy_timeout)?;
    let mode = enable_wal(&conn, busy_timeout)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Storage(format!(
            "database {} refused WAL mode (got {mode})",
            path.display()
        )));
    }
    let sync = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.set_prepared_statement_cache_capacity(32);
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    // Checkpointing every 10,000 WAL pages (~40 MiB) instead of SQLite's
    // 1,000 lets a page rewritten by many groups reach the database file
    // once. Every commit is still fsynced (synchronous=FULL); only the copy
    // into the main file is batched. The page cache is each writer's own
    // (`WriterCache` for the event log).
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
    migrate(&mut conn, path, migrations)?;
    Ok(conn)
}

/// The page cache of a writer whose commits touch random pages (the event
/// log's id and stream indexes), sized around a cost of SQLite's that ends
/// once the file passes 1 GiB.
///
/// When a B-tree page split renumbers its new pages, SQLite moves one of
/// them through the number of the pending-byte page (the page holding byte
/// 2^30 of the file) and the page cache remembers that number as its
/// largest. While the file is smaller, that number is past its end, and the
/// next commit, truncating the cache to the file's size, walks every slot
/// of the cache's hash table (`pcache1TruncateUnsafe`): with the 64 MiB
/// cache it was a fifth of the event-store writer's CPU under HTTP ingest
/// (`perf`, 300k events), on the thread every append waits for. The walk
/// grows with the cache, so below 1 GiB the cache is kept small; past it
/// there is no walk, and a large cache keeps the indexes' pages in memory
/// (at 1M events an 8 MiB cache read 2.6 times as many pages from the
/// kernel as 64 MiB did).
pub(crate) struct WriterCache {
    large_kib: i64,
    /// Page count from which the cache is large: the pending-byte page.
    large_from: i64,
    large: bool,
    /// Commits until the page count is looked at again.
    countdown: u32,
}

/// Commits between two looks at the page count while the cache is small.
const CACHE_CHECK_EVERY: u32 = 64;

impl WriterCache {
    pub(crate) const SMALL_KIB: i64 = 8_192;
    pub(crate) const LARGE_KIB: i64 = 65_536;

    /// Sets the cache of `conn` for its file's present size.
    pub(crate) fn new(conn: &Connection) -> rusqlite::Result<Self> {
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let large_from = (1_i64 << 30) / page_size.max(1) + 1;
        Self::with_threshold(conn, Self::LARGE_KIB, large_from)
    }

    pub(crate) fn with_threshold(
        conn: &Connection,
        large_kib: i64,
        large_from: i64,
    ) -> rusqlite::Result<Self> {
        let mut cache = Self {
            large_kib,
            large_from,
            large: false,
            countdown: 0,
        };
        conn.pragma_update(None, "cache_size", -Self::SMALL_KIB)?;
        cache.after_commit(conn)?;
        Ok(cache)
    }

    /// Called after each commit: every [`CACHE_CHECK_EVERY`] commits, until
    /// the cache is large, looks at the file's size.
    pub(crate) fn after_commit(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        if self.large {
            return Ok(());
        }
        if self.countdown > 0 {
            self.countdown -= 1;
            return Ok(());
        }
        self.countdown = CACHE_CHECK_EVERY - 1;
        let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        if pages >= self.large_from {
            conn.pragma_update(None, "cache_size", -self.large_kib)?;
            self.large = true;
        }
        Ok(())
    }
}

/// Applies the migrations the file has not seen yet. `PRAGMA user_version`
/// counts the applied ones; each migration runs in its own transaction with
/// the version bump, so a crash leaves the file at a known version.
fn migrate(conn: &mut Connection, path: &Path, migrations: &[&str]) -> Result<(), StoreError> {
    let known = migrations.len();
    let current: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let current = usize::try_from(current).map_err(|_| {
        StoreError::Storage(format!(
            "database {} has a negative schema version",
            path.display()
        ))
    })?;
    if current > known {
        return Err(StoreError::Storage(format!(
            "database {} has schema version {current}, newer than this program knows ({known})",
            path.display()
        )));
    }
    for (index, sql) in migrations.iter().enumerate().skip(current) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Another process opening the file at the same time may have applied
        // it since the version was read: look again under the write lock.
        let applied: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if usize::try_from(applied).is_ok_and(|applied| applied > index) {
            continue;
        }
        tx.execute_batch(sql)?;
        // PRAGMA does not take bound parameters; the value is our own integer.
        tx.execute_batch(&format!("PRAGMA user_version = {}", index + 1))?;
        tx.commit()?;
    }
    Ok(())
}

/// RFC 3339 in UTC with nanoseconds: round-trips exactly and sorts as text,
/// so `>=` on the column is a time comparison.
pub(crate) fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

pub(crate) fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|err| format!("bad timestamp {s:?}: {err}"))
}

pub(crate) fn to_i64(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Storage(format!("{what} {value} is out of range")))
}

/// `LIMIT` accepts -1 for "no limit"; anything above `i64::MAX` is the same.
pub(crate) fn limit_to_i64(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// `BEGIN IMMEDIATE` on a long-lived writer connection. rusqlite's
/// `Transaction` rolls back when dropped but cannot report a ROLLBACK that
/// failed (an I/O error at the wrong moment), and a connection left inside
/// its transaction refuses every later `BEGIN` ("cannot start a transaction
/// within a transaction"): its writer would fail every request for good.
/// So a connection found still inside one is rolled back first; if even
/// that fails, this write fails and the next one tries again.
pub fn begin_immediate(conn: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    if !conn.is_autocommit() {
        tracing::warn!("a SQLite writer was left inside a transaction; rolling it back");
        conn.execute_batch("ROLLBACK")?;
    }
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
}

/// `f` in one read transaction: one snapshot, and one WAL read lock and
/// page-cache check instead of one per statement (a read of many rows by
/// key spent about a quarter of its time more without it, in `fcntl` and
/// `fstat`). `BEGIN` and `COMMIT` are cached statements (rusqlite's
/// `Transaction` parses them at every call). If `f` fails, the transaction
/// is rolled back and `f`'s error returned; a connection whose rollback
/// failed is still inside it, so pools must not hand it out again (check
/// [`Connection::is_autocommit`]).
pub fn in_read_transaction<T, E: From<rusqlite::Error>>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, E>,
) -> Result<T, E> {
    let run = |sql: &str| conn.prepare_cached(sql).and_then(|mut s| s.execute([]));
    run("BEGIN")?;
    match f(conn) {
        Ok(value) => {
            run("COMMIT")?;
            Ok(value)
        }
        Err(e) => {
            let _ = run("ROLLBACK");
            Err(e)
        }
    }
}

/// Read-only connections for queries, so that reads never queue behind (or
/// stall) the writer. Connections are opened on demand and at most
/// `max_idle` are kept between uses: a burst of readers opens a few more
/// rather than waiting.
pub(crate) struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    max_idle: usize,
    closed: AtomicBool,
}

impl ReadPool {
    pub(crate) fn new(path: PathBuf, max_idle: usize) -> Self {
        Self {
            path,
            idle: Mutex::new(Vec::new()),
            max_idle,
            closed: AtomicBool::new(false),
        }
    }

    fn checkout(&self) -> Result<Connection, StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let pooled = self
            .idle
            .lock()
            .map_err(|_| StoreError::Storage("read pool lock poisoned".into()))?
            .pop();
        if let Some(conn) = pooled {
            return Ok(conn);
        }
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|err| {
            StoreError::Storage(format!(
                "cannot open {} for reading: {err}",
                self.path.display()
            ))
        })?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.set_prepared_statement_cache_capacity(16);
        // Without the query planner stability guarantee SQLite re-compiles
        // a cached statement whose `LIMIT ?` value changed (every read of
        // the log); the plans here never depend on the values.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )?;
        Ok(conn)
    }

    fn checkin(&self, conn: Connection) {
        // A connection still in a transaction (its rollback failed) would
        // hold its snapshot, and the WAL, for good: it is closed instead.
        if self.closed.load(Ordering::Acquire) || !conn.is_autocommit() {
            return;
        }
        // A poisoned pool just stops recycling; the connection is closed.
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.max_idle
        {
            idle.push(conn);
        }
    }

    /// Runs `f` on a pooled connection on tokio's blocking threads.
    pub(crate) async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let conn = pool.checkout()?;
            let result = f(&conn);
            pool.checkin(conn);
            result
        })
        .await
        .map_err(|err| StoreError::Storage(format!("read task failed: {err}")))?
    }

    /// Refuses further reads and closes the idle connections; connections in
    /// use are closed when their read ends.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer connection left inside a transaction (as a failed ROLLBACK
    /// leaves it) is rolled back, not refused, by the next write, and what
    /// the abandoned transaction wrote is gone.
    #[test]
    fn begin_immediate_recovers_a_connection_left_in_a_transaction() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER); BEGIN; INSERT INTO t VALUES (1);")
            .unwrap();
        assert!(!conn.is_autocommit());
        assert!(
            conn.transaction_with_behavior(TransactionBehavior::Immediate)
                .is_err(),
            "a plain BEGIN is refused inside a transaction"
        );
        let tx = begin_immediate(&mut conn).unwrap();
        tx.execute("INSERT INTO t VALUES (2)", []).unwrap();
        tx.commit().unwrap();
        let rows: Vec<i64> = conn
            .prepare("SELECT x FROM t")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, [2]);
    }

    fn pool_with_file() -> (tempfile::TempDir, Arc<ReadPool>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sqlite");
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t (x INTEGER)")
            .unwrap();
        (dir, Arc::new(ReadPool::new(path, 4)))
    }

    fn cache_kib(conn: &Connection) -> i64 {
        -conn
            .query_row("PRAGMA cache_size", [], |r| r.get::<_, i64>(0))
            .unwrap()
    }

    fn grow(conn: &Connection, to_pages: i64) {
        conn.execute_batch("CREATE TABLE IF NOT EXISTS pad (b BLOB)")
            .unwrap();
        while conn
            .query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))
            .unwrap()
            < to_pages
        {
            conn.execute("INSERT INTO pad VALUES (zeroblob(8192))", [])
                .unwrap();
        }
    }

    /// Small while the file is below the threshold, large from the first
    /// look at the page count after it passed it, and never small again.
    #[test]
    fn a_writer_cache_grows_once_the_file_passes_the_pending_byte_page() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("t.sqlite")).unwrap();
        let mut cache = WriterCache::with_threshold(&conn, 32_768, 40).unwrap();
        assert_eq!(cache_kib(&conn), WriterCache::SMALL_KIB);
        grow(&conn, 20);
        for _ in 0..2 * CACHE_CHECK_EVERY {
            cache.after_commit(&conn).unwrap();
        }
        assert_eq!(cache_kib(&conn), WriterCache::SMALL_KIB, "grew too early");
        grow(&conn, 40);
        for _ in 0..CACHE_CHECK_EVERY {
            cache.after_commit(&conn).unwrap();
        }
        assert_eq!(cache_kib(&conn), 32_768);
        // A file reopened past the threshold starts large.
        drop(conn);
        let conn = Connection::open(dir.path().join("t.sqlite")).unwrap();
        WriterCache::with_threshold(&conn, 32_768, 40).unwrap();
        assert_eq!(cache_kib(&conn), 32_768);
    }

    /// The threshold is the page holding byte 2^30, whatever the page size.
    #[test]
    fn the_threshold_is_the_page_of_the_first_byte_past_1_gib() {
        for (page_size, page) in [(4_096, 262_145), (65_536, 16_385)] {
            let conn = Connection::open_in_memory().unwrap();
            conn.pragma_update(None, "page_size", page_size).unwrap();
            let cache = WriterCache::new(&conn).unwrap();
            assert_eq!(cache.large_from, page);
            assert!(!cache.large);
            assert_eq!(cache_kib(&conn), WriterCache::SMALL_KIB);
        }
    }

    fn idle(pool: &ReadPool) -> usize {
        pool.idle.lock().unwrap().len()
    }

    /// `f` runs inside a transaction, which is over when it returns, with
    /// its value or its error.
    #[tokio::test]
    async fn a_read_transaction_ends_with_its_read() {
        let (_dir, pool) = pool_with_file();
        let inside = pool
            .run(|conn| in_read_transaction(conn, |conn| Ok(conn.is_autocommit())))
            .await
            .unwrap();
        assert!(!inside, "f ran outside a transaction");
        let (error, ended) = pool
            .run(|conn| {
                let read = in_read_transaction(conn, |_| Err::<(), _>(StoreError::Closed));
                Ok((read.err(), conn.is_autocommit()))
            })
            .await
            .unwrap();
        assert!(matches!(error, Some(StoreError::Closed)), "{error:?}");
        assert!(ended, "a failed read left its transaction open");
        // Both connections were pooled again: they are out of their
        // transactions.
        assert_eq!(idle(&pool), 1);
    }

    /// A connection left inside a transaction is not handed to the next
    /// read, which would see its old snapshot.
    #[tokio::test]
    async fn a_connection_left_in_a_transaction_is_not_pooled() {
        let (_dir, pool) = pool_with_file();
        pool.run(|conn| Ok(conn.execute_batch("BEGIN")?))
            .await
            .unwrap();
        assert_eq!(idle(&pool), 0);
        pool.run(|_| Ok(())).await.unwrap();
        assert_eq!(idle(&pool), 1);
    }
}
