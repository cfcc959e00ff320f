//! The contract every [`EventStore`] backend must pass.
//!
//! Each case is a public async fn taking a fresh, empty store; the
//! [`contract_tests!`](crate::contract_tests) macro expands to one
//! `#[tokio::test]` per case so that each backend's test file is one macro
//! call and a failure names its case:
//!
//! ```ignore
//! async fn make_store() -> tracker_store::contract::Fixture {
//!     let dir = tempfile::tempdir().expect("temp dir");
//!     let store = SqliteEventStore::open(dir.path().join("events.sqlite")).expect("open");
//!     tracker_store::contract::Fixture::new(Arc::new(store)).keep_alive(dir)
//! }
//! tracker_store::contract_tests!(make_store);
//! ```
//!
//! The factory may return a [`Fixture`] or a bare `Arc<dyn EventStore>`.
//! The test crate needs `tokio` (with `macros` and `rt-multi-thread`).
//! Compiled for this crate's own tests and with the `contract` feature.

// This module is a test suite shipped as library code: a failed expectation
// must panic with a message, which is what `expect` is for here.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use futures::StreamExt;
use tokio::sync::Barrier;
use uuid::Uuid;

use crate::{
    AppendError, AppendOutcome, EventMetadata, EventStore, ExpectedRevision, NewEvent, Position,
    ReadAll, RecordedEvent, StreamSet, Subscription,
};

/// A store under test and whatever must outlive it (a temp dir, a
/// container handle).
pub struct Fixture {
    // Declared first so it is dropped first: a temp dir removed under a live
    // store is a confusing failure.
    pub store: Arc<dyn EventStore>,
    keep_alive: Option<Box<dyn Any + Send + Sync>>,
}

impl Fixture {
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            keep_alive: None,
        }
    }

    /// Keeps `guard` alive until after the store is dropped.
    pub fn keep_alive(mut self, guard: impl Any + Send + Sync) -> Self {
        self.keep_alive = Some(Box::new(guard));
        self
    }
}

impl From<Arc<dyn EventStore>> for Fixture {
    fn from(store: Arc<dyn EventStore>) -> Self {
        Self::new(store)
    }
}

/// Expands to one `#[tokio::test]` per contract case, each given a fresh
/// store from `$factory` (an async fn or async closure returning a
/// [`Fixture`] or an `Arc<dyn EventStore>`).
///
/// Attributes after the factory go on every case, e.g.
/// `contract_tests!(make_store, #[ignore = "needs a server"])`.
///
/// A backend that can check event ids only within their stream (not across
/// the whole log, see [`AppendError::IdInOtherStream`]) says so with
/// `contract_tests!(make_store, ids_checked_per_stream_only = "why")`: the
/// cases that need the global check are then generated `#[ignore]`d with
/// that reason, so that they are reported as ignored, never as passed.
#[macro_export]
macro_rules! contract_tests {
    ($factory:expr, ids_checked_per_stream_only = $reason:literal $(, #[$attr:meta])* $(,)?) => {
        $crate::contract_tests!(@per_stream [$(#[$attr])*] $factory);
        $crate::contract_tests!(@cases [#[ignore = $reason]] $factory; id_in_other_stream_is_refused);
    };
    ($factory:expr $(, #[$attr:meta])* $(,)?) => {
        $crate::contract_tests!(@per_stream [$(#[$attr])*] $factory);
        $crate::contract_tests!(@cases [$(#[$attr])*] $factory; id_in_other_stream_is_refused);
    };
    // Every case that holds whether ids are unique per stream or per log.
    (@per_stream [$(#[$attr:meta])*] $factory:expr) => {
        $crate::contract_tests!(@cases [$(#[$attr])*] $factory;
            append_then_read_returns_exactly_what_was_appended,
            read_stream_honours_from_and_limit,
            expected_any_accepts_new_and_existing_streams,
            expected_no_stream_accepts_only_a_new_stream,
            expected_stream_exists_accepts_only_an_existing_stream,
            expected_exact_accepts_only_the_current_revision,
            refused_append_stores_nothing,
            empty_append_is_refused,
            id_repeated_within_one_append_is_refused,
            received_at_outside_years_0_to_9999_is_refused,
            duplicate_in_same_stream_returns_original_record,
            duplicate_ignores_a_mismatching_expected_revision,
            partial_duplicate_is_refused,
            concurrent_appends_with_racing_duplicates_are_gap_free,
            concurrent_exact_writers_one_wins_per_revision,
            subscribe_from_start_while_appending,
            subscribe_from_middle_while_appending,
            read_all_paging_covers_the_log_once,
            read_streams_pages_one_set_of_streams_in_log_order,
            head_of_empty_store_is_zero,
            healthy_store_is_writable,
        );
    };
    (@cases $attrs:tt $factory:expr; $($case:ident),* $(,)?) => {
        $( $crate::contract_tests!(@case $attrs $factory; $case); )*
    };
    (@case [$(#[$attr:meta])*] $factory:expr; $case:ident) => {
        $(#[$attr])*
        #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $case() {
            let fixture: $crate::contract::Fixture = ($factory)().await.into();
            $crate::contract::$case(::std::sync::Arc::clone(&fixture.store)).await;
            drop(fixture);
        }
    };
}

/// How long a live subscription may take to deliver an event.
const LIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A deterministic id, so a failing case is reproducible.
pub fn id(n: u64) -> Uuid {
    Uuid::from_u64_pair(0x7472_6163_6b65_7200, n)
}

/// A new event with `data` and fixed metadata derived from `n`.
pub fn event(n: u64, data: &str) -> NewEvent {
    NewEvent {
        id: id(n),
        event_type: format!("TestHappened{}", n % 3),
        schema_version: 1 + (n % 2) as u32,
        data: data.to_owned(),
        metadata: EventMetadata {
            received_at: Utc
                .timestamp_opt(1_750_000_000 + n as i64, (n as u32 % 1000) * 1_000_001)
                .single()
                .expect("valid timestamp"),
            source_id: format!("source-{}", n % 4),
            request_id: format!("req-{n}"),
            content_hash: format!("sha256:{n:064x}"),
        },
    }
}

fn simple(n: u64) -> NewEvent {
    event(n, &format!("{{\"n\":{n}}}"))
}

async fn append_ok(
    store: &dyn EventStore,
    stream: &str,
    expected: ExpectedRevision,
    events: Vec<NewEvent>,
) -> AppendOutcome {
    store
        .append(stream, expected, events)
        .await
        .unwrap_or_else(|err| panic!("append to {stream} with {expected:?} failed: {err}"))
}

async fn all_events(store: &dyn EventStore) -> Vec<RecordedEvent> {
    store
        .read_all(ReadAll {
            from: 0,
            limit: usize::MAX,
        })
        .await
        .expect("read_all")
}

async fn stream_events(store: &dyn EventStore, stream: &str) -> Vec<RecordedEvent> {
    store
        .read_stream(stream, 0, usize::MAX)
        .await
        .expect("read_stream")
}

fn assert_conflict(
    result: Result<AppendOutcome, AppendError>,
    stream: &str,
    expected: ExpectedRevision,
    actual: Option<u64>,
) {
    match result {
        Err(AppendError::Conflict {
            stream: s,
            expected: e,
            actual: a,
        }) => {
            assert_eq!(s, stream, "conflict names the stream");
            assert_eq!(e, expected, "conflict carries the expected revision");
            assert_eq!(a, actual, "conflict carries the actual revision");
        }
        other => {
            panic!("expected a Conflict on {stream} ({expected:?} vs {actual:?}), got {other:?}")
        }
    }
}

fn assert_matches_new(recorded: &RecordedEvent, new: &NewEvent, stream: &str) {
    assert_eq!(recorded.id, new.id);
    assert_eq!(recorded.stream, stream);
    assert_eq!(recorded.event_type, new.event_type);
    assert_eq!(recorded.schema_version, new.schema_version);
    assert_eq!(
        recorded.data.as_bytes(),
        new.data.as_bytes(),
        "data must come back byte for byte"
    );
    assert_eq!(recorded.metadata, new.metadata);
}

/// Appends then reads back, by stream and globally: identical bytes,
/// revisions from 0, positions from 1.
pub async fn append_then_read_returns_exactly_what_was_appended(store: Arc<dyn EventStore>) {
    let store = store.as_ref();
    let odd = [
        "{\"name\":\"Zoë 🦀 日本語\",\"emoji\":\"\u{1F600}\"}",
        "{ \"spaced\" :\t[ 1 ,2\r\n,3 ]  }\n",
        "{\"escaped\":\"\\u00e9\\n\\\"q\\\"\",\"big\":12345678901234567890123}",
        "[]",
        "  {\"trailing\": \"spaces\"}   ",
    ];
    let first: Vec<NewEvent> = odd
        .iter()
        .enumerate()
        .map(|(i, d)| event(i as u64, d))
        .collect();
    let out = append_ok(
        store,
        "learner-1",
        ExpectedRevision::NoStream,
        first.clone(),
    )
    .await;
    assert_eq!(out.next_revision, 4);
    assert_eq!(out.events.len(), 5);
    for (i, appended) in out.events.iter().enumerate() {
        assert_eq!(appended.id, first[i].id);
        assert_eq!(appended.revision, i as u64);
        assert_eq!(appended.position, i as u64 + 1);
        assert!(!appended.duplicate);
    }

    let other = vec![simple(100)];
    let out = append_ok(store, "learner-2", ExpectedRevision::Any, other.clone()).await;
    assert_eq!(out.next_revision, 0);
    assert_eq!(out.events[0].position, 6);
    assert_eq!(out.events[0].revision, 0);

    let more = vec![simple(5), simple(6)];
    let out = append_ok(store, "learner-1", ExpectedRevision::Exact(4), more.clone()).await;
    assert_eq!(out.next_revision, 6);
    assert_eq!(
        out.events
            .iter()
            .map(|e| (e.revision, e.position))
            .collect::<Vec<_>>(),
        [(5, 7), (6, 8)]
    );

    let stream = stream_events(store, "learner-1").await;
    let expected: Vec<&NewEvent> = first.iter().chain(more.iter()).collect();
    assert_eq!(stream.len(), expected.len());
    for (i, (recorded, new)) in stream.iter().zip(&expected).enumerate() {
        assert_matches_new(recorded, new, "learner-1");
        assert_eq!(recorded.revision, i as u64);
    }
    assert_eq!(
        stream.iter().map(|e| e.position).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 7, 8]
    );

    let all = all_events(store).await;
    assert_eq!(
        all.iter().map(|e| e.position).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    assert_matches_new(&all[5], &other[0], "learner-2");
    assert_eq!(&all[..5], &stream[..5]);
    assert_eq!(&all[6..], &stream[5..]);

    assert!(stream_events(store, "nobody").await.is_empty());
    assert_eq!(store.head().await.expect("head"), 8);
}

/// `read_stream` starts at `from` (a revision) and returns at most `limit`.
pub async fn read_stream_honours_from_and_limit(store: Arc<dyn EventStore>) {
    let store = store.as_ref();
    for n in 0..10 {
        append_ok(store, "s", ExpectedRevision::Any, vec![simple(n)]).await;
        append_ok(store, "noise", ExpectedRevision::Any, vec![simple(100 + n)]).await;
    }
    let page = store.read_stream("s", 3, 4).await.expect("read_stream");
    assert_eq!(
        page.iter().map(|e| e.revision).collect::<Vec<_>>(),
        [3, 4, 5, 6]
    );
    assert!(page.iter().all(|e| e.stream == "s"));
    let tail = store.read_stream("s", 8, 100).await.expect("read_stream");
    assert_eq!(tail.iter().map(|e| e.revision).collect::<Vec<_>>(), [8, 9]);
    assert!(
        store
            .read_stream("s", 10, 5)
            .await
            .expect("read_stream")
            .is_empty()
    );
    assert!(
        store
            .read_stream("s", 0, 0)
            .await
            .expect("read_stream")
            .is_empty()
    );
}

pub async fn expected_any_accepts_new_and_existing_streams(store: Arc<dyn EventStore>) {
    let store = store.as_ref();
    let a = append_ok(store, "s", ExpectedRevision::Any, vec![simple(1)]).await;
    assert_eq!(a.next_revision, 0);
    let b = append_ok(store, "s", ExpectedRevision::Any, vec![simple(2)]).await;
    assert_eq!(b.next_revision, 1);
}

pub async fn expected_no_stream_accepts_only_a_new_stream(store: Arc<dyn EventStore>) {
    let store = store.as_ref();
    append_ok(store, "s", ExpectedRevision::NoStream, vec![simple(1)]).await;
    let refused = store
        .append("s", ExpectedRevision::NoStream, vec![simple(2)])
        .await;
    assert_conflict(refused, "s", ExpectedRevision::NoStream, Some(0));
    // Another stream is still new.
    append_ok(store, "t", ExpectedRevision::NoStream, vec![simple(3)]).await;
}

pub async fn expected_stream_exists_accepts_only_an_existing_stream(store: Arc<dyn EventStore>) {
    let store = store.as_ref();
    let refused = store
        .append("s", ExpectedRevision::StreamExists, vec![simple(1)])
        .await;
    assert_conflict(refused, "s", ExpectedRevision::StreamExists, None);
    append_ok(store, "s", ExpectedRevision::Any, vec![simple(1)]).await;
    let out = append_ok(store, "s", ExpectedRevision::StreamExists, vec![simple(2)]).await;
    assert_eq!(out.next_revision, 1);
}

pub async fn expected_exact_accepts_only_the_current_revision(store: Arc<dyn EventStore>) {
    let store = store.as_ref();
    let on_missing = store
        .append("s", ExpectedRevision::Exact(0), vec![simple(1)])
        .await;
    assert_conflict(on_missing, "s", ExpectedRevision::Exact(0), None);

    append_ok(
        store,
        "s",
        ExpectedRevision::NoStream,
        vec![simple(1), simple(2)],
    )
    .await;
    for wrong in [0, 2, 7] {
        let refused = store
            .append("s", ExpectedRevision::Exact(wrong), vec![simple(3)])
            .await;
        assert_conflict(refused, "s", ExpectedRevision::Exact(wrong), Some(1));
    }
    let out = append_ok(store, "s", ExpectedRevision::Exact(1), vec![simple(3)]).await;
    assert_eq!(out.next_revision, 2);
    assert_eq!(out.events[0].revision, 2);
    append_ok(store, "s", ExpectedRevision::Exact(2), vec![simple(4)]).await;
}

/// A refused append, whatever the reason, leaves the log exactly as it was.
pub async fn refused_append_stores_nothing(store: Arc<dyn EventStore>) {
    let store = store.as_ref();
    append_ok(
        store,
        "s",
        ExpectedRevision::Any,
        vec![simple(1), simple(2)],
    )
    .await;
    append_ok(store, "t", ExpectedRevision::Any, vec![simple(3)]).await;
    let before = all_events(store).await;

    let refusals = [
        (
            "s",
            ExpectedRevision::Exact(0),
            vec![simple(10), simple(11)],
        ),
        ("s", ExpectedRevision::NoStream, vec![simple(12)]),
        (
            "u",
            ExpectedRevision::StreamExists,
            vec![simple(13), simple(14)],
        ),
        // A partial duplicate, with the new id first so a backend that
        // writes as it checks would leave it behind (the same for an id of
        // another stream: `id_in_other_stream_is_refused`).
        ("s", ExpectedRevision::Any, vec![simple(16), simple(1)]),
        ("u", ExpectedRevision::Any, Vec::new()),
        ("u", ExpectedRevision::Any, vec![simple(17), simple(17)]),
    ];
    for (stream, expected, events) in refusals {
        let result = store.append(stream, expected, events).await;
        assert!(
            matches!(
                result,
                Err(AppendError::Conflict { .. }
                    | AppendError::IdInOtherStream { .. }
                    | AppendError::PartialDuplicate { .. }
                    | AppendError::Empty
                    | AppendError::DuplicateIdInRequest { .. })
            ),
            "expected a refusal on {stream}, got {result:?}"
        );
    }

    assert_eq!(store.head().await.expect("head"), 3);
    assert_eq!(all_events(store).await, before);
    assert_eq!(stream_events(store, "s").await.len(), 2);
    assert!(stream_events(store, "u").await.is_empty());
    // The refused ids are free to be used afterwards.
    let out = append_ok(
        store,
        "u",
        ExpectedRevision::NoStream,
        vec![simple(10), simple(15)],
    )
    .await;
    assert_eq!(
        out.events.iter().map(|e| e.position).collect::<Vec<_>>(),
        [4, 5]
    );
}

pub async fn empty_append_is_refused(store: Arc<dyn EventStore>) {
    let result = store.append("s", ExpectedRevision::Any, Vec::new()).await;
    assert!(matches!(result, Err(AppendError::Empty)), "got {result:?}");
    assert_eq!(store.head().await.expect("head"), 0);
}

pub async fn id_repeated_within_one_append_is_refused(store: Arc<dyn EventStore>) {
    let result = store
        .append(
            "s",
            ExpectedRevision::Any,
            vec![simple(1), simple(2), simple(1)],
        )
        .await;
    match result {
        Err(AppendError::DuplicateIdInRequest { id: dup }) => assert_eq!(dup, id(1)),
        other => panic!("expected DuplicateIdInRequest, got {other:?}"),
    }
    assert_eq!(store.head().await.expect("head"), 0);
}

/// An instant RFC 3339 cannot write would be an event no reader could
/// read back: refused, nothing stored. The first and last instants of the
/// range are recorded and read back exactly.
pub async fn received_at_outside_years_0_to_9999_is_refused(store: Arc<dyn EventStore>) {
    let at = |t: DateTime<Utc>, n: u64| {
        let mut e = simple(n);
        e.metadata.received_at = t;
        e
    };
    let first = Utc
        .with_ymd_and_hms(0, 1, 1, 0, 0, 0)
        .single()
        .expect("year 0");
    let last = Utc
        .with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
        .single()
        .expect("year 9999")
        + chrono::Duration::nanoseconds(999_999_999);
    for (n, bad) in [
        (1, first - chrono::Duration::nanoseconds(1)),
        (2, last + chrono::Duration::nanoseconds(1)),
    ] {
        let result = store
            .append("s", ExpectedRevision::Any, vec![simple(9), at(bad, n)])
            .await;
        match result {
            Err(AppendError::ReceivedAtOutOfRange {
                id: refused,
                received_at,
            }) => {
                assert_eq!((refused, received_at), (id(n), bad));
            }
            other => panic!("expected ReceivedAtOutOfRange for {bad:?}, got {other:?}"),
        }
    }
    assert_eq!(store.head().await.expect("head"), 0);
    let ends = vec![at(first, 3), at(last, 4)];
    append_ok(
        store.as_ref(),
        "s",
        ExpectedRevision::NoStream,
        ends.clone(),
    )
    .await;
    let read = store.read_stream("s", 0, 10).await.expect("read");
    let times: Vec<_> = read.iter().map(|e| e.metadata.received_at).collect();
    assert_eq!(times, [first, last]);
}

/// Re-appending recorded ids answers with the original records.
pub async fn duplicate_in_same_stream_returns_original_record(store: Arc<dyn EventStore>) {
    let store = store.as_ref();
    append_ok(store, "other", ExpectedRevision::Any, vec![simple(50)]).await;
    let original = append_ok(
        store,
        "s",
        ExpectedRevision::NoStream,
        vec![simple(1), simple(2)],
    )
    .await;
    append_ok(store, "s", ExpectedRevision::Any, vec![simple(3)]).await;

    let again = append_ok(
        store,
        "s",
        ExpectedRevision::Any,
        vec![simple(1), simple(2)],
    )
    .await;
    assert_eq!(again.events.len(), 2);
    for (dup, orig) in again.events.iter().zip(&original.events) {
        assert!(dup.duplicate, "a re-append must be flagged duplicate");
        assert_eq!(dup.id, orig.id);
        assert_eq!(dup.revision, orig.revision);
        assert_eq!(dup.position, orig.position);
    }
    assert_eq!(
        again.next_revision, 2,
        "next_revision is the stream's current revision"
    );

    // A subset, out of order, is a duplicate too.
    let subset = append_ok(
        store,
        "s",
        ExpectedRevision::Any,
        vec![simple(3), simple(1)],
    )
    .await;
    assert_eq!(
        subset
            .events
            .iter()
            .map(|e| (e.position, e.duplicate))
            .collect::<Vec<_>>(),
        [(4, true), (2, true)]
    );

    assert_eq!(store.head().await.expect("head"), 4);
    assert_eq!(stream_events(store, "s").await.len(), 3);
}

/// A redelivery carries the expected revision of its first attempt, which
/// is stale by then: it must still get the original answer, not a conflict.
pub async fn duplicate_ignores_a_mismatching_expected_revision(store: Arc<dyn EventStore>) {
    let store = store.as_ref();
    let original = append_ok(store, "s", ExpectedRevision::NoStream, vec![simple(1)]).await;
    append_ok(store, "s", ExpectedRevision::Exact(0), vec![simple(2)]).await;
    for expected in [
        ExpectedRevision::NoStream,
        ExpectedRevision::Exact(0),
        ExpectedRevision::Exact(99),
        ExpectedRevision::StreamExists,
        ExpectedRevision::Any,
    ] {
        let again = append_ok(store, "s", expected, vec![simple(1)]).await;
        assert!(again.events[0].duplicate);
        assert_eq!(again.events[0].position, original.events[0].position);
        assert_eq!(again.events[0].revision, 0);
    }
    assert_eq!(store.head().await.expect("head"), 2);
}

pub async fn id_in_other_stream_is_refused(store: Arc<dyn EventStore>) {
    let store = store.as_ref();
    append_ok(store, "s", ExpectedRevision::Any, vec![simple(1)]).await;
    for events in [vec![simple(1)], vec![simple(2), simple(1)]] {
        let result = store.append("t", ExpectedRevision::Any, events).await;
        match result {
            Err(AppendError::IdInOtherStream {
                id: got,
                existing_stream,
            }) => {
                assert_eq!(got, id(1));
                assert_eq!(existing_stream, "s");
            }
            other => panic!("expected IdInOtherStream, got {other:?}"),
        }
    }
    assert!(stream_events(store, "t").await.is_empty());
    assert_eq!(store.head().await.expect("head"), 1);
}

pub async fn partial_duplicate_is_refused(store: Arc<dyn EventStore>) {
    let store = store.as_ref();
    append_ok(
        store,
        "s",
        ExpectedRevision::Any,
        vec![simple(1), simple(2)],
    )
    .await;
    let result = store
        .append(
            "s",
            ExpectedRevision::Any,
            vec![simple(3), simple(2), simple(4)],
        )
        .await;
    match result {
        Err(AppendError::PartialDuplicate { id: got }) => assert_eq!(got, id(2)),
        other => panic!("expected PartialDuplicate, got {other:?}"),
    }
    assert_eq!(stream_events(store, "s").await.len(), 2);
    assert_eq!(store.head().await.expect("head"), 2);
}

/// 64 tasks x 50 appends; every id is appended by two tasks at the same
/// moment (same batch, same stream). Exactly one record per distinct id,
/// positions 1..=N with no gap, and both callers of an id see the same
/// position, exactly one of them with `duplicate: false`.
pub async fn concurrent_appends_with_racing_duplicates_are_gap_free(store: Arc<dyn EventStore>) {
    const TASKS: u64 = 64;
    const STEPS: u64 = 50;
    const PAIRS: u64 = TASKS / 2;
    let barrier = Arc::new(Barrier::new(TASKS as usize));
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = Arc::clone(&store);
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut seen = Vec::new();
            let pair = task % PAIRS;
            for step in 0..STEPS {
                // Tasks `p` and `p + PAIRS` build identical requests; every
                // third step carries two events to race whole batches.
                let base = (pair * STEPS + step) * 2;
                let mut events = vec![simple(base)];
                if step % 3 == 0 {
                    events.push(simple(base + 1));
                }
                let stream = format!("stream-{}", pair % 8);
                let out = store
                    .append(&stream, ExpectedRevision::Any, events)
                    .await
                    .unwrap_or_else(|err| panic!("task {task} step {step}: {err}"));
                for e in out.events {
                    seen.push((e.id, e.position, e.revision, e.duplicate, stream.clone()));
                }
                if step % 8 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            seen
        }));
    }
    let mut by_id: HashMap<Uuid, Vec<(Position, u64, bool, String)>> = HashMap::new();
    for task in tasks {
        for (id, position, revision, duplicate, stream) in task.await.expect("task panicked") {
            by_id
                .entry(id)
                .or_default()
                .push((position, revision, duplicate, stream));
        }
    }

    let all = all_events(store.as_ref()).await;
    let distinct = by_id.len() as u64;
    assert_eq!(all.len() as u64, distinct, "one record per distinct id");
    assert_eq!(
        all.iter().map(|e| e.position).collect::<Vec<_>>(),
        (1..=distinct).collect::<Vec<_>>(),
        "positions are exactly 1..=N"
    );
    assert_eq!(store.head().await.expect("head"), distinct);
    for event in &all {
        let answers = by_id.get(&event.id).expect("recorded id was answered");
        assert_eq!(answers.len(), 2, "both racers answered for {}", event.id);
        for (position, revision, _, stream) in answers {
            assert_eq!(*position, event.position, "racers of {} disagree", event.id);
            assert_eq!(*revision, event.revision);
            assert_eq!(*stream, event.stream);
        }
        let fresh = answers.iter().filter(|a| !a.2).count();
        assert_eq!(fresh, 1, "exactly one caller recorded {}", event.id);
    }
    // Each stream's revisions are gap-free too.
    let mut per_stream: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for event in &all {
        per_stream
            .entry(&event.stream)
            .or_default()
            .push(event.revision);
    }
    for (stream, revisions) in per_stream {
        assert_eq!(
            revisions,
            (0..revisions.len() as u64).collect::<Vec<_>>(),
            "revisions of {stream}"
        );
    }
}

/// Writers that all expect the same revision race; exactly one wins each
/// round and every loser gets a typed conflict carrying the new revision.
pub async fn concurrent_exact_writers_one_wins_per_revision(store: Arc<dyn EventStore>) {
    const WRITERS: u64 = 8;
    const ROUNDS: u64 = 12;
    for round in 0..ROUNDS {
        let expected = match round {
            0 => ExpectedRevision::NoStream,
            r => ExpectedRevision::Exact(r - 1),
        };
        let barrier = Arc::new(Barrier::new(WRITERS as usize));
        let tasks: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let store = Arc::clone(&store);
                let barrier = Arc::clone(&barrier);
                tokio::spawn(async move {
                    barrier.wait().await;
                    let n = round * WRITERS + writer;
                    let result = store.append("contended", expected, vec![simple(n)]).await;
                    (n, result)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            let (n, result) = task.await.expect("task panicked");
            match result {
                Ok(out) => {
                    assert_eq!(out.events[0].revision, round);
                    assert!(!out.events[0].duplicate);
                    winners.push(n);
                }
                Err(_) => assert_conflict(result, "contended", expected, Some(round)),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
    }
    let stream = stream_events(store.as_ref(), "contended").await;
    assert_eq!(
        stream.iter().map(|e| e.revision).collect::<Vec<_>>(),
        (0..ROUNDS).collect::<Vec<_>>()
    );
    assert_eq!(store.head().await.expect("head"), ROUNDS);
}

/// Collects exactly `count` events from `sub`, then checks nothing else is
/// pending (a repeat would show up here).
async fn take_exactly(sub: &mut Subscription, count: usize) -> Vec<RecordedEvent> {
    let mut got = Vec::with_capacity(count);
    while got.len() < count {
        let item = tokio::time::timeout(LIVE_TIMEOUT, sub.next())
            .await
            .unwrap_or_else(|_| panic!("subscription stalled after {} events", got.len()))
            .unwrap_or_else(|| panic!("subscription ended after {} events", got.len()))
            .expect("subscription item");
        got.push(item);
    }
    let extra = tokio::time::timeout(Duration::from_millis(100), sub.next()).await;
    assert!(
        extra.is_err(),
        "subscription yielded more than was appended: {extra:?}"
    );
    got
}

/// Appends `count` events (ids from `first`) in small batches over several
/// streams, yielding between appends so readers interleave.
fn spawn_appender(
    store: Arc<dyn EventStore>,
    first: u64,
    count: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = first;
        let end = first + count;
        while n < end {
            let size = (1 + n % 4).min(end - n);
            let events = (n..n + size).map(simple).collect();
            append_ok(
                store.as_ref(),
                &format!("live-{}", n % 5),
                ExpectedRevision::Any,
                events,
            )
            .await;
            n += size;
            tokio::task::yield_now().await;
        }
    })
}

pub async fn subscribe_from_start_while_appending(store: Arc<dyn EventStore>) {
    // Some history to catch up on, then live appends during the catch-up.
    spawn_appender(Arc::clone(&store), 0, 150)
        .await
        .expect("appender");
    let mut sub = store.subscribe_all(0);
    let appender = spawn_appender(Arc::clone(&store), 1000, 450);
    let got = take_exactly(&mut sub, 600).await;
    appender.await.expect("appender");

    let all = all_events(store.as_ref()).await;
    assert_eq!(all.len(), 600);
    assert_eq!(got, all, "subscription must equal the log");
}

pub async fn subscribe_from_middle_while_appending(store: Arc<dyn EventStore>) {
    spawn_appender(Arc::clone(&store), 0, 100)
        .await
        .expect("appender");
    let mut sub = store.subscribe_all(40);
    let appender = spawn_appender(Arc::clone(&store), 1000, 300);
    let got = take_exactly(&mut sub, 361).await;
    appender.await.expect("appender");

    let tail = store
        .read_all(ReadAll {
            from: 40,
            limit: usize::MAX,
        })
        .await
        .expect("read_all");
    assert_eq!(tail.first().map(|e| e.position), Some(40));
    assert_eq!(got, tail);

    // Subscribing at the head waits for the next append only.
    let mut at_head = store.subscribe_all(401);
    let pending = tokio::time::timeout(Duration::from_millis(50), at_head.next()).await;
    assert!(pending.is_err(), "nothing to yield yet: {pending:?}");
    append_ok(
        store.as_ref(),
        "late",
        ExpectedRevision::Any,
        vec![simple(5000)],
    )
    .await;
    let late = take_exactly(&mut at_head, 1).await;
    assert_eq!(late[0].position, 401);
    assert_eq!(late[0].id, id(5000));
}

pub async fn read_all_paging_covers_the_log_once(store: Arc<dyn EventStore>) {
    let store = store.as_ref();
    for n in 0..57u64 {
        let stream = format!("page-{}", n % 6);
        append_ok(store, &stream, ExpectedRevision::Any, vec![simple(n)]).await;
    }
    let all = all_events(store).await;
    for limit in [1, 7, 10, 57, 100] {
        let mut from = 0;
        let mut paged = Vec::new();
        loop {
            let page = store
                .read_all(ReadAll { from, limit })
                .await
                .expect("read_all");
            assert!(page.len() <= limit);
            let Some(last) = page.last() else { break };
            from = last.position + 1;
            paged.extend(page);
        }
        assert_eq!(paged, all, "paging by {limit}");
    }
    let ids: BTreeSet<Uuid> = all.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 57);
    let from_middle = store
        .read_all(ReadAll { from: 50, limit: 3 })
        .await
        .expect("read_all");
    assert_eq!(
        from_middle.iter().map(|e| e.position).collect::<Vec<_>>(),
        [50, 51, 52]
    );
    assert!(
        store
            .read_all(ReadAll {
                from: 58,
                limit: 10
            })
            .await
            .expect("read_all")
            .is_empty()
    );
    assert!(
        store
            .read_all(ReadAll { from: 1, limit: 0 })
            .await
            .expect("read_all")
            .is_empty()
    );
}

/// `read_streams`: the events of streams with a prefix, or of one exact
/// stream, in position order from `from`, paged by `limit`; lookalike
/// names (`learner-12-…` for the prefix `learner-1-`) are not in the set.
pub async fn read_streams_pages_one_set_of_streams_in_log_order(store: Arc<dyn EventStore>) {
    let store = store.as_ref();
    let streams = [
        "learner-1-7",
        "learner-12-7",
        "institution-1",
        "learner-1-8",
        "institution-12",
        "learner-1",
        "learner-10-1",
        "other",
    ];
    for n in 0..40u64 {
        let stream = streams[(n as usize * 3) % streams.len()];
        append_ok(store, stream, ExpectedRevision::Any, vec![simple(n)]).await;
    }
    let set = StreamSet::new("learner-1-", "institution-1");
    let expected: Vec<RecordedEvent> = all_events(store)
        .await
        .into_iter()
        .filter(|e| set.contains(e.stream.as_bytes()))
        .collect();
    assert_eq!(
        expected
            .iter()
            .map(|e| e.stream.as_str())
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(["institution-1", "learner-1-7", "learner-1-8"])
    );
    for limit in [1, 4, 100] {
        let mut from = 0;
        let mut paged = Vec::new();
        loop {
            let page = store
                .read_streams(&set, ReadAll { from, limit })
                .await
                .expect("read_streams");
            assert!(page.len() <= limit);
            let Some(last) = page.last() else { break };
            from = last.position + 1;
            paged.extend(page);
        }
        assert_eq!(paged, expected, "paging by {limit}");
    }
    let middle = expected[expected.len() / 2].position;
    let from_middle = store
        .read_streams(
            &set,
            ReadAll {
                from: middle,
                limit: 100,
            },
        )
        .await
        .expect("read_streams");
    assert_eq!(from_middle, expected[expected.len() / 2..]);
}

pub async fn head_of_empty_store_is_zero(store: Arc<dyn EventStore>) {
    assert_eq!(store.head().await.expect("head"), 0);
    assert!(all_events(store.as_ref()).await.is_empty());
    append_ok(store.as_ref(), "s", ExpectedRevision::Any, vec![simple(1)]).await;
    assert_eq!(store.head().await.expect("head"), 1);
}

pub async fn healthy_store_is_writable(store: Arc<dyn EventStore>) {
    store.writable().await.expect("writable");
    append_ok(store.as_ref(), "s", ExpectedRevision::Any, vec![simple(1)]).await;
    store.writable().await.expect("writable after an append");
    // A readiness probe must not write anything.
    assert_eq!(store.head().await.expect("head"), 1);
}
