//! SQLite-only behaviour; the port's contract runs in `tests/contract.rs`.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use futures::StreamExt;
use proptest::prelude::*;

use super::*;
use crate::contract::{event, id};

fn simple(n: u64) -> NewEvent {
    event(n, &format!("{{\"n\":{n}}}"))
}

/// An outside writer holding the lock, and `n` appends (to three streams)
/// sent meanwhile: the first blocks the writer thread, the others pile up
/// in its queue. Roll the returned connection back to let them through.
async fn appends_behind_a_held_lock(
    dir: &tempfile::TempDir,
    store: &SqliteEventStore,
    n: u64,
) -> (
    Connection,
    Vec<tokio::task::JoinHandle<Result<AppendOutcome, AppendError>>>,
) {
    let blocker = Connection::open(dir.path().join("events.sqlite")).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let tasks = (0..n)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .append(
                        &format!("s{}", n % 3),
                        ExpectedRevision::Any,
                        vec![simple(n)],
                    )
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    (blocker, tasks)
}

fn temp_store() -> (tempfile::TempDir, SqliteEventStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteEventStore::open(dir.path().join("events.sqlite")).unwrap();
    (dir, store)
}

async fn everything(store: &SqliteEventStore) -> Vec<RecordedEvent> {
    store
        .read_all(ReadAll {
            from: 0,
            limit: usize::MAX,
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn data_survives_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    // A parent that does not exist yet: open creates it.
    let path = dir.path().join("data/nested/events.sqlite");
    let store = SqliteEventStore::open(&path).unwrap();
    store
        .append("a", ExpectedRevision::NoStream, vec![simple(1), simple(2)])
        .await
        .unwrap();
    store
        .append(
            "b",
            ExpectedRevision::Any,
            vec![event(3, "{\"é\":\"\u{1F980}\"}\n")],
        )
        .await
        .unwrap();
    let before = everything(&store).await;
    store.close().await.unwrap();
    drop(store);

    let store = SqliteEventStore::open(&path).unwrap();
    assert_eq!(everything(&store).await, before);
    assert_eq!(store.head().await.unwrap(), 3);
    // Positions and revisions carry on where they were.
    let out = store
        .append("a", ExpectedRevision::Exact(1), vec![simple(4)])
        .await
        .unwrap();
    assert_eq!((out.events[0].revision, out.events[0].position), (2, 4));
    // And a redelivery after the restart is still recognised.
    let again = store
        .append("a", ExpectedRevision::NoStream, vec![simple(1)])
        .await
        .unwrap();
    assert!(again.events[0].duplicate);
    assert_eq!(again.events[0].position, 1);
}

#[tokio::test]
async fn direct_update_and_delete_are_refused() {
    let (dir, store) = temp_store();
    store
        .append("s", ExpectedRevision::Any, vec![simple(1), simple(2)])
        .await
        .unwrap();
    let conn = Connection::open(dir.path().join("events.sqlite")).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();

    let update = conn.execute("UPDATE events SET data = '{}' WHERE position = 1", []);
    let err = update.expect_err("UPDATE must fail").to_string();
    assert!(err.contains("immutable"), "{err}");
    let delete = conn.execute("DELETE FROM events WHERE position = 2", []);
    let err = delete.expect_err("DELETE must fail").to_string();
    assert!(err.contains("immutable"), "{err}");
    // The whole-table form SQLite would otherwise truncate without looking.
    assert!(conn.execute("DELETE FROM events", []).is_err());

    // A hand-made insert that would leave a gap is refused too.
    let gap = conn.execute(
        "INSERT INTO events (position, id, stream, revision, event_type, schema_version, data, \
         received_at, source_id, request_id, content_hash) \
         VALUES (10, x'00112233445566778899aabbccddeeff', 't', 0, 'T', 1, '{}', \
         '2025-01-01T00:00:00.000000000Z', 's', 'r', 'h')",
        [],
    );
    assert!(gap.unwrap_err().to_string().contains("head + 1"));

    let events = everything(&store).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].data, "{\"n\":1}");
}

#[tokio::test]
async fn schema_version_is_recorded_and_a_newer_one_refused() {
    let (dir, store) = temp_store();
    store.close().await.unwrap();
    let path = dir.path().join("events.sqlite");
    let conn = Connection::open(&path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, MIGRATIONS.len() as i64);
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");

    conn.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(conn);
    let err = SqliteEventStore::open(&path).unwrap_err();
    assert!(err.to_string().contains("newer"), "{err}");
}

#[tokio::test]
async fn after_close_appends_and_probes_are_closed() {
    let (_dir, store) = temp_store();
    store.writable().await.unwrap();
    store
        .append("s", ExpectedRevision::Any, vec![simple(1)])
        .await
        .unwrap();
    let other_handle = store.clone();
    store.close().await.unwrap();
    // A second close is harmless.
    store.close().await.unwrap();

    let append = other_handle
        .append("s", ExpectedRevision::Any, vec![simple(2)])
        .await;
    assert!(
        matches!(append, Err(AppendError::Store(StoreError::Closed))),
        "{append:?}"
    );
    assert!(matches!(
        other_handle.writable().await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(other_handle.head().await, Err(StoreError::Closed)));
    // Checks that need no database still answer precisely.
    assert!(matches!(
        other_handle
            .append("s", ExpectedRevision::Any, Vec::new())
            .await,
        Err(AppendError::Empty)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_appends_finish_on_close_and_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.sqlite");
    let store = SqliteEventStore::open(&path).unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                let result = store
                    .append(
                        &format!("s{}", n % 7),
                        ExpectedRevision::Any,
                        vec![simple(n)],
                    )
                    .await;
                (n, result)
            })
        })
        .collect();
    tokio::task::yield_now().await;
    store.close().await.unwrap();

    let mut acknowledged = BTreeSet::new();
    for task in tasks {
        let (n, result) = task.await.unwrap();
        match result {
            Ok(_) => {
                acknowledged.insert(id(n));
            }
            Err(AppendError::Store(StoreError::Closed)) => {}
            Err(other) => panic!("append {n}: {other:?}"),
        }
    }
    drop(store);

    let store = SqliteEventStore::open(&path).unwrap();
    let recorded: BTreeSet<_> = everything(&store).await.into_iter().map(|e| e.id).collect();
    assert_eq!(
        recorded, acknowledged,
        "exactly the acknowledged appends are in the log"
    );
}

/// Appends already queued when `close` is called are committed and
/// acknowledged, not refused: an outside writer holds the lock so that all
/// of them are waiting in the queue when the store is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_queued_before_close_are_committed() {
    let (dir, store) = temp_store();
    let (blocker, tasks) = appends_behind_a_held_lock(&dir, &store, 50).await;
    let closing = tokio::spawn({
        let store = store.clone();
        async move { store.close().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!closing.is_finished(), "close waits for the queued appends");
    blocker.execute_batch("ROLLBACK").unwrap();
    closing.await.unwrap().unwrap();
    let mut acknowledged = BTreeSet::new();
    for (n, task) in (0..50).zip(tasks) {
        task.await.unwrap().unwrap();
        acknowledged.insert(id(n));
    }
    drop(store);

    let store = SqliteEventStore::open(dir.path().join("events.sqlite")).unwrap();
    let recorded: BTreeSet<_> = everything(&store).await.into_iter().map(|e| e.id).collect();
    assert_eq!(recorded, acknowledged);
}

/// A close concurrent with another (a node drained while a signal stops
/// it) returns only once the queued appends are committed, not at once.
#[tokio::test]
async fn every_close_waits_for_the_queued_appends() {
    let (dir, store) = temp_store();
    let (blocker, tasks) = appends_behind_a_held_lock(&dir, &store, 20).await;
    let close = || {
        let store = store.clone();
        tokio::spawn(async move { store.close().await })
    };
    let first = close();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = close();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !second.is_finished(),
        "a second close returned while appends were still queued"
    );
    blocker.execute_batch("ROLLBACK").unwrap();
    second.await.unwrap().unwrap();
    first.await.unwrap().unwrap();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let on_disk: i64 = Connection::open(dir.path().join("events.sqlite"))
        .unwrap()
        .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(on_disk, 20);
    assert!(matches!(store.close().await, Ok(())), "a later close");
}

#[tokio::test]
async fn subscription_ends_when_the_store_is_closed() {
    let (_dir, store) = temp_store();
    store
        .append("s", ExpectedRevision::Any, vec![simple(1)])
        .await
        .unwrap();
    let mut sub = store.subscribe_all(0);
    assert_eq!(sub.next().await.unwrap().unwrap().position, 1);
    let waiting = tokio::spawn(async move { sub.next().await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.close().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("subscription must end on close")
        .unwrap();
    assert!(end.is_none(), "ended without error: {end:?}");
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_writer() {
    let (dir, store) = temp_store();
    store
        .append("s", ExpectedRevision::Any, vec![simple(1)])
        .await
        .unwrap();
    let mut sub = store.subscribe_all(2);
    drop(store);
    // The writer is joined in Drop, so its watch is already closed.
    let end = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("subscription must end when the store is dropped");
    assert!(end.is_none(), "{end:?}");
    let store = SqliteEventStore::open(dir.path().join("events.sqlite")).unwrap();
    assert_eq!(store.head().await.unwrap(), 1);
}

#[tokio::test]
async fn extreme_read_arguments_are_not_errors() {
    let (_dir, store) = temp_store();
    store
        .append("s", ExpectedRevision::Any, vec![simple(1)])
        .await
        .unwrap();
    assert!(
        store
            .read_stream("s", u64::MAX, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .read_all(ReadAll {
                from: u64::MAX,
                limit: usize::MAX
            })
            .await
            .unwrap()
            .is_empty()
    );
    let conflict = store
        .append("s", ExpectedRevision::Exact(u64::MAX), vec![simple(2)])
        .await;
    assert!(matches!(
        conflict,
        Err(AppendError::Conflict {
            actual: Some(0),
            ..
        })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_groups_still_commit_everything() {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        max_batch: 2,
        queue_capacity: 4,
        max_idle_readers: 1,
        subscription_batch: 3,
        ..SqliteOptions::default()
    };
    let store = SqliteEventStore::open_with(dir.path().join("e.sqlite"), options).unwrap();
    let tasks: Vec<_> = (0..40)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .append("s", ExpectedRevision::Any, vec![simple(n % 20)])
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut positions: HashMap<Uuid, Position> = HashMap::new();
    for task in tasks {
        let out = task.await.unwrap();
        let e = out.events[0];
        assert_eq!(*positions.entry(e.id).or_insert(e.position), e.position);
    }
    let mut sub = store.subscribe_all(0);
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.push(sub.next().await.unwrap().unwrap().position);
    }
    assert_eq!(seen, (1..=20).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_queued_behind_a_busy_writer_share_one_commit() {
    let (dir, store) = temp_store();
    let (blocker, tasks) = appends_behind_a_held_lock(&dir, &store, 50).await;
    blocker.execute_batch("ROLLBACK").unwrap();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let stats = store.commit_stats();
    assert_eq!(stats.appends, 50);
    assert!(
        stats.groups <= 3,
        "expected the queue to commit together: {stats:?}"
    );
    assert_eq!(store.head().await.unwrap(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_fails_the_group_and_readiness_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.sqlite");
    let options = SqliteOptions {
        busy_timeout: Duration::from_millis(50),
        ..SqliteOptions::default()
    };
    let store = SqliteEventStore::open_with(&path, options).unwrap();
    store
        .append("s", ExpectedRevision::Any, vec![simple(1)])
        .await
        .unwrap();
    let blocker = Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();

    let failed = futures::future::join_all((2..6).map(|n| {
        let store = store.clone();
        async move {
            store
                .append("s", ExpectedRevision::Any, vec![simple(n)])
                .await
        }
    }))
    .await;
    for result in failed {
        assert!(
            matches!(result, Err(AppendError::Store(StoreError::Storage(_)))),
            "{result:?}"
        );
    }
    assert!(matches!(
        store.writable().await,
        Err(StoreError::Storage(_))
    ));

    blocker.execute_batch("ROLLBACK").unwrap();
    store.writable().await.unwrap();
    let out = store
        .append("s", ExpectedRevision::Exact(0), vec![simple(2)])
        .await
        .unwrap();
    assert_eq!(
        out.events[0].position, 2,
        "nothing of the failed group was kept"
    );
}

#[derive(Debug, Clone)]
struct Op {
    stream: u64,
    ids: Vec<u64>,
}

/// Ops whose ids belong to their stream (`id % 3 == stream`), so the only
/// refusals possible are partial duplicates.
fn op() -> impl Strategy<Value = Op> {
    (0u64..3, proptest::collection::btree_set(0u64..6, 1..4)).prop_map(|(stream, slots)| Op {
        stream,
        ids: slots.into_iter().map(|s| s * 3 + stream).collect(),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// However appends with repeated ids interleave, the log holds one
    /// record per distinct accepted id, gap-free, and every answer agrees
    /// with the log.
    #[test]
    fn interleaved_appends_keep_one_record_per_id(
        rounds in proptest::collection::vec(proptest::collection::vec(op(), 1..6), 1..6)
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let (_dir, store) = temp_store();
            let mut answers = Vec::new();
            for round in rounds {
                // Each round's ops race one another.
                let results = futures::future::join_all(round.iter().map(|op| {
                    let store = store.clone();
                    let op = op.clone();
                    async move {
                        let events = op.ids.iter().map(|&n| simple(n)).collect();
                        let result = store
                            .append(&format!("s{}", op.stream), ExpectedRevision::Any, events)
                            .await;
                        (op, result)
                    }
                }))
                .await;
                answers.extend(results);
            }

            let log = everything(&store).await;
            let by_id: HashMap<Uuid, &RecordedEvent> = log.iter().map(|e| (e.id, e)).collect();
            assert_eq!(by_id.len(), log.len(), "one record per id");
            assert_eq!(
                log.iter().map(|e| e.position).collect::<Vec<_>>(),
                (1..=log.len() as u64).collect::<Vec<_>>()
            );
            let mut accepted = BTreeSet::new();
            for (op, result) in &answers {
                match result {
                    Ok(out) => {
                        for (n, e) in op.ids.iter().zip(&out.events) {
                            let recorded = by_id.get(&id(*n)).expect("acknowledged id is recorded");
                            assert_eq!(e.position, recorded.position);
                            assert_eq!(e.revision, recorded.revision);
                            accepted.insert(id(*n));
                        }
                    }
                    Err(AppendError::PartialDuplicate { .. }) => {}
                    Err(other) => panic!("unexpected refusal {other:?}"),
                }
                if op.ids.len() == 1 {
                    assert!(result.is_ok(), "a single-id append is never partial");
                }
            }
            let recorded: BTreeSet<Uuid> = by_id.keys().copied().collect();
            assert_eq!(recorded, accepted);
        });
    }
}

/// `tracker project` follows a file that `tracker serve` (another process,
/// another writer) appends to: a caught-up subscription must see appends it
/// was never told about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_sees_appends_of_another_handle_on_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.sqlite");
    let follower = SqliteEventStore::open(&path).unwrap();
    let appender = SqliteEventStore::open(&path).unwrap();
    let mut sub = follower.subscribe_all(1);
    // Caught up on an empty log: nothing yet.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), sub.next())
            .await
            .is_err()
    );
    for n in 1..=3 {
        appender
            .append("s", ExpectedRevision::Any, vec![simple(n)])
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), sub.next())
            .await
            .expect("the follower saw the other handle's append")
            .unwrap()
            .unwrap();
        assert_eq!(got.position, n);
    }
    assert_eq!(follower.head().await.unwrap(), 3);
}

/// With checkpoints off the writer thread, something must still move the WAL
/// into the database file, or the WAL would grow for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_checkpointer_moves_the_wal_into_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.sqlite");
    let store = SqliteEventStore::open(&path).unwrap();
    let data = format!("{{\"pad\":\"{}\"}}", "x".repeat(2000));
    for n in 1..=2000u64 {
        store
            .append("s", ExpectedRevision::Any, vec![event(n, &data)])
            .await
            .unwrap();
    }
    // Appends alone leave them in the WAL; the checkpointer runs every 100 ms.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let db = std::fs::metadata(&path).unwrap().len();
        if db > 4_000_000 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "database file still {db} bytes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Closing runs a last full checkpoint and empties the WAL.
    store.close().await.unwrap();
    let wal = dir.path().join("events.sqlite-wal");
    assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0), 0);
}

/// A passive checkpoint alone never rewinds the WAL while a writer commits
/// back to back, so under sustained appends the WAL file grew by every
/// page written (3.4 GB after 300k events). Past `wal_restart_frames` the
/// checkpointer has the writer rewind it, so it stays near that size plus
/// what one interval writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_appends_keep_the_wal_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.sqlite");
    let wal = dir.path().join("events.sqlite-wal");
    let options = SqliteOptions {
        checkpoint_interval: Duration::from_millis(50),
        wal_restart_frames: 256,
        ..SqliteOptions::default()
    };
    let store = SqliteEventStore::open_with(&path, options).unwrap();
    let data = format!("{{\"pad\":\"{}\"}}", "x".repeat(2000));
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let store = store.clone();
            let data = data.clone();
            tokio::spawn(async move {
                for n in 0..1000u64 {
                    let id = w * 1000 + n + 1;
                    store
                        .append(
                            &format!("s-{w}"),
                            ExpectedRevision::Any,
                            vec![event(id, &data)],
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let mut largest_wal = 0;
    while !writers.iter().all(|w| w.is_finished()) {
        largest_wal = largest_wal.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for w in writers {
        w.await.unwrap();
    }
    largest_wal = largest_wal.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    // 8,000 events of 2 KB: about 120 MB of pages went through the WAL
    // (what it grew to without rewinds); with them it stays near 5 MB. The
    // bound leaves room for a loaded machine stretching the interval.
    assert_eq!(store.head().await.unwrap(), 8000);
    assert!(
        largest_wal < 32 << 20,
        "the WAL grew to {largest_wal} bytes (restart above 256 frames = 1 MiB)"
    );
    store.close().await.unwrap();
}

/// The SQLite store with the trait's default stream-set reads: the
/// reference the index reads must agree with.
#[derive(Debug)]
struct Defaulted(SqliteEventStore);

#[async_trait]
impl EventStore for Defaulted {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedRevision,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, AppendError> {
        self.0.append(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.0.read_stream(stream, from, limit).await
    }

    async fn read_all(&self, read: ReadAll) -> Result<Vec<RecordedEvent>, StoreError> {
        self.0.read_all(read).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        self.0.head().await
    }

    fn subscribe_all(&self, from: Position) -> Subscription {
        self.0.subscribe_all(from)
    }

    async fn writable(&self) -> Result<(), StoreError> {
        self.0.writable().await
    }
}

/// Institutions whose ids begin one another's (1, 12, 123), each with a
/// few learners and its own stream, interleaved in the log; more than
/// [`crate::SCAN_CHUNK`] events, so the default read crosses its chunks.
async fn institutions_log(store: &SqliteEventStore) -> Vec<RecordedEvent> {
    let mut n = 0;
    for round in 0..400u64 {
        for institution in [1u64, 12, 123, 2] {
            let stream = match (round + institution) % 5 {
                0 => format!("institution-{institution}"),
                k => format!("learner-{institution}-{}", k + round % 3),
            };
            n += 1;
            store
                .append(&stream, ExpectedRevision::Any, vec![simple(n)])
                .await
                .unwrap();
        }
    }
    // Names that a careless prefix or range would take in.
    for stream in [
        "learner-1",
        "learner-1.5",
        "learner-10-1",
        "institution-12-x",
    ] {
        n += 1;
        store
            .append(stream, ExpectedRevision::Any, vec![simple(n)])
            .await
            .unwrap();
    }
    everything(store).await
}

fn institution(i: u64) -> StreamSet {
    StreamSet::new(format!("learner-{i}-"), format!("institution-{i}"))
}

/// Reads the whole set from `from`, `chunk` events at a time, decoded;
/// checks that only the last read comes back short. Returns the events and
/// how many reads it took.
async fn read_set_decoded(
    store: &dyn EventStore,
    streams: &StreamSet,
    from: Position,
    chunk: usize,
) -> (Vec<RecordedEvent>, usize) {
    let mut events = Vec::new();
    let mut next = from;
    let mut reads = 0;
    loop {
        let read = store
            .read_streams(
                streams,
                ReadAll {
                    from: next,
                    limit: chunk,
                },
            )
            .await
            .unwrap();
        reads += 1;
        assert!(read.len() <= chunk);
        let short = read.len() < chunk;
        if let Some(last) = read.last() {
            next = last.position + 1;
        }
        events.extend(read);
        if short {
            return (events, reads);
        }
    }
}

/// Reads the whole set from `from`, `chunk` events at a time, as an export
/// does, decoded and then raw; checks that only the last read of each
/// comes back short.
async fn read_set(
    store: &dyn EventStore,
    streams: &StreamSet,
    from: Position,
    chunk: usize,
) -> (Vec<RecordedEvent>, RawEvents) {
    let (events, _) = read_set_decoded(store, streams, from, chunk).await;
    let mut raw = RawEvents::default();
    let mut buf = RawEvents::default();
    let mut next = from;
    loop {
        buf = store
            .read_streams_raw(
                streams,
                ReadAll {
                    from: next,
                    limit: chunk,
                },
                buf,
            )
            .await
            .unwrap();
        for e in buf.iter() {
            raw.push(&e);
        }
        if let Some(last) = buf.last_position() {
            next = last + 1;
        }
        if buf.len() < chunk {
            break;
        }
    }
    (events, raw)
}

#[tokio::test]
async fn stream_set_reads_equal_filtering_the_log() {
    let (_dir, store) = temp_store();
    let log = institutions_log(&store).await;
    let defaulted = Defaulted(store.clone());
    // Institutions, and sets sparse enough (one learner's stream, a
    // stream that does not exist) that a window of positions comes back
    // part full and the read goes on in the next one.
    let sets = [1u64, 12, 123, 2, 10, 7]
        .map(|i| (i.to_string(), institution(i)))
        .into_iter()
        .chain([
            (
                "sparse".to_owned(),
                StreamSet::new("learner-123-1", "institution-2"),
            ),
            ("none".to_owned(), StreamSet::new("learner-123-1", "x")),
        ]);
    for (i, set) in sets {
        for from in [0, 1, 2, 5, 700, 1_599, 1_600, 1_604, 1_605, 5_000] {
            let expected: Vec<RecordedEvent> = log
                .iter()
                .filter(|e| e.position >= from && set.contains(e.stream.as_bytes()))
                .cloned()
                .collect();
            let mut expected_raw = RawEvents::default();
            for e in &expected {
                expected_raw.push_recorded(e);
            }
            for chunk in [1, 7, 100, 1_000, 5_000] {
                let (events, raw) = read_set(&store, &set, from, chunk).await;
                assert_eq!(events, expected, "institution {i} from {from} by {chunk}");
                assert_eq!(raw, expected_raw, "institution {i} from {from} by {chunk}");
                if chunk >= 100 {
                    let (events, raw) = read_set(&defaulted, &set, from, chunk).await;
                    assert_eq!(events, expected, "default: {i} from {from} by {chunk}");
                    assert_eq!(raw, expected_raw, "default: {i} from {from} by {chunk}");
                }
            }
        }
    }
    // Prefixes of one another's ids: institution 1 holds none of 12's or
    // 123's events, and the institution stream only by its exact name.
    let (one, _) = read_set(&store, &institution(1), 0, 1_000).await;
    assert_eq!(one.len(), 400);
    assert!(
        one.iter()
            .all(|e| e.stream.starts_with("learner-1-") || e.stream == "institution-1")
    );
    assert!(one.iter().any(|e| e.stream == "institution-1"));
    let (unknown, _) = read_set(&store, &institution(7), 0, 10).await;
    assert!(unknown.is_empty());
    let none = store
        .read_streams(&institution(1), ReadAll { from: 0, limit: 0 })
        .await
        .unwrap();
    assert!(none.is_empty());
}

/// Paging a set by small reads walks its index range once per
/// [`StreamSetRead::AHEAD`] reads, not once per read: a read goes on with
/// the positions the last walk found.
#[tokio::test]
async fn paging_a_set_walks_its_index_once_per_many_reads() {
    let (_dir, store) = temp_store();
    let log = institutions_log(&store).await;
    let expected: Vec<_> = log
        .iter()
        .filter(|e| institution(1).contains(e.stream.as_bytes()))
        .cloned()
        .collect();
    assert_eq!(expected.len(), 400);
    let walks = || store.inner.stream_sets.walks.load(Ordering::Relaxed);
    let before = walks();
    // 401 reads of 1 (the last one empty): each walk gathers the next 64
    // positions, and the last read knows from the last walk that the set
    // has no more.
    let (events, reads) = read_set_decoded(&store, &institution(1), 0, 1).await;
    assert_eq!(events, expected);
    assert_eq!(reads, 401);
    let per_walk = usize::try_from(StreamSetRead::AHEAD).unwrap();
    assert_eq!(walks() - before, 400usize.div_ceil(per_walk) as u64);
    // 41 reads of 10: one walk gathers 640 positions, more than the set.
    let before = walks();
    let (events, _) = read_set_decoded(&store, &institution(1), 0, 10).await;
    assert_eq!(events, expected);
    assert_eq!(walks() - before, 1);
    // A page that uses the start of a read (50 of a read of 100) and a
    // next page that goes on from inside it: one walk for both.
    let before = walks();
    let set = institution(1);
    let read = |from: Position| store.read_streams(&set, ReadAll { from, limit: 100 });
    let first = read(1).await.unwrap();
    assert_eq!(first, expected[..100]);
    let next = read(first[49].position + 1).await.unwrap();
    assert_eq!(next, expected[50..150]);
    assert_eq!(walks() - before, 1);
}

#[derive(Debug, Clone)]
enum SetOp {
    /// Reader `reader` reads its set's next `limit` events.
    Read { reader: usize, limit: usize },
    /// `count` events appended to institution `institution`'s learner
    /// `learner` (0: the institution's own stream).
    Append {
        institution: u64,
        learner: u64,
        count: usize,
    },
}

fn set_op() -> impl Strategy<Value = SetOp> {
    prop_oneof![
        3 => (0..12usize, 1..40usize).prop_map(|(reader, limit)| SetOp::Read { reader, limit }),
        1 => (1..4u64, 0..5u64, 1..30usize)
            .prop_map(|(institution, learner, count)| SetOp::Append { institution, learner, count }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// However readers of several sets interleave with one another and
    /// with appends (more readers than sets kept, readers of one set at
    /// different places, events appended to a set after a walk found its
    /// positions), each read returns exactly the set's next events.
    #[test]
    fn interleaved_set_reads_and_appends_equal_filtering_the_log(
        ops in proptest::collection::vec(set_op(), 1..120)
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let (_dir, store) = temp_store();
            let mut n = 0;
            let mut append = |institution: u64, learner: u64, count: usize| {
                let store = store.clone();
                let stream = match learner {
                    0 => format!("institution-{institution}"),
                    l => format!("learner-{institution}-{l}"),
                };
                let events: Vec<_> = (0..count).map(|_| { n += 1; simple(n) }).collect();
                async move {
                    store.append(&stream, ExpectedRevision::Any, events).await.unwrap();
                }
            };
            for (i, (learner, count)) in [(1, 50), (0, 3), (2, 80)].into_iter().enumerate() {
                for institution in 1..4 {
                    append(institution, learner + i as u64 % 2, count).await;
                }
            }
            // Readers 0..12 read institutions 1, 2, 3 in turn: four of each.
            let mut next: Vec<Position> = vec![1; 12];
            for op in ops {
                match op {
                    SetOp::Append { institution, learner, count } => {
                        append(institution, learner, count).await;
                    }
                    SetOp::Read { reader, limit } => {
                        let set = institution(reader as u64 % 3 + 1);
                        let read = store
                            .read_streams(&set, ReadAll { from: next[reader], limit })
                            .await
                            .unwrap();
                        let expected: Vec<_> = everything(&store)
                            .await
                            .into_iter()
                            .filter(|e| e.position >= next[reader] && set.contains(e.stream.as_bytes()))
                            .take(limit)
                            .collect();
                        assert_eq!(read, expected, "reader {reader} from {}", next[reader]);
                        if let Some(last) = read.last() {
                            next[reader] = last.position + 1;
                        }
                    }
                }
            }
        });
    }
}

#[tokio::test]
async fn stream_set_prefixes_without_a_successor_still_bound_the_range() {
    assert_eq!(
        prefix_successor("learner-12-").as_deref(),
        Some("learner-12.")
    );
    assert_eq!(prefix_successor("a\u{10FFFF}").as_deref(), Some("b"));
    assert_eq!(prefix_successor("a\u{D7FF}").as_deref(), Some("a\u{E000}"));
    assert_eq!(prefix_successor(""), None);
    let (_dir, store) = temp_store();
    let log = institutions_log(&store).await;
    // An empty prefix: every stream.
    let every = StreamSet::new("", "institution-1");
    let (events, _) = read_set(&store, &every, 0, 300).await;
    assert_eq!(events, log);
}

/// The positions come from the `(stream, revision)` index: SQLite never
/// walks the table (`SCAN events`) for a stream-set read, and reads each
/// row by its position.
#[tokio::test]
async fn stream_set_reads_search_the_stream_index() {
    let (dir, store) = temp_store();
    institutions_log(&store).await;
    let conn = Connection::open(dir.path().join("events.sqlite")).unwrap();
    let plan = |sql: &str, params: &[&dyn rusqlite::ToSql]| -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let plan: Vec<String> = stmt
            .query_map(params, |row| row.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        plan.join("\n")
    };
    // With and without statistics: the plan must not depend on them.
    for analyze in [false, true] {
        if analyze {
            conn.execute_batch("ANALYZE").unwrap();
        }
        let walk = plan(
            select_stream_set_positions!(),
            params!["learner-1-", "learner-1.", "institution-1", 1, 16_001],
        );
        println!("{walk}");
        assert!(!walk.contains("SCAN"), "{walk}");
        assert!(!walk.contains("TEMP B-TREE"), "{walk}");
        assert!(
            walk.contains("COVERING INDEX sqlite_autoindex_events_2 (stream>? AND stream<?)"),
            "{walk}"
        );
        assert!(
            walk.contains("COVERING INDEX sqlite_autoindex_events_2 (stream=?)"),
            "{walk}"
        );
        let row = plan(select_events!("WHERE position = ?1"), params![5]);
        assert!(row.contains("USING INTEGER PRIMARY KEY (rowid=?)"), "{row}");
    }
}

/// Processes opening a new data directory together (`serve` and `project`
/// started at once) all get a working store: switching the new file to WAL
/// waits for the others instead of failing with "database is locked".
#[test]
fn stores_opened_together_on_a_new_file_all_open() {
    for _ in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.sqlite");
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (path, barrier) = (path.clone(), std::sync::Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    SqliteEventStore::open(&path).map(|_| ())
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    }
}

/// A row damaged outside the tracker (the immutability trigger dropped,
/// then a schema version past `u32` written, which the table's checks
/// allow) is reported with its position by every read
/// that reaches it: never skipped, never a panic, nothing after it handed
/// out as if it were whole.
#[tokio::test]
async fn a_damaged_row_is_reported_with_its_position_by_every_read() {
    let (dir, store) = temp_store();
    store
        .append(
            "learner-1-7",
            ExpectedRevision::Any,
            vec![simple(1), simple(2), simple(3)],
        )
        .await
        .unwrap();
    damage(
        &dir,
        "DROP TRIGGER events_no_update; \
         UPDATE events SET schema_version = 4294967296 WHERE position = 2;",
    );

    for read in every_read_of_learner_1_7(&store).await {
        assert_corrupt(read, 2, "4294967296 out of range");
    }
    // Before it, the log reads as it was.
    let first = store.read_all(ReadAll { from: 0, limit: 1 }).await.unwrap();
    assert_eq!(first[0].data, "{\"n\":1}");

    // The subscription hands over what it read before the damage, then the
    // error, then ends: event 3 is never yielded past the hole.
    let mut items = Vec::new();
    let mut subscription = store.subscribe_all(0);
    while let Ok(Some(item)) =
        tokio::time::timeout(Duration::from_secs(5), subscription.next()).await
    {
        items.push(item.map(|e| e.position));
    }
    assert!(
        matches!(
            items.last(),
            Some(Err(StoreError::Corrupt { position: 2, .. }))
        ),
        "{items:?}"
    );
    assert!(
        items[..items.len() - 1].iter().all(|i| matches!(i, Ok(1))),
        "{items:?}"
    );
}

/// A position missing from the log (a row deleted by hand, the triggers
/// dropped) is reported by the reads of the whole log, which an export or a
/// replay would otherwise pass over as if nothing were missing.
#[tokio::test]
async fn a_missing_position_is_reported_by_the_reads_of_the_log() {
    let (dir, store) = temp_store();
    store
        .append(
            "learner-1-7",
            ExpectedRevision::Any,
            vec![simple(1), simple(2), simple(3), simple(4)],
        )
        .await
        .unwrap();
    damage(
        &dir,
        "DROP TRIGGER events_no_delete; \
         DELETE FROM events WHERE position = 2;",
    );

    for from in [0, 1, 2] {
        let read = ReadAll { from, limit: 10 };
        let found_3_for_2 = "expected position 2 next";
        assert_corrupt(store.read_all(read).await, 3, found_3_for_2);
        let raw = store.read_all_raw(read, RawEvents::default()).await;
        assert_corrupt(raw.map(|e| e.len()), 3, found_3_for_2);
    }
    // A subscription hands over what lies before the hole, then the error,
    // then ends: never event 3 in place of event 2.
    let mut items = Vec::new();
    let mut subscription = store.subscribe_all(0);
    while let Ok(Some(item)) =
        tokio::time::timeout(Duration::from_secs(5), subscription.next()).await
    {
        items.push(item.map(|e| e.position));
    }
    let (last, before) = items.split_last().unwrap();
    assert_corrupt(last.clone(), 3, "expected position 2 next");
    assert!(before.iter().all(|i| matches!(i, Ok(1))), "{items:?}");
    // Reads that start past the hole, or stop before it, are whole.
    let after = store
        .read_all(ReadAll { from: 3, limit: 10 })
        .await
        .unwrap();
    assert_eq!(
        after.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![3, 4]
    );
    let before = store.read_all(ReadAll { from: 0, limit: 1 }).await.unwrap();
    assert_eq!(before.len(), 1);
}

/// A text column holding a blob is a damaged row on the decoded reads too,
/// as it is on the raw ones, not a storage failure.
#[tokio::test]
async fn a_blob_in_a_text_column_is_a_damaged_row_on_every_read() {
    let (dir, store) = temp_store();
    store
        .append(
            "learner-1-7",
            ExpectedRevision::Any,
            vec![simple(1), simple(2)],
        )
        .await
        .unwrap();
    damage(
        &dir,
        "DROP TRIGGER events_no_update; \
         UPDATE events SET request_id = x'ff00' WHERE position = 2;",
    );

    for read in every_read_of_learner_1_7(&store).await {
        assert_corrupt(read, 2, "column 9 holds Blob");
    }
}

/// How many events each read of the whole of stream `learner-1-7` (the log,
/// raw and decoded; the stream; its institution's set, raw and decoded)
/// returned, or its error.
async fn every_read_of_learner_1_7(store: &SqliteEventStore) -> Vec<Result<usize, StoreError>> {
    let whole = ReadAll { from: 0, limit: 10 };
    vec![
        store.read_all(whole).await.map(|e| e.len()),
        store
            .read_all_raw(whole, RawEvents::default())
            .await
            .map(|e| e.len()),
        store
            .read_stream("learner-1-7", 0, 10)
            .await
            .map(|e| e.len()),
        store
            .read_streams(&institution(1), whole)
            .await
            .map(|e| e.len()),
        store
            .read_streams_raw(&institution(1), whole, RawEvents::default())
            .await
            .map(|e| e.len()),
    ]
}

/// Text that is not UTF-8 is a damaged row on the decoded reads.
#[tokio::test]
async fn text_that_is_not_utf8_is_a_damaged_row() {
    let (dir, store) = temp_store();
    store
        .append("learner-1-7", ExpectedRevision::Any, vec![simple(1)])
        .await
        .unwrap();
    damage(
        &dir,
        "DROP TRIGGER events_no_update; \
         UPDATE events SET source_id = CAST(x'ff' AS TEXT) WHERE position = 1;",
    );
    let read = store.read_all(ReadAll { from: 0, limit: 10 }).await;
    assert_corrupt(read, 1, "column 8 is not UTF-8");
}

/// Changes the store's file behind its back, as a damaged disk or a hand
/// edit would.
fn damage(dir: &tempfile::TempDir, sql: &str) {
    let conn = Connection::open(dir.path().join("events.sqlite")).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch(sql).unwrap();
}

fn assert_corrupt<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    at: Position,
    reason_has: &str,
) {
    match result {
        Err(StoreError::Corrupt { position, reason }) if position == at => {
            assert!(reason.contains(reason_has), "{reason}")
        }
        other => panic!("expected position {at} reported damaged, got {other:?}"),
    }
}
