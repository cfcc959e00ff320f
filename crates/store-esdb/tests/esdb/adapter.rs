//! What only this adapter has, against the in-process test server: the
//! ordinal mapping over sparse `$all` positions, duplicates across
//! connections and processes, the server-side filter and its checkpoints,
//! subscriptions across dropped connections, errors instead of panics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;
use tokio::sync::Barrier;
use tracker_store::contract::id;
use tracker_store::{
    AppendError, AppendOutcome, EventStore, ExpectedRevision, NewEvent, Position, ReadAll,
    RecordedEvent, StoreError, Subscription,
};
use tracker_store_esdb::test_server::LoggedEvent;
use tracker_store_esdb::{EsdbEventStore, EsdbOptions};
use uuid::Uuid;

use crate::support::{event, node, options, simple, store_on, unique_prefix};

const WAIT: Duration = Duration::from_secs(10);

async fn all(store: &dyn EventStore) -> Vec<RecordedEvent> {
    store
        .read_all(ReadAll {
            from: 0,
            limit: usize::MAX,
        })
        .await
        .expect("read_all")
}

async fn append(
    store: &dyn EventStore,
    stream: &str,
    expected: ExpectedRevision,
    events: Vec<NewEvent>,
) -> AppendOutcome {
    store
        .append(stream, expected, events)
        .await
        .unwrap_or_else(|err| panic!("append to {stream}: {err}"))
}

/// Appends like a webhook sender: a store error (the receiver's 503) is
/// retried, and a retried append may find its events already recorded.
async fn append_retrying(store: &dyn EventStore, stream: &str, events: Vec<NewEvent>) {
    for _ in 0..100 {
        match store
            .append(stream, ExpectedRevision::Any, events.clone())
            .await
        {
            Ok(_) => return,
            Err(AppendError::Store(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(err) => panic!("append to {stream} refused: {err}"),
        }
    }
    panic!("append to {stream} kept failing");
}

async fn take(sub: &mut Subscription, count: usize) -> Vec<RecordedEvent> {
    let mut got = Vec::with_capacity(count);
    while got.len() < count {
        let item = tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap_or_else(|_| panic!("subscription stalled after {} events", got.len()))
            .unwrap_or_else(|| panic!("subscription ended after {} events", got.len()))
            .expect("subscription item");
        got.push(item);
    }
    got
}

async fn nothing_more(sub: &mut Subscription) {
    let extra = tokio::time::timeout(Duration::from_millis(150), sub.next()).await;
    assert!(extra.is_err(), "the subscription yielded more: {extra:?}");
}

fn positions(events: &[RecordedEvent]) -> Vec<Position> {
    events.iter().map(|e| e.position).collect()
}

fn ours<'a>(log: &'a [LoggedEvent], prefix: &str) -> Vec<&'a LoggedEvent> {
    log.iter()
        .filter(|e| e.stream.starts_with(prefix))
        .collect()
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_are_gap_free_ordinals_over_sparse_server_positions() {
    let node = node().await;
    let prefix = unique_prefix();
    let store = store_on(&node, &prefix).await;
    for n in 0..10 {
        let out = append(
            &store,
            &format!("learner-{}", n % 3),
            ExpectedRevision::Any,
            vec![simple(n)],
        )
        .await;
        assert_eq!(out.events[0].position, n + 1);
        node.write_foreign("other-app", 1 + n as usize % 3);
    }
    let batch = append(
        &store,
        "learner-9",
        ExpectedRevision::NoStream,
        vec![simple(100), simple(101), simple(102)],
    )
    .await;
    assert_eq!(
        batch.events.iter().map(|e| e.position).collect::<Vec<_>>(),
        [11, 12, 13]
    );

    let read = all(&store).await;
    assert_eq!(positions(&read), (1..=13).collect::<Vec<_>>());
    let log = node.log();
    let server = ours(&log, &prefix);
    assert_eq!(
        server.iter().map(|e| e.id).collect::<Vec<_>>(),
        read.iter().map(|e| e.id).collect::<Vec<_>>(),
        "ordinals follow $all order"
    );
    for pair in server.windows(2) {
        assert!((pair[0].commit, pair[0].prepare) < (pair[1].commit, pair[1].prepare));
        assert!(
            pair[1].prepare > pair[0].prepare + 1,
            "the test server's positions must be sparse for this test to mean anything"
        );
    }
    let last_append = &server[10..];
    assert!(
        last_append
            .iter()
            .all(|e| e.commit == last_append[0].commit)
    );
    assert_eq!(store.head().await.expect("head"), 13);

    // Another process derives the same ordinals from the same $all.
    let other = store_on(&node, &prefix).await;
    assert_eq!(all(&other).await, read);
    let page = other
        .read_all(ReadAll { from: 12, limit: 5 })
        .await
        .expect("read_all");
    assert_eq!(positions(&page), [12, 13]);
    let stream = other
        .read_stream("learner-9", 1, 10)
        .await
        .expect("read_stream");
    assert_eq!(positions(&stream), [12, 13]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_through_a_new_connection_is_still_one_event() {
    let node = node().await;
    let prefix = unique_prefix();
    let first = store_on(&node, &prefix).await;
    let original = append(
        &first,
        "learner-1",
        ExpectedRevision::NoStream,
        vec![simple(1)],
    )
    .await;
    append(
        &first,
        "learner-1",
        ExpectedRevision::Exact(0),
        vec![simple(2)],
    )
    .await;
    first.close();
    drop(first);

    // Days later, from a new process: nothing of the first client (nor the
    // server's bounded dedup cache for "any") is left to remember it.
    let appends_before = node.appends_served();
    let later = store_on(&node, &prefix).await;
    for expected in [
        ExpectedRevision::Any,
        ExpectedRevision::NoStream,
        ExpectedRevision::Exact(0),
        ExpectedRevision::Exact(7),
    ] {
        let again = append(&later, "learner-1", expected, vec![simple(1)]).await;
        assert!(again.events[0].duplicate, "{expected:?}");
        assert_eq!(again.events[0].position, original.events[0].position);
        assert_eq!(again.events[0].revision, 0);
        assert_eq!(again.next_revision, 1);
    }
    assert_eq!(
        node.appends_served(),
        appends_before,
        "a redelivery sends no append at all"
    );
    let copies = node.log().iter().filter(|e| e.id == id(1)).count();
    assert_eq!(copies, 1);
    assert_eq!(later.head().await.expect("head"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_processes_record_each_id_once() {
    const STEPS: u64 = 40;
    let node = node().await;
    let prefix = unique_prefix();
    let a: Arc<dyn EventStore> = Arc::new(store_on(&node, &prefix).await);
    let b: Arc<dyn EventStore> = Arc::new(store_on(&node, &prefix).await);

    // The same ids to the same streams at the same moment from two
    // processes (two clients, two connections, two position indexes).
    let barrier = Arc::new(Barrier::new(2));
    let racers: Vec<_> = [Arc::clone(&a), Arc::clone(&b)]
        .into_iter()
        .map(|store| {
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for step in 0..STEPS {
                    let mut events = vec![simple(step * 2)];
                    if step % 3 == 0 {
                        events.push(simple(step * 2 + 1));
                    }
                    barrier.wait().await;
                    let out = store
                        .append(&format!("race-{}", step % 4), ExpectedRevision::Any, events)
                        .await
                        .unwrap_or_else(|err| panic!("step {step}: {err}"));
                    answers.extend(out.events);
                }
                answers
            })
        })
        .collect();
    let mut by_id: HashMap<Uuid, Vec<(Position, u64, bool)>> = HashMap::new();
    for racer in racers {
        for answer in racer.await.expect("racer") {
            by_id.entry(answer.id).or_default().push((
                answer.position,
                answer.revision,
                answer.duplicate,
            ));
        }
    }
    let recorded = all(a.as_ref()).await;
    assert_eq!(recorded.len(), by_id.len(), "one record per id");
    assert_eq!(
        positions(&recorded),
        (1..=by_id.len() as u64).collect::<Vec<_>>()
    );
    for event in &recorded {
        let answers = &by_id[&event.id];
        assert_eq!(answers.len(), 2);
        assert!(
            answers
                .iter()
                .all(|a| (a.0, a.1) == (event.position, event.revision))
        );
        assert_eq!(
            answers.iter().filter(|a| !a.2).count(),
            1,
            "one writer of {}",
            event.id
        );
    }
    assert!(
        node.appends_served() > STEPS,
        "the two processes never actually raced ({} appends for {STEPS} steps)",
        node.appends_served()
    );

    // Different ids to one stream from both: every append lands, the
    // loser of each race re-reads and retries after the typed conflict.
    let writers: Vec<_> = [(Arc::clone(&a), 1_000), (Arc::clone(&b), 2_000)]
        .into_iter()
        .map(|(store, base)| {
            tokio::spawn(async move {
                for n in base..base + 25 {
                    let out = store
                        .append("shared", ExpectedRevision::Any, vec![simple(n)])
                        .await
                        .unwrap_or_else(|err| panic!("{n}: {err}"));
                    assert!(!out.events[0].duplicate);
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let shared = b
        .read_stream("shared", 0, usize::MAX)
        .await
        .expect("read_stream");
    assert_eq!(
        shared.iter().map(|e| e.revision).collect::<Vec<_>>(),
        (0..50).collect::<Vec<_>>()
    );
    let head = a.head().await.expect("head");
    assert_eq!(head, recorded.len() as u64 + 50);
    assert_eq!(b.head().await.expect("head"), head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_survives_dropped_connections_without_gap_or_repeat() {
    let node = Arc::new(node().await);
    let prefix = unique_prefix();
    let store: Arc<dyn EventStore> = Arc::new(store_on(&node, &prefix).await);
    for n in 0..50 {
        append(
            store.as_ref(),
            &format!("s-{}", n % 4),
            ExpectedRevision::Any,
            vec![simple(n)],
        )
        .await;
    }
    let subscriptions_before = node.subscriptions_opened();
    let mut sub = store.subscribe_all(1);
    let early = take(&mut sub, 20).await;

    let appender = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            for n in 100..250 {
                append_retrying(store.as_ref(), &format!("s-{}", n % 4), vec![simple(n)]).await;
                if n % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let cutter = {
        let node = Arc::clone(&node);
        tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(40)).await;
                node.drop_connections();
            }
        })
    };
    let late = take(&mut sub, 180).await;
    appender.await.expect("appender");
    cutter.await.expect("cutter");
    nothing_more(&mut sub).await;

    let got: Vec<RecordedEvent> = early.into_iter().chain(late).collect();
    assert_eq!(positions(&got), (1..=200).collect::<Vec<_>>());
    assert_eq!(
        got,
        all(store.as_ref()).await,
        "the subscription equals the log"
    );
    assert!(
        node.subscriptions_opened() >= subscriptions_before + 3,
        "dropped connections must have forced resubscriptions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_gives_store_errors_then_everything_recovers() {
    let node = node().await;
    let prefix = unique_prefix();
    let store = store_on(&node, &prefix).await;
    append(&store, "s", ExpectedRevision::NoStream, vec![simple(1)]).await;
    let mut sub = store.subscribe_all(1);
    assert_eq!(positions(&take(&mut sub, 1).await), [1]);

    node.stop();
    let started = Instant::now();
    let refused = store
        .append("s", ExpectedRevision::Any, vec![simple(2)])
        .await;
    assert!(
        matches!(refused, Err(AppendError::Store(StoreError::Storage(_)))),
        "{refused:?}"
    );
    assert!(matches!(
        store.writable().await,
        Err(StoreError::Storage(_))
    ));
    assert!(matches!(store.head().await, Err(StoreError::Storage(_))));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "errors must come quickly, took {:?}",
        started.elapsed()
    );

    node.restart().await.expect("restart");
    append_retrying(&store, "s", vec![simple(2)]).await;
    store.writable().await.expect("writable again");
    let resumed = take(&mut sub, 1).await;
    assert_eq!((resumed[0].position, resumed[0].id), (2, id(2)));
    nothing_more(&mut sub).await;
    assert_eq!(store.head().await.expect("head"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_keeps_other_trackers_and_applications_out() {
    let node = node().await;
    let mine = unique_prefix();
    let theirs = unique_prefix();
    let a = store_on(&node, &mine).await;
    let b = store_on(&node, &theirs).await;
    for n in 0..12 {
        append(&a, "learner-1", ExpectedRevision::Any, vec![simple(n)]).await;
        append(
            &b,
            "learner-1",
            ExpectedRevision::Any,
            vec![simple(100 + n)],
        )
        .await;
        node.write_foreign("$stats-127.0.0.1:2113", 5);
    }
    let read = all(&a).await;
    assert_eq!(positions(&read), (1..=12).collect::<Vec<_>>());
    assert!(read.iter().all(|e| e.stream == "learner-1"));
    assert_eq!(
        read.iter().map(|e| e.id).collect::<Vec<_>>(),
        (0..12).map(id).collect::<Vec<_>>()
    );
    assert_eq!(positions(&all(&b).await), (1..=12).collect::<Vec<_>>());

    let mut sub = a.subscribe_all(1);
    assert_eq!(take(&mut sub, 12).await, read);
    nothing_more(&mut sub).await;

    // A long tail of other events (more than head's backwards scan): the
    // head is found through the filter's checkpoints.
    node.write_foreign("other-app", 1_500);
    assert_eq!(a.head().await.expect("head"), 12);
    let empty = store_on(&node, &unique_prefix()).await;
    assert_eq!(
        empty
            .head()
            .await
            .expect("head of a tracker with no events"),
        0
    );
    assert!(all(&empty).await.is_empty());

    // The live subscription resumes from the filter's last checkpoint, not
    // from its last event: it does not scan the 1 500 events again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let last_of_ours = node
        .log()
        .iter()
        .rposition(|e| e.stream.starts_with(&mine))
        .unwrap_or(0);
    let starts_before = node.subscription_starts().len();
    node.drop_connections();
    append_retrying(&a, "learner-1", vec![simple(50)]).await;
    let next = take(&mut sub, 1).await;
    assert_eq!((next[0].position, next[0].id), (13, id(50)));
    let resumed = &node.subscription_starts()[starts_before..];
    assert!(!resumed.is_empty(), "the subscription did not resume");
    assert!(
        resumed.iter().all(|&start| start > last_of_ours + 1_000),
        "resubscriptions started at {resumed:?}, our last event is at {last_of_ours}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_reads_see_what_another_process_wrote() {
    let node = node().await;
    let prefix = unique_prefix();
    let reader = store_on(&node, &prefix).await;
    let writer = store_on(&node, &prefix).await;
    assert_eq!(reader.head().await.expect("head"), 0);
    append(
        &writer,
        "learner-7",
        ExpectedRevision::NoStream,
        vec![simple(1), simple(2), simple(3)],
    )
    .await;
    // No sleep: head catches the index up to the server's end first.
    assert_eq!(reader.head().await.expect("head"), 3);
    assert_eq!(positions(&all(&reader).await), [1, 2, 3]);
    let stream = reader
        .read_stream("learner-7", 0, 10)
        .await
        .expect("read_stream");
    assert_eq!(positions(&stream), [1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_stored_as_documented() {
    let node = node().await;
    let prefix = unique_prefix();
    let store = store_on(&node, &prefix).await;
    let json = event(1, "{\"trail\":{\"id\":7}}");
    let padded = event(2, "  [1, 2]\n");
    append(
        &store,
        "learner-1",
        ExpectedRevision::NoStream,
        vec![json.clone(), padded.clone()],
    )
    .await;

    let log = node.log();
    let stored = ours(&log, &prefix);
    assert_eq!(stored.len(), 2);
    for (server, sent) in stored.iter().zip([&json, &padded]) {
        assert_eq!(server.stream, format!("{prefix}learner-1"));
        assert_eq!(server.id, sent.id);
        assert_eq!(server.metadata["type"], sent.event_type);
        assert_eq!(server.data, sent.data.as_bytes(), "data goes as is");
        let metadata: Value =
            serde_json::from_slice(&server.custom_metadata).expect("JSON metadata");
        assert_eq!(metadata["source_id"], sent.metadata.source_id.as_str());
        assert_eq!(metadata["request_id"], sent.metadata.request_id.as_str());
        assert_eq!(
            metadata["content_hash"],
            sent.metadata.content_hash.as_str()
        );
        assert_eq!(metadata["schema_version"], sent.schema_version);
        let received_at = metadata["received_at"].as_str().expect("received_at");
        assert_eq!(
            received_at
                .parse::<chrono::DateTime<chrono::Utc>>()
                .expect("RFC 3339"),
            sent.metadata.received_at
        );
        assert!(
            metadata["append_id"]
                .as_str()
                .is_some_and(|s| s.parse::<Uuid>().is_ok())
        );
    }
    assert_eq!(stored[0].metadata["content-type"], "application/json");
    // White space around a JSON value cannot travel as JSON: bytes, exact.
    assert_eq!(
        stored[1].metadata["content-type"],
        "application/octet-stream"
    );

    let read = store
        .read_stream("learner-1", 0, 10)
        .await
        .expect("read_stream");
    assert_eq!(read[0].data, json.data);
    assert_eq!(read[1].data, padded.data);
    assert_eq!(read[1].metadata, padded.metadata);
    assert_eq!(read[1].schema_version, padded.schema_version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovery_url_connects_through_gossip() {
    let node = node().await;
    let store = EsdbEventStore::connect(&node.discover_url(), options(&unique_prefix()))
        .await
        .expect("connect through gossip");
    append(&store, "s", ExpectedRevision::NoStream, vec![simple(1)]).await;
    assert_eq!(store.head().await.expect("head"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_a_store_error_quickly() {
    let url = format!("esdb://127.0.0.1:{}?tls=false", free_port());
    let started = Instant::now();
    let refused = EsdbEventStore::connect(&url, options(&unique_prefix())).await;
    assert!(
        matches!(refused, Err(StoreError::Storage(_))),
        "{refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_on_unless_the_url_turns_it_off() {
    let node = node().await;
    let url = format!("esdb://{}", node.addr());
    let refused = EsdbEventStore::connect(&url, options(&unique_prefix())).await;
    assert!(
        matches!(refused, Err(StoreError::Storage(_))),
        "a TLS client must not talk to a plain-text node: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_store_errors_that_keep_the_password_secret() {
    for url in [
        "esdb://admin:s3cret@localhost:notaport",
        "postgres://admin:s3cret@localhost:5432",
        "esdb://admin:s3cret@localhost:2113/some/path",
    ] {
        match EsdbEventStore::connect(url, EsdbOptions::default()).await {
            Err(StoreError::Storage(message)) => {
                assert!(!message.contains("s3cret"), "{url}: {message}");
            }
            other => panic!("{url}: expected a storage error, got {other:?}"),
        }
    }
    // Against a server that answers, so only the prefix can be refused.
    let node = node().await;
    for prefix in ["", "$tracker-"] {
        match EsdbEventStore::connect(&node.url(), options(prefix)).await {
            Err(StoreError::Storage(message)) => {
                assert!(message.contains("stream_prefix"), "{prefix:?}: {message}");
            }
            other => panic!("{prefix:?}: expected a refused prefix, got {other:?}"),
        }
    }
    let valid = EsdbEventStore::connect(&node.url(), options(&unique_prefix())).await;
    assert!(
        valid.is_ok(),
        "a valid prefix on the same server: {valid:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_subscriptions_and_refuses_calls() {
    let node = node().await;
    let store = store_on(&node, &unique_prefix()).await;
    append(&store, "s", ExpectedRevision::NoStream, vec![simple(1)]).await;
    let mut sub = store.subscribe_all(1);
    let mut waiting = store.subscribe_all(5);
    take(&mut sub, 1).await;
    store.close();
    let ended = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("ends promptly");
    assert!(ended.is_none(), "{ended:?}");
    let ended = tokio::time::timeout(WAIT, waiting.next())
        .await
        .expect("ends promptly");
    assert!(ended.is_none(), "{ended:?}");
    let refused = store
        .append("s", ExpectedRevision::Any, vec![simple(2)])
        .await;
    assert!(
        matches!(refused, Err(AppendError::Store(StoreError::Closed))),
        "{refused:?}"
    );
    assert!(matches!(store.head().await, Err(StoreError::Closed)));
    assert!(matches!(store.writable().await, Err(StoreError::Closed)));
}

/// An append decides duplicates and revision conflicts on a read of its
/// stream: that read goes to the leader even when the connection prefers
/// followers, which may be behind the client's own last write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_reads_require_the_leader_whatever_the_node_preference() {
    let node = node().await;
    let prefix = unique_prefix();
    let url = format!("{}&nodePreference=follower", node.url());
    let store = EsdbEventStore::connect(&url, options(&prefix))
        .await
        .expect("connect to the test server");
    append(&store, "s", ExpectedRevision::NoStream, vec![simple(1)]).await;
    append(&store, "s", ExpectedRevision::Exact(0), vec![simple(2)]).await;
    let redelivered = store
        .append("s", ExpectedRevision::Any, vec![simple(1)])
        .await
        .unwrap();
    assert!(redelivered.events[0].duplicate, "{redelivered:?}");
    assert_eq!(store.read_stream("s", 0, 10).await.unwrap().len(), 2);
    assert!(node.reads_served() > 0);
    assert_eq!(node.stream_reads_off_leader(), 0);
}

/// KurrentDB builds before the KDB-744 fix sent a catch-up checkpoint at the
/// end of the log, the position the next write takes. Resuming after it
/// must lose that next event neither from the position index (head, reads,
/// ordinals) nor from a subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_at_the_end_of_the_log_loses_no_event_after_a_reconnect() {
    let node = node().await;
    node.checkpoint_at_end_of_log();
    let prefix = unique_prefix();
    let store = store_on(&node, &prefix).await;
    append(&store, "s", ExpectedRevision::NoStream, vec![simple(1)]).await;
    let mut sub = store.subscribe_all(1);
    assert_eq!(take(&mut sub, 1).await[0].position, 1);
    assert_eq!(store.head().await.unwrap(), 1);
    // Both subscriptions have caught up (and had the checkpoint) by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.drop_connections();
    // The next event lands exactly where that checkpoint pointed.
    let writer = store_on(&node, &prefix).await;
    append_retrying(&writer, "t", vec![simple(2)]).await;

    let followed = take(&mut sub, 1).await;
    assert_eq!(followed[0].id, simple(2).id);
    assert_eq!(followed[0].position, 2);
    assert_eq!(store.head().await.unwrap(), 2);
    let ids: Vec<Uuid> = all(&store).await.iter().map(|e| e.id).collect();
    assert_eq!(ids, [simple(1).id, simple(2).id]);
}

/// A stream longer than a read page (an institution's stream grows for
/// years) is read in pages, each call under its own deadline, and whole: a
/// new process's first append to it still finds every earlier id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stream_is_read_in_pages_and_whole() {
    let node = node().await;
    let prefix = unique_prefix();
    let store = store_on(&node, &prefix).await;
    for chunk in 0..11u64 {
        let events = (chunk * 100..chunk * 100 + 100).map(simple).collect();
        append(&store, "institution-1", ExpectedRevision::Any, events).await;
    }
    let fresh = store_on(&node, &prefix).await;
    let reads_before = node.reads_served();
    let again = fresh
        .append("institution-1", ExpectedRevision::Any, vec![simple(0)])
        .await
        .unwrap();
    assert!(again.events[0].duplicate, "{again:?}");
    assert_eq!(again.events[0].position, 1);
    assert_eq!(node.reads_served() - reads_before, 2, "pages of 1,024");
    let all = fresh
        .read_stream("institution-1", 0, usize::MAX)
        .await
        .unwrap();
    assert_eq!(all.len(), 1_100);
    assert!(all.iter().enumerate().all(|(i, e)| e.revision == i as u64));
}
