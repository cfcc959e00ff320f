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
    // An outside writer holds the lock, so the first request blocks the
    // writer thread and the others pile up in the queue meanwhile.
    let blocker = Connection::open(dir.path().join("events.sqlite")).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let tasks: Vec<_> = (0..50)
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
