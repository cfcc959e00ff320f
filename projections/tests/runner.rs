//! How the runner batches: behind, one transaction per `batch_size` events
//! read from the log; caught up, whatever arrived since the last batch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::watch;
use tracker_domain::{SourceTimeZone, parse_delivery};
use tracker_projections::readstore::{ApplyBatch, DeadLetter, FinalLoad, LeaseHolder, Snapshot};
use tracker_projections::runner::{Runner, RunnerConfig};
use tracker_projections::sqlite::SqliteReadStore;
use tracker_projections::{CheckpointKey, Completion, ProjectionKind, ReadStore, ReadStoreError};
use tracker_store::sqlite::SqliteEventStore;
use tracker_store::{EventMetadata, EventStore, ExpectedRevision, NewEvent, Position};

/// A read store that remembers the `through` of every batch applied.
#[derive(Debug, Clone)]
struct Recording {
    inner: SqliteReadStore,
    applied: Arc<Mutex<Vec<Position>>>,
}

#[async_trait]
impl ReadStore for Recording {
    fn generation(&self) -> String {
        self.inner.generation()
    }
    async fn checkpoint(&self, key: CheckpointKey) -> Result<Position, ReadStoreError> {
        self.inner.checkpoint(key).await
    }
    async fn apply(&self, batch: ApplyBatch) -> Result<(), ReadStoreError> {
        let through = batch.through;
        self.inner.apply(batch).await?;
        self.applied.lock().unwrap().push(through);
        Ok(())
    }
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<bool, ReadStoreError> {
        self.inner.acquire_lease(name, holder, ttl).await
    }
    async fn release_lease(&self, name: &str, holder: &LeaseHolder) -> Result<(), ReadStoreError> {
        self.inner.release_lease(name, holder).await
    }
    async fn live_leases(&self) -> Result<Vec<String>, ReadStoreError> {
        self.inner.live_leases().await
    }
    async fn checkpoints(&self) -> Result<Vec<(String, Position)>, ReadStoreError> {
        self.inner.checkpoints().await
    }
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, ReadStoreError> {
        self.inner.dead_letters(limit).await
    }
    async fn dead_letter_count(&self) -> Result<u64, ReadStoreError> {
        self.inner.dead_letter_count().await
    }
    async fn snapshot(&self) -> Result<Snapshot, ReadStoreError> {
        self.inner.snapshot().await
    }
    async fn follow_current(&self) -> Result<bool, ReadStoreError> {
        self.inner.follow_current().await
    }
    async fn create_generation(&self) -> Result<Box<dyn ReadStore>, ReadStoreError> {
        self.inner.create_generation().await
    }
    async fn switch_to(&self, generation: &str) -> Result<(), ReadStoreError> {
        self.inner.switch_to(generation).await
    }
    async fn load_completions(&self, rows: Arc<[Completion]>) -> Result<(), ReadStoreError> {
        self.inner.load_completions(rows).await
    }
    async fn load_final(&self, load: FinalLoad) -> Result<(), ReadStoreError> {
        self.inner.load_final(load).await
    }
}

fn event(n: u64) -> (String, NewEvent) {
    let body = serde_json::json!({
        "event": {"slug": "activities.trail.completed", "send_at": "2024-03-01 10:00:00"},
        "data": {
            "institution": {"id": 1 + n % 7},
            "user": {"id": n + 1, "name": "Ana", "email": "ana@example.edu.br"},
            "trail": {"id": 1 + n % 3, "name": "Trilha", "finished_at": "2024-03-01 10:00:00",
                "courses": [{"id": 1, "title": "Curso"}]}
        }
    })
    .to_string();
    let zone = SourceTimeZone::default();
    let parsed = parse_delivery(body.as_bytes(), &zone).unwrap();
    (
        parsed.stream(),
        NewEvent {
            id: parsed.event_id(),
            event_type: parsed.event_type().to_owned(),
            schema_version: parsed.schema_version(),
            data: parsed.event_data(&zone).unwrap(),
            metadata: EventMetadata {
                received_at: Utc::now(),
                source_id: "test".into(),
                request_id: "r".into(),
                content_hash: parsed.content_hash.clone(),
            },
        },
    )
}

/// Appends concurrently (group commits), so positions follow completion
/// order rather than `n`; the test only counts them.
async fn append(events: &dyn EventStore, range: std::ops::Range<u64>) {
    let appends = range.map(|n| async move {
        let (stream, e) = event(n);
        events
            .append(&stream, ExpectedRevision::Any, vec![e])
            .await
            .unwrap();
    });
    futures::future::join_all(appends).await;
}

async fn wait_for(applied: &Mutex<Vec<Position>>, position: Position) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while applied.lock().unwrap().last().copied().unwrap_or(0) < position {
        assert!(Instant::now() < deadline, "not applied up to {position}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A recording read store in `dir`.
fn recording(dir: &std::path::Path) -> Recording {
    Recording {
        inner: SqliteReadStore::open(dir.join("readmodels")).unwrap(),
        applied: Arc::default(),
    }
}

/// Starts a learners runner; send `true` to stop it.
fn spawn_runner(
    events: &Arc<dyn EventStore>,
    read: &Recording,
    config: RunnerConfig,
) -> (
    watch::Sender<bool>,
    tokio::task::JoinHandle<Result<(), tracker_projections::runner::RunnerError>>,
) {
    let (stop, stopped) = watch::channel(false);
    let runner = Runner::new(
        Arc::clone(events),
        Arc::new(read.clone()),
        ProjectionKind::Learners,
        config,
    );
    (stop, tokio::spawn(runner.run(stopped)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_behind_applies_whole_batches_then_follows_live() {
    let dir = tempfile::tempdir().unwrap();
    let events: Arc<dyn EventStore> =
        Arc::new(SqliteEventStore::open(dir.path().join("events.sqlite")).unwrap());
    let read = recording(dir.path());
    append(events.as_ref(), 0..2_500).await;

    let config = RunnerConfig {
        batch_size: 1_000,
        ..RunnerConfig::default()
    };
    let (stop, task) = spawn_runner(&events, &read, config);
    wait_for(&read.applied, 2_500).await;
    // The subscription would hand over its own read size (512 for the
    // embedded store); the catch-up reads `batch_size` at a time.
    assert_eq!(*read.applied.lock().unwrap(), vec![1_000, 2_000, 2_500]);

    // Caught up: a live append is applied on its own, without waiting for
    // a batch to fill.
    append(events.as_ref(), 2_500..2_501).await;
    wait_for(&read.applied, 2_501).await;
    assert_eq!(read.applied.lock().unwrap().last(), Some(&2_501));

    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    let key = CheckpointKey::whole(ProjectionKind::Learners);
    assert_eq!(read.checkpoint(key).await.unwrap(), 2_501);
}

/// The embedded event store with faults: a first subscription that yields
/// one event and, in the same burst, an error, then ends (as a store's
/// subscription does when it fails); reads of the log that take a while.
#[derive(Debug)]
struct Faulty {
    inner: SqliteEventStore,
    subscription_failed: std::sync::atomic::AtomicBool,
    read_delay: Duration,
}

impl Faulty {
    fn open(dir: &std::path::Path, fail_a_subscription: bool, read_delay: Duration) -> Self {
        Self {
            inner: SqliteEventStore::open(dir.join("events.sqlite")).unwrap(),
            subscription_failed: std::sync::atomic::AtomicBool::new(!fail_a_subscription),
            read_delay,
        }
    }
}

#[async_trait]
impl EventStore for Faulty {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedRevision,
        events: Vec<NewEvent>,
    ) -> Result<tracker_store::AppendOutcome, tracker_store::AppendError> {
        self.inner.append(stream, expected, events).await
    }
    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<tracker_store::RecordedEvent>, tracker_store::StoreError> {
        self.inner.read_stream(stream, from, limit).await
    }
    async fn read_all(
        &self,
        read: tracker_store::ReadAll,
    ) -> Result<Vec<tracker_store::RecordedEvent>, tracker_store::StoreError> {
        tokio::time::sleep(self.read_delay).await;
        self.inner.read_all(read).await
    }
    async fn head(&self) -> Result<Position, tracker_store::StoreError> {
        self.inner.head().await
    }
    fn subscribe_all(&self, from: Position) -> tracker_store::Subscription {
        use futures::StreamExt as _;
        let inner = self.inner.subscribe_all(from);
        if self
            .subscription_failed
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return inner;
        }
        Box::pin(inner.take(1).chain(futures::stream::iter([Err(
            tracker_store::StoreError::Storage("injected subscription failure".into()),
        )])))
    }
    async fn writable(&self) -> Result<(), tracker_store::StoreError> {
        self.inner.writable().await
    }
}

/// A subscription that fails in the middle of a burst is retried, not
/// taken for the end of the log: the runner goes on projecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_failing_mid_burst_is_retried_not_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let events: Arc<dyn EventStore> = Arc::new(Faulty::open(dir.path(), true, Duration::ZERO));
    let read = recording(dir.path());
    append(events.as_ref(), 0..10).await;
    let (stop, task) = spawn_runner(&events, &read, RunnerConfig::default());
    wait_for(&read.applied, 10).await;
    // Live: the first subscription hands over one event and fails.
    append(events.as_ref(), 10..13).await;
    append(events.as_ref(), 13..20).await;
    wait_for(&read.applied, 20).await;
    assert!(!task.is_finished(), "the runner stopped");
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    let key = CheckpointKey::whole(ProjectionKind::Learners);
    assert_eq!(read.checkpoint(key).await.unwrap(), 20);
}

/// Reading a batch that outlasts the lease does not lose the lease for
/// good: it is renewed before the batch is written, and the projection
/// advances (it used to find the lease expired at every write and read the
/// same batch again, for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_slower_to_read_than_the_lease_still_advance() {
    let dir = tempfile::tempdir().unwrap();
    let events: Arc<dyn EventStore> = Arc::new(Faulty::open(
        dir.path(),
        false,
        Duration::from_millis(1_200),
    ));
    let read = recording(dir.path());
    append(events.as_ref(), 0..30).await;
    let config = RunnerConfig {
        batch_size: 10,
        lease: Some((LeaseHolder::new_random(), Duration::from_secs(1))),
        ..RunnerConfig::default()
    };
    let (stop, task) = spawn_runner(&events, &read, config);
    wait_for(&read.applied, 30).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

/// A runner halted by `on_error = stop` lets go of its lease, so that a
/// standby projector (once the event is dealt with) need not wait it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halted_runner_releases_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let events: Arc<dyn EventStore> =
        Arc::new(SqliteEventStore::open(dir.path().join("events.sqlite")).unwrap());
    let read = SqliteReadStore::open(dir.path().join("readmodels")).unwrap();
    append(events.as_ref(), 0..3).await;
    let (_, mut undecodable) = event(99);
    undecodable.data = "{\"not\": \"a completion\"}".into();
    events
        .append("learner-1-1", ExpectedRevision::Any, vec![undecodable])
        .await
        .unwrap();
    let config = RunnerConfig {
        on_error: tracker_projections::runner::OnError::Stop,
        ..RunnerConfig::default()
    };
    let (_stop, stopped) = watch::channel(false);
    let ended = tokio::time::timeout(
        Duration::from_secs(20),
        Runner::new(
            Arc::clone(&events),
            Arc::new(read.clone()),
            ProjectionKind::Learners,
            config,
        )
        .run(stopped),
    )
    .await
    .expect("the runner halts");
    assert!(
        matches!(
            ended,
            Err(tracker_projections::runner::RunnerError::Halted { position: 4, .. })
        ),
        "{ended:?}"
    );
    assert!(read.live_leases().await.unwrap().is_empty());
}

/// A subscription that simply ends means the store was shut down (a node
/// being drained): the runner stops rather than retry for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_stops_when_its_store_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteEventStore::open(dir.path().join("events.sqlite")).unwrap();
    let events: Arc<dyn EventStore> = Arc::new(store.clone());
    let read = recording(dir.path());
    append(events.as_ref(), 0..5).await;
    let (_stop, task) = spawn_runner(&events, &read, RunnerConfig::default());
    wait_for(&read.applied, 5).await;
    store.close().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the runner stops once its store is closed");
    ended.unwrap().unwrap();
}
