//! The delivery log: every webhook call, accepted or rejected, with what was
//! answered and why. Kept in its own SQLite file, apart from the event log,
//! for operators who audit and troubleshoot deliveries.
//!
//! It is a troubleshooting aid, not the record of truth: it runs with
//! `synchronous=NORMAL` and records are written behind the caller's back by
//! a writer thread that batches them. [`DeliveryLog::record`] waits only
//! when the queue is full (backpressure, never a silent drop);
//! [`DeliveryLog::flush`] waits until everything recorded before it is
//! committed and reports any record that could not be written.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, Row, params};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::sql::{self, Durability, ReadPool};
use crate::{Position, StoreError};

const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE deliveries (
    id             INTEGER PRIMARY KEY,
    received_at    TEXT    NOT NULL,
    request_id     TEXT    NOT NULL,
    source_id      TEXT,
    remote_addr    TEXT,
    status         INTEGER NOT NULL,
    reason         TEXT,
    message        TEXT,
    event_id       BLOB,
    position       INTEGER,
    body           BLOB    NOT NULL,
    body_truncated INTEGER NOT NULL
);
CREATE INDEX deliveries_by_time ON deliveries (received_at);
CREATE INDEX deliveries_by_request ON deliveries (request_id);
"#];

/// Requests (records and flushes) written per transaction.
const MAX_BATCH: usize = 512;
/// Records that may wait for the writer before `record` waits.
const QUEUE_CAPACITY: usize = 4096;
/// `list` without a limit returns at most this many records.
pub const DEFAULT_LIST_LIMIT: usize = 100;

/// One webhook call as it was received and answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    pub received_at: DateTime<Utc>,
    pub request_id: String,
    /// The configured source it came through, when it could be told.
    pub source_id: Option<String>,
    pub remote_addr: Option<String>,
    /// The HTTP status answered.
    pub status: u16,
    /// The error code, or `"accepted"` / `"duplicate"`.
    pub reason: Option<String>,
    pub message: Option<String>,
    /// The event the delivery produced or matched, if any.
    pub event_id: Option<Uuid>,
    pub position: Option<Position>,
    /// The request body, already cut by the caller to the body limit.
    pub body: Vec<u8>,
    /// True when `body` is a prefix of what was sent.
    pub body_truncated: bool,
}

/// A record as read back, with the row id the log gave it (increasing in
/// the order records were written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedDelivery {
    pub id: i64,
    pub record: DeliveryRecord,
}

/// Which records [`DeliveryLog::list`] returns. All conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryFilter {
    pub status: Option<u16>,
    pub source_id: Option<String>,
    /// Received at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// At most this many, [`DEFAULT_LIST_LIMIT`] when `None`.
    pub limit: Option<usize>,
}

/// Records removed per statement when pruning: the writer removes a chunk
/// between two batches of records, and goes on while nothing waits, so
/// that pruning a long backlog never holds up the calls being answered.
const PRUNE_CHUNK: usize = 1_000;
/// How often a log with a retention looks for records past it.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Handle to the delivery log. Cheap to clone; the writer thread stops when
/// [`close`](Self::close) is called or the last clone is dropped, after
/// writing what is queued.
#[derive(Clone)]
pub struct DeliveryLog {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    requests: Mutex<Option<mpsc::Sender<Request>>>,
    writer: sql::WriterThread,
    stopped_cleanly: Arc<AtomicBool>,
    readers: Arc<ReadPool>,
    /// Dropped with the handle: stops the thread that asks for pruning.
    _prune_ticker: Option<std::sync::mpsc::Sender<()>>,
}

enum Request {
    Record(Box<DeliveryRecord>),
    Flush(oneshot::Sender<Result<(), StoreError>>),
    /// Time to look for records past the retention.
    Prune,
}

impl DeliveryLog {
    /// Opens (creating file and parent directory if needed) the delivery log
    /// at `path` and starts its writer thread.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, None)
    }

    /// [`open`](Self::open), removing records received more than `keep`
    /// ago (`None`: kept for ever). The writer looks for them when it
    /// starts and then hourly, whether or not calls arrive, a thousand at
    /// a time between two of its batches.
    pub fn open_with(
        path: impl AsRef<Path>,
        keep: Option<chrono::Duration>,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let conn = sql::open_writer(&path, Durability::Normal, sql::BUSY_TIMEOUT, MIGRATIONS)?;
        // Every index of this file is keyed by time (request ids are UUID
        // v7 unless a caller sends its own), so writes touch the last pages
        // of each B-tree and a small cache holds them. A large one costs:
        // while the file is under 1 GiB, SQLite's page splits leave a page
        // number past the end in the cache, and every commit then walks the
        // whole cache to drop it (`pcache1TruncateUnsafe`, 5.6% of the
        // ingest profile with the 64 MiB cache of the event log).
        conn.pragma_update(None, "cache_size", -4_096)?;
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let stopped_cleanly = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            conn,
            failed: None,
            stopped_cleanly: Arc::clone(&stopped_cleanly),
            keep,
            next_prune: std::time::Instant::now(),
        };
        let thread = sql::WriterThread::spawn("delivery-log-writer", move || writer.run(rx))?;
        let prune_ticker = keep.map(|_| prune_ticker(&tx)).transpose()?;
        Ok(Self {
            inner: Arc::new(Inner {
                readers: Arc::new(ReadPool::new(path.clone(), 2)),
                path,
                requests: Mutex::new(Some(tx)),
                writer: thread,
                stopped_cleanly,
                _prune_ticker: prune_ticker,
            }),
        })
    }

    /// Queues `record` for writing. Waits only while the queue is full.
    pub async fn record(&self, record: DeliveryRecord) -> Result<(), StoreError> {
        self.send(Request::Record(Box::new(record))).await
    }

    /// Resolves once every record queued before this call is committed.
    /// Errs if any record since the previous flush could not be written.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (reply, done) = oneshot::channel();
        self.send(Request::Flush(reply)).await?;
        done.await.map_err(|_| self.inner.writer_gone())?
    }

    /// Records matching `filter`, newest first (by `received_at`, then by
    /// the order they were written).
    pub async fn list(&self, filter: DeliveryFilter) -> Result<Vec<LoggedDelivery>, StoreError> {
        let status = filter.status.map(i64::from);
        let since = filter.since.as_ref().map(sql::format_time);
        let limit = sql::limit_to_i64(filter.limit.unwrap_or(DEFAULT_LIST_LIMIT));
        let source_id = filter.source_id;
        self.inner
            .readers
            .run(move |conn| {
                // One statement for every filter combination, so it is
                // prepared once; a NULL parameter disables its condition.
                let mut stmt = conn.prepare_cached(
                    "SELECT id, received_at, request_id, source_id, remote_addr, status, reason, \
                     message, event_id, position, body, body_truncated FROM deliveries \
                     WHERE (?1 IS NULL OR status = ?1) \
                       AND (?2 IS NULL OR source_id = ?2) \
                       AND (?3 IS NULL OR received_at >= ?3) \
                     ORDER BY received_at DESC, id DESC LIMIT ?4",
                )?;
                let mut rows = stmt.query(params![status, source_id, since, limit])?;
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    out.push(decode(row)?);
                }
                Ok(out)
            })
            .await
    }

    /// Stops accepting records, writes what is queued and waits for the
    /// writer thread to end. Later records return `Closed`; every call,
    /// concurrent or later, returns only once the writer has ended.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.inner.stop_accepting()?;
        self.inner.writer.ended().await;
        self.inner.readers.close();
        if self.inner.stopped_cleanly.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(StoreError::Storage(
                "the delivery log writer panicked".into(),
            ))
        }
    }

    async fn send(&self, request: Request) -> Result<(), StoreError> {
        let sender = self
            .inner
            .requests
            .lock()
            .map_err(|_| StoreError::Storage("delivery log handle lock poisoned".into()))?
            .clone()
            .ok_or(StoreError::Closed)?;
        sender
            .send(request)
            .await
            .map_err(|_| self.inner.writer_gone())
    }
}

/// A thread that asks the writer to prune at once and then every
/// [`PRUNE_EVERY`], so that records past the retention go even while no
/// call arrives. It holds the queue only while it sends, and ends when the
/// returned sender is dropped or the log is closed.
fn prune_ticker(
    requests: &mpsc::Sender<Request>,
) -> Result<std::sync::mpsc::Sender<()>, StoreError> {
    let requests = requests.downgrade();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("delivery-log-prune".into())
        .spawn(move || {
            loop {
                let Some(sender) = requests.upgrade() else {
                    return;
                };
                if sender.blocking_send(Request::Prune).is_err() {
                    return;
                }
                drop(sender);
                match stopped.recv_timeout(PRUNE_EVERY) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            }
        })
        .map_err(|err| StoreError::Storage(format!("cannot start the pruning thread: {err}")))?;
    Ok(stop)
}

impl Inner {
    fn stop_accepting(&self) -> Result<(), StoreError> {
        self.requests
            .lock()
            .map_err(|_| StoreError::Storage("delivery log handle lock poisoned".into()))?
            .take();
        Ok(())
    }

    fn writer_gone(&self) -> StoreError {
        if self.stopped_cleanly.load(Ordering::Acquire) {
            StoreError::Closed
        } else {
            StoreError::Storage("the delivery log writer thread stopped unexpectedly".into())
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let requests = self.requests.get_mut().unwrap_or_else(|p| p.into_inner());
        requests.take();
        if self.writer.join() {
            tracing::error!("the delivery log writer thread panicked");
        }
        self.readers.close();
    }
}

impl fmt::Debug for DeliveryLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliveryLog")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

fn decode(row: &Row<'_>) -> Result<LoggedDelivery, StoreError> {
    let id: i64 = row.get(0)?;
    let corrupt =
        |reason: String| StoreError::Storage(format!("delivery {id} unreadable: {reason}"));
    let received_at: String = row.get(1)?;
    let status: i64 = row.get(5)?;
    let event_id: Option<Vec<u8>> = row.get(8)?;
    let position: Option<i64> = row.get(9)?;
    Ok(LoggedDelivery {
        id,
        record: DeliveryRecord {
            received_at: sql::parse_time(&received_at).map_err(corrupt)?,
            request_id: row.get(2)?,
            source_id: row.get(3)?,
            remote_addr: row.get(4)?,
            status: u16::try_from(status).map_err(|_| corrupt(format!("status {status}")))?,
            reason: row.get(6)?,
            message: row.get(7)?,
            event_id: event_id
                .map(|bytes| Uuid::from_slice(&bytes))
                .transpose()
                .map_err(|err| corrupt(format!("event id: {err}")))?,
            position: position
                .map(u64::try_from)
                .transpose()
                .map_err(|_| corrupt("negative position".into()))?,
            body: row.get(10)?,
            body_truncated: row.get(11)?,
        },
    })
}

struct Writer {
    conn: Connection,
    /// Records lost since the last flush, and the last cause: reported to
    /// the next flush so a failure is never only in the logs.
    failed: Option<(usize, StoreError)>,
    stopped_cleanly: Arc<AtomicBool>,
    /// Records older than this are removed; `None` keeps them all.
    keep: Option<chrono::Duration>,
    next_prune: std::time::Instant,
}

impl Writer {
    fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let mut records = Vec::new();
        let mut flushes = Vec::new();
        while let Some(first) = requests.blocking_recv() {
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(request) = next {
                match request {
                    Request::Record(record) => records.push(record),
                    Request::Flush(reply) => flushes.push(reply),
                    Request::Prune => self.next_prune = std::time::Instant::now(),
                }
                taken += 1;
                next = if taken < MAX_BATCH {
                    requests.try_recv().ok()
                } else {
                    None
                };
            }
            if !records.is_empty() {
                self.write(&records);
                records.clear();
            }
            if !flushes.is_empty() {
                let result = match self.failed.take() {
                    None => Ok(()),
                    Some((lost, err)) => Err(StoreError::Storage(format!(
                        "{lost} delivery record(s) could not be written: {err}"
                    ))),
                };
                for reply in flushes.drain(..) {
                    let _ = reply.send(result.clone());
                }
            }
            // When due, a chunk after every batch, and more while nothing
            // waits: a backlog cut short by a request goes on after it.
            while self.prune_if_due() && requests.is_empty() {}
        }
        if let Some((lost, err)) = &self.failed {
            tracing::error!(lost, error = %err, "delivery log closed with unwritten records");
        }
        self.stopped_cleanly.store(true, Ordering::Release);
    }

    /// Writes `records` in one transaction. A record with a value SQLite
    /// cannot hold (a position past its integers) is left out and reported
    /// alone, so that it costs only itself; a failure of the transaction
    /// (the file busy, an I/O error) is the whole batch's.
    fn write(&mut self, records: &[Box<DeliveryRecord>]) {
        let mut rows = Vec::with_capacity(records.len());
        for record in records {
            match record
                .position
                .map(|p| sql::to_i64(p, "position"))
                .transpose()
            {
                Ok(position) => rows.push((&**record, position)),
                Err(err) => self.lost(1, err),
            }
        }
        if rows.is_empty() {
            return;
        }
        if let Err(err) = self.insert(&rows) {
            self.lost(rows.len(), err);
        }
    }

    /// Removes up to [`PRUNE_CHUNK`] records past the retention, if it is
    /// time to look. True when a full chunk went, so more may be left: the
    /// writer then looks again after its next batch (or at once, when
    /// nothing waits).
    fn prune_if_due(&mut self) -> bool {
        let Some(keep) = self.keep else {
            return false;
        };
        let now = std::time::Instant::now();
        if now < self.next_prune {
            return false;
        }
        // A retention reaching before chrono's first date keeps everything.
        let Some(cutoff) = Utc::now().checked_sub_signed(keep) else {
            self.next_prune = now + PRUNE_EVERY;
            return false;
        };
        let cutoff = sql::format_time(&cutoff);
        let removed = self
            .conn
            .prepare_cached(
                "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries \
                 WHERE received_at < ?1 ORDER BY received_at LIMIT ?2)",
            )
            .and_then(|mut stmt| stmt.execute(params![cutoff, PRUNE_CHUNK as i64]));
        let full = matches!(removed, Ok(n) if n == PRUNE_CHUNK);
        if let Err(err) = &removed {
            tracing::warn!(error = %err, "delivery log: cannot remove records past the retention");
        }
        self.next_prune = if full { now } else { now + PRUNE_EVERY };
        full
    }

    fn lost(&mut self, records: usize, err: StoreError) {
        tracing::error!(error = %err, records, "delivery log write failed");
        let lost = self.failed.as_ref().map_or(0, |(n, _)| *n) + records;
        self.failed = Some((lost, err));
    }

    fn insert(&mut self, rows: &[(&DeliveryRecord, Option<i64>)]) -> Result<(), StoreError> {
        let tx = sql::begin_immediate(&mut self.conn)?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO deliveries (received_at, request_id, source_id, remote_addr, status, \
                 reason, message, event_id, position, body, body_truncated) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?;
            for &(record, position) in rows {
                stmt.execute(params![
                    sql::format_time(&record.received_at),
                    record.request_id,
                    record.source_id,
                    record.remote_addr,
                    i64::from(record.status),
                    record.reason,
                    record.message,
                    record.event_id.as_ref().map(|id| id.as_bytes().as_slice()),
                    position,
                    record.body,
                    record.body_truncated,
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn record(secs: i64, status: u16, source: Option<&str>) -> DeliveryRecord {
        DeliveryRecord {
            received_at: Utc
                .timestamp_opt(1_700_000_000 + secs, 123_456_789)
                .unwrap(),
            request_id: format!("req-{secs}"),
            source_id: source.map(str::to_owned),
            remote_addr: Some("192.0.2.7:4711".into()),
            status,
            reason: Some(
                if status == 202 {
                    "accepted"
                } else {
                    "invalid_signature"
                }
                .into(),
            ),
            message: (status != 202).then(|| "signature mismatch".to_owned()),
            event_id: (status == 202).then(Uuid::new_v4),
            position: (status == 202).then_some(secs as u64),
            body: format!("{{\"n\": {secs}, \"x\": \"é\\u0000\"}}\n").into_bytes(),
            body_truncated: secs % 2 == 0,
        }
    }

    fn open() -> (tempfile::TempDir, DeliveryLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = DeliveryLog::open(dir.path().join("nested/deliveries.sqlite")).unwrap();
        (dir, log)
    }

    /// A record that cannot be written (a position past SQLite's integers)
    /// is reported and lost alone; the records batched with it are kept.
    #[test]
    fn a_bad_record_costs_only_itself() {
        let (_dir, mut writer) = test_writer(None);
        let mut bad = record(2, 202, None);
        bad.position = Some(u64::MAX);
        let batch: Vec<Box<DeliveryRecord>> = [record(1, 202, None), bad, record(3, 401, None)]
            .into_iter()
            .map(Box::new)
            .collect();
        writer.write(&batch);
        let (lost, err) = writer.failed.take().expect("the bad record is reported");
        assert_eq!(lost, 1);
        assert!(err.to_string().contains("out of range"), "{err}");
        let kept: Vec<String> = writer
            .conn
            .prepare("SELECT request_id FROM deliveries ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(kept, ["req-1", "req-3"]);
    }

    fn test_writer(keep: Option<chrono::Duration>) -> (tempfile::TempDir, Writer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deliveries.sqlite");
        let conn =
            sql::open_writer(&path, Durability::Normal, sql::BUSY_TIMEOUT, MIGRATIONS).unwrap();
        let writer = Writer {
            conn,
            failed: None,
            stopped_cleanly: Arc::default(),
            keep,
            next_prune: std::time::Instant::now(),
        };
        (dir, writer)
    }

    fn aged(days: i64, i: i64) -> Box<DeliveryRecord> {
        let mut r = record(i, 401, None);
        r.received_at = Utc::now() - chrono::Duration::days(days);
        Box::new(r)
    }

    fn count(writer: &Writer) -> i64 {
        writer
            .conn
            .query_row("SELECT count(*) FROM deliveries", [], |r| r.get(0))
            .unwrap()
    }

    /// Past the retention, a chunk goes per look; a full chunk makes the
    /// next look due at once, a partial one an hour later.
    #[test]
    fn pruning_removes_a_chunk_at_a_time_then_waits_an_hour() {
        let (_dir, mut writer) = test_writer(Some(chrono::Duration::days(30)));
        let old = PRUNE_CHUNK as i64 + 500;
        let mut batch: Vec<_> = (0..old).map(|i| aged(31, i)).collect();
        batch.push(aged(29, old));
        writer.write(&batch);
        assert!(writer.prune_if_due(), "a full chunk");
        assert_eq!(count(&writer), 501);
        assert!(!writer.prune_if_due(), "the rest");
        assert_eq!(count(&writer), 1);
        writer.write(&[aged(40, old + 1)]);
        assert!(!writer.prune_if_due(), "not due for an hour");
        assert_eq!(count(&writer), 2);
    }

    /// A retention too long for chrono's calendar keeps everything rather
    /// than ending the writer.
    #[test]
    fn a_retention_past_the_calendar_keeps_everything() {
        let (_dir, mut writer) = test_writer(Some(chrono::Duration::days(i64::from(u32::MAX))));
        writer.write(&[aged(31, 1)]);
        assert!(!writer.prune_if_due());
        assert_eq!(count(&writer), 1);
    }

    /// Opened with a retention, the log removes what is past it without
    /// waiting for a call; without one it keeps everything.
    #[tokio::test]
    async fn a_log_opened_with_a_retention_prunes_without_calls() {
        let dir = tempfile::tempdir().unwrap();
        let all = || DeliveryFilter {
            limit: Some(usize::MAX),
            ..DeliveryFilter::default()
        };
        let old = PRUNE_CHUNK as i64 + 500;
        for keep in [None, Some(chrono::Duration::days(30))] {
            let path = dir.path().join(format!("{keep:?}.sqlite"));
            let log = DeliveryLog::open(&path).unwrap();
            for i in 0..old {
                log.record(*aged(31, i)).await.unwrap();
            }
            log.record(*aged(29, old)).await.unwrap();
            log.close().await.unwrap();

            // Nothing is sent to the writer: only the pruning thread wakes it.
            let log = DeliveryLog::open_with(&path, keep).unwrap();
            let left = if keep.is_some() { 1 } else { old as usize + 1 };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while log.list(all()).await.unwrap().len() != left {
                assert!(
                    std::time::Instant::now() < deadline,
                    "keep {keep:?}: not pruned"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            log.close().await.unwrap();
        }
    }

    #[tokio::test]
    async fn record_flush_list_round_trips_newest_first() {
        let (_dir, log) = open();
        let records: Vec<_> = (1..=5)
            .map(|i| record(i, if i % 2 == 0 { 401 } else { 202 }, Some("lms")))
            .collect();
        for r in &records {
            log.record(r.clone()).await.unwrap();
        }
        log.flush().await.unwrap();

        let listed = log.list(DeliveryFilter::default()).await.unwrap();
        let got: Vec<_> = listed.iter().map(|l| l.record.clone()).collect();
        let mut want = records.clone();
        want.reverse();
        assert_eq!(got, want);
        assert!(listed.windows(2).all(|w| w[0].id > w[1].id));
    }

    #[tokio::test]
    async fn newest_first_is_by_received_time_not_write_order() {
        let (_dir, log) = open();
        log.record(record(10, 202, None)).await.unwrap();
        log.record(record(5, 202, None)).await.unwrap();
        log.record(record(7, 202, None)).await.unwrap();
        log.flush().await.unwrap();
        let ids: Vec<_> = log
            .list(DeliveryFilter::default())
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.record.request_id)
            .collect();
        assert_eq!(ids, ["req-10", "req-7", "req-5"]);
    }

    #[tokio::test]
    async fn filters_combine() {
        let (_dir, log) = open();
        for i in 0..20 {
            let source = match i % 3 {
                0 => None,
                1 => Some("lms"),
                _ => Some("crm"),
            };
            log.record(record(i, if i % 4 == 0 { 401 } else { 202 }, source))
                .await
                .unwrap();
        }
        log.flush().await.unwrap();

        let by_status = log
            .list(DeliveryFilter {
                status: Some(401),
                ..Default::default()
            })
            .await
            .unwrap();
        let secs: Vec<_> = by_status
            .iter()
            .map(|l| l.record.request_id.clone())
            .collect();
        assert_eq!(secs, ["req-16", "req-12", "req-8", "req-4", "req-0"]);

        let lms_since = log
            .list(DeliveryFilter {
                source_id: Some("lms".into()),
                since: Some(Utc.timestamp_opt(1_700_000_010, 123_456_789).unwrap()),
                ..Default::default()
            })
            .await
            .unwrap();
        let secs: Vec<_> = lms_since
            .iter()
            .map(|l| l.record.request_id.clone())
            .collect();
        assert_eq!(secs, ["req-19", "req-16", "req-13", "req-10"]);

        let limited = log
            .list(DeliveryFilter {
                limit: Some(3),
                ..Default::default()
            })
            .await
            .unwrap();
        let secs: Vec<_> = limited
            .iter()
            .map(|l| l.record.request_id.clone())
            .collect();
        assert_eq!(secs, ["req-19", "req-18", "req-17"]);

        let none = log
            .list(DeliveryFilter {
                status: Some(500),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(none.is_empty());
    }

    #[tokio::test]
    async fn default_limit_applies() {
        let (_dir, log) = open();
        for i in 0..(DEFAULT_LIST_LIMIT as i64 + 5) {
            log.record(record(i, 202, None)).await.unwrap();
        }
        log.flush().await.unwrap();
        let all = log.list(DeliveryFilter::default()).await.unwrap();
        assert_eq!(all.len(), DEFAULT_LIST_LIMIT);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_are_all_kept_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deliveries.sqlite");
        let log = DeliveryLog::open(&path).unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                tokio::spawn(async move {
                    for i in 0..100 {
                        log.record(record(t * 1000 + i, 202, Some("lms")))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        // close (not flush) must also write everything queued.
        log.close().await.unwrap();
        assert!(matches!(
            log.record(record(0, 202, None)).await,
            Err(StoreError::Closed)
        ));
        assert!(matches!(log.flush().await, Err(StoreError::Closed)));
        drop(log);

        let log = DeliveryLog::open(&path).unwrap();
        let all = log
            .list(DeliveryFilter {
                limit: Some(usize::MAX),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(all.len(), 800);
    }
}
