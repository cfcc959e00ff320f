//! The projections on the embedded stores: read models from a known event
//! set, the runner live and under failure, partitions, leases, rebuilds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use proptest::prelude::*;
use tokio::sync::watch;
use tracker_domain::{SourceTimeZone, parse_delivery};
use tracker_projections::model::{Completion, CourseRef};
use tracker_projections::readstore::{ApplyBatch, LeaseHolder, Snapshot};
use tracker_projections::runner::{OnError, Runner, RunnerConfig, RunnerError};
use tracker_projections::sqlite::SqliteReadStore;
use tracker_projections::{CheckpointKey, Partition, ProjectionKind, ReadStore, ReadStoreError};
use tracker_store::sqlite::SqliteEventStore;
use tracker_store::{EventMetadata, EventStore, ExpectedRevision, NewEvent};

struct Env {
    _dir: tempfile::TempDir,
    events: Arc<dyn EventStore>,
    read: SqliteReadStore,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let events: Arc<dyn EventStore> =
        Arc::new(SqliteEventStore::open(dir.path().join("events.sqlite")).unwrap());
    let read = SqliteReadStore::open(dir.path().join("readmodels")).unwrap();
    Env {
        _dir: dir,
        events,
        read,
    }
}

fn delivery(
    inst: u64,
    user: u64,
    user_name: &str,
    trail: u64,
    trail_name: &str,
    finished: &str,
    courses: &[(u64, &str)],
) -> String {
    serde_json::json!({
        "event": {"slug": "activities.trail.completed", "send_at": finished},
        "data": {
            "institution": {"id": inst},
            "user": {"id": user, "name": user_name, "email": format!("{user}@example.edu.br")},
            "trail": {"id": trail, "name": trail_name, "finished_at": finished,
                "courses": courses.iter().map(|(id, t)| serde_json::json!({"id": id, "title": t})).collect::<Vec<_>>()}
        }
    })
    .to_string()
}

async fn ingest(events: &dyn EventStore, body: &str) -> u64 {
    let zone = SourceTimeZone::default();
    let parsed = parse_delivery(body.as_bytes(), &zone).unwrap();
    let event = NewEvent {
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
    };
    let out = events
        .append(&parsed.stream(), ExpectedRevision::Any, vec![event])
        .await
        .unwrap();
    out.events[0].position
}

/// The known event set of `known_read_models`.
async fn ingest_known(events: &dyn EventStore) {
    ingest(
        events,
        &delivery(
            1,
            10,
            "Ana",
            100,
            "Trilha A",
            "2024-03-01 10:00:00",
            &[(1000, "C1"), (1001, "C2")],
        ),
    )
    .await;
    ingest(
        events,
        &delivery(
            1,
            11,
            "Bruno",
            100,
            "Trilha A",
            "2024-03-01 23:30:00",
            &[(1000, "C1"), (1001, "C2")],
        ),
    )
    .await;
    ingest(
        events,
        &delivery(
            1,
            10,
            "Ana Maria",
            100,
            "Trilha A",
            "2024-03-05 08:00:00",
            &[(1000, "C1"), (1001, "C2")],
        ),
    )
    .await;
    ingest(
        events,
        &delivery(
            1,
            10,
            "Ana Maria",
            101,
            "Trilha B",
            "2024-03-02 09:00:00",
            &[(1001, "C2 novo título"), (1002, "C3")],
        ),
    )
    .await;
    ingest(
        events,
        &delivery(
            2,
            10,
            "Outra Ana",
            100,
            "Trail A elsewhere",
            "2024-03-01 12:00:00",
            &[(1000, "X")],
        ),
    )
    .await;
    ingest(events, r#"{"event":{"slug":"activities.course.completed"},"data":{"institution":{"id":1},"user":{"id":10}}}"#).await;
}

fn runner(env: &Env, kind: ProjectionKind, config: RunnerConfig) -> Runner {
    Runner::new(
        Arc::clone(&env.events),
        Arc::new(env.read.clone()),
        kind,
        config,
    )
}

/// Starts both projections; returns the shutdown switch and their tasks.
fn start_all(
    env: &Env,
    config: RunnerConfig,
) -> (
    watch::Sender<bool>,
    Vec<tokio::task::JoinHandle<Result<(), RunnerError>>>,
) {
    let (tx, rx) = watch::channel(false);
    let tasks = ProjectionKind::ALL
        .into_iter()
        .map(|kind| tokio::spawn(runner(env, kind, config.clone()).run(rx.clone())))
        .collect();
    (tx, tasks)
}

async fn stop(
    tx: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), RunnerError>>>,
) {
    tx.send(true).unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// Waits until every checkpoint of `read` reaches `position`.
async fn caught_up(read: &dyn ReadStore, position: u64, keys: &[CheckpointKey]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut all = true;
        for key in keys {
            if read.checkpoint(*key).await.unwrap() < position {
                all = false;
            }
        }
        if all {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "projections did not reach {position}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn whole_keys() -> Vec<CheckpointKey> {
    ProjectionKind::ALL
        .into_iter()
        .map(CheckpointKey::whole)
        .collect()
}

fn table<'a>(s: &'a Snapshot, name: &str) -> &'a Vec<Vec<String>> {
    &s.tables.iter().find(|(n, _)| n == name).unwrap().1
}

fn row<'a>(s: &'a Snapshot, name: &str, key: &[&str]) -> &'a Vec<String> {
    table(s, name)
        .iter()
        .find(|r| r.iter().zip(key).all(|(a, b)| a == b))
        .unwrap_or_else(|| panic!("no row {key:?} in {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_read_models() {
    let env = env();
    ingest_known(&*env.events).await;
    let (tx, tasks) = start_all(&env, RunnerConfig::default());
    caught_up(&env.read, 6, &whole_keys()).await;
    stop(tx, tasks).await;
    let s = env.read.snapshot().await.unwrap();

    // institution_id, completions, learners, trails, courses, first, last, last_position
    assert_eq!(
        row(&s, "inst_summary", &["1"]),
        &[
            "1",
            "4",
            "2",
            "2",
            "3",
            "2024-03-01T13:00:00Z",
            "2024-03-05T11:00:00Z",
            "4"
        ]
    );
    assert_eq!(
        row(&s, "inst_summary", &["2"]),
        &[
            "2",
            "1",
            "1",
            "1",
            "1",
            "2024-03-01T15:00:00Z",
            "2024-03-01T15:00:00Z",
            "5"
        ]
    );
    // institution, trail, name, name_position, completions, learners, first, last
    assert_eq!(
        row(&s, "inst_trails", &["1", "100"]),
        &[
            "1",
            "100",
            "Trilha A",
            "3",
            "3",
            "2",
            "2024-03-01T13:00:00Z",
            "2024-03-05T11:00:00Z"
        ]
    );
    assert_eq!(row(&s, "inst_trails", &["1", "101"])[4..6], ["1", "1"]);
    // institution, course, title, title_position, completions, learners
    assert_eq!(
        row(&s, "inst_courses", &["1", "1000"]),
        &["1", "1000", "C1", "3", "3", "2"]
    );
    assert_eq!(
        row(&s, "inst_courses", &["1", "1001"]),
        &["1", "1001", "C2 novo título", "4", "4", "2"]
    );
    assert_eq!(
        row(&s, "inst_courses", &["1", "1002"]),
        &["1", "1002", "C3", "4", "1", "1"]
    );
    assert_eq!(table(&s, "inst_trail_courses").len(), 4 + 1);
    // 23:30 in São Paulo on 1 March is 2 March in UTC, but the source's day is 1 March.
    let days: Vec<_> = table(&s, "inst_daily")
        .iter()
        .filter(|r| r[0] == "1")
        .cloned()
        .collect();
    assert_eq!(
        days,
        [
            vec!["1", "2024-03-01", "2", "2"],
            vec!["1", "2024-03-02", "1", "1"],
            vec!["1", "2024-03-05", "1", "1"],
        ]
    );
    // institution, user, name, email, profile_position, trails, completions, first, last
    assert_eq!(
        row(&s, "lrn_learners", &["1", "10"])[2..7],
        ["Ana Maria", "10@example.edu.br", "4", "2", "3"]
    );
    assert_eq!(row(&s, "lrn_learners", &["1", "11"])[5..7], ["1", "1"]);
    assert_eq!(row(&s, "lrn_learners", &["2", "10"])[2], "Outra Ana");
    assert_eq!(row(&s, "lrn_learner_trails", &["1", "10", "100"])[3], "2");
    let completions = table(&s, "lrn_completions");
    assert_eq!(completions.len(), 5, "the other slug is not a completion");
    assert_eq!(completions[1][6], "2024-03-01 23:30:00");
    assert_eq!(completions[1][7], "2024-03-02T02:30:00Z");
    assert_eq!(
        completions[3][9],
        r#"[{"id":1001,"title":"C2 novo título"},{"id":1002,"title":"C3"}]"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_events_appear_without_restart() {
    let env = env();
    let (tx, tasks) = start_all(&env, RunnerConfig::default());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let p = ingest(
        &*env.events,
        &delivery(7, 1, "L", 5, "T", "2024-01-01 10:00:00", &[(50, "C")]),
    )
    .await;
    caught_up(&env.read, p, &whole_keys()).await;
    let s = env.read.snapshot().await.unwrap();
    assert_eq!(row(&s, "inst_summary", &["7"])[1], "1");
    let p = ingest(
        &*env.events,
        &delivery(7, 2, "M", 5, "T", "2024-01-02 10:00:00", &[(50, "C")]),
    )
    .await;
    caught_up(&env.read, p, &whole_keys()).await;
    let s = env.read.snapshot().await.unwrap();
    assert_eq!(row(&s, "inst_summary", &["7"])[1..3], ["2", "2"]);
    stop(tx, tasks).await;
}

async fn append_undecodable(events: &dyn EventStore) -> u64 {
    let out = events
        .append(
            "learner-1-1",
            ExpectedRevision::Any,
            vec![NewEvent {
                id: uuid::Uuid::new_v4(),
                event_type: "TrailCompleted".into(),
                schema_version: 1,
                data: r#"{"institution_id": 1}"#.into(),
                metadata: EventMetadata {
                    received_at: Utc::now(),
                    source_id: "t".into(),
                    request_id: "r".into(),
                    content_hash: "sha256:00".into(),
                },
            }],
        )
        .await
        .unwrap();
    out.events[0].position
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_events_go_to_dead_letters_and_the_projection_goes_on() {
    let env = env();
    ingest(
        &*env.events,
        &delivery(1, 1, "A", 1, "T", "2024-01-01 10:00:00", &[]),
    )
    .await;
    let bad = append_undecodable(&*env.events).await;
    let last = ingest(
        &*env.events,
        &delivery(1, 2, "B", 1, "T", "2024-01-01 11:00:00", &[]),
    )
    .await;
    let (tx, tasks) = start_all(&env, RunnerConfig::default());
    caught_up(&env.read, last, &whole_keys()).await;
    stop(tx, tasks).await;
    let dead = env.read.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 2, "one per projection: {dead:?}");
    assert!(
        dead.iter()
            .all(|d| d.position == bad && d.event_type == "TrailCompleted")
    );
    assert!(
        dead[0].error.contains("schema") || dead[0].error.contains("missing"),
        "{}",
        dead[0].error
    );
    assert_eq!(env.read.dead_letter_count().await.unwrap(), 2);
    let s = env.read.snapshot().await.unwrap();
    assert_eq!(row(&s, "inst_summary", &["1"])[1], "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_stop_halts_before_the_bad_event() {
    let env = env();
    ingest(
        &*env.events,
        &delivery(1, 1, "A", 1, "T", "2024-01-01 10:00:00", &[]),
    )
    .await;
    let bad = append_undecodable(&*env.events).await;
    ingest(
        &*env.events,
        &delivery(1, 2, "B", 1, "T", "2024-01-01 11:00:00", &[]),
    )
    .await;
    let config = RunnerConfig {
        on_error: OnError::Stop,
        ..RunnerConfig::default()
    };
    let (_tx, rx) = watch::channel(false);
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        runner(&env, ProjectionKind::Institutions, config).run(rx),
    )
    .await
    .unwrap();
    match result {
        Err(RunnerError::Halted { position, .. }) => assert_eq!(position, bad),
        other => panic!("expected a halt, got {other:?}"),
    }
    let key = CheckpointKey::whole(ProjectionKind::Institutions);
    assert_eq!(env.read.checkpoint(key).await.unwrap(), bad - 1);
    assert_eq!(env.read.dead_letter_count().await.unwrap(), 0);
}

/// A lease as long as `Duration` allows is kept (ten years at most), not
/// wrapped into one already expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_lease_holds() {
    let env = env();
    let name = CheckpointKey::whole(ProjectionKind::Learners).to_string();
    let (a, b) = (LeaseHolder::new_random(), LeaseHolder::new_random());
    assert!(
        env.read
            .acquire_lease(&name, &a, Duration::MAX)
            .await
            .unwrap()
    );
    assert!(
        !env.read
            .acquire_lease(&name, &b, Duration::from_secs(1))
            .await
            .unwrap()
    );
    assert!(
        env.read
            .acquire_lease(&name, &a, Duration::MAX)
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_keeps_a_second_projector_out() {
    let env = env();
    let name = CheckpointKey::whole(ProjectionKind::Learners).to_string();
    let (a, b) = (LeaseHolder::new_random(), LeaseHolder::new_random());
    let ttl = Duration::from_millis(300);
    assert!(env.read.acquire_lease(&name, &a, ttl).await.unwrap());
    assert!(!env.read.acquire_lease(&name, &b, ttl).await.unwrap());
    // B writing anyway is refused, and nothing is written.
    let batch = ApplyBatch {
        after: 0,
        key: CheckpointKey::whole(ProjectionKind::Learners),
        completions: vec![Completion {
            position: 1,
            event_id: uuid::Uuid::new_v4(),
            institution_id: 1,
            user_id: 1,
            user_name: "x".into(),
            user_email: "x".into(),
            trail_id: 1,
            trail_name: "t".into(),
            courses: vec![CourseRef {
                id: 1,
                title: "c".into(),
            }],
            finished_at_raw: "2024-01-01 00:00:00".into(),
            finished_at: Utc::now(),
            day: "2024-01-01".into(),
        }],
        dead_letters: vec![],
        through: 1,
        lease: Some((b.clone(), ttl)),
    };
    assert!(matches!(
        env.read.apply(batch.clone()).await,
        Err(ReadStoreError::LeaseLost(_))
    ));
    assert_eq!(env.read.checkpoint(batch.key).await.unwrap(), 0);
    // When A's lease runs out, B takes over.
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    assert!(env.read.acquire_lease(&name, &b, ttl).await.unwrap());
    env.read.apply(batch.clone()).await.unwrap();
    assert_eq!(env.read.checkpoint(batch.key).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_projectors_on_one_key_do_not_double_count() {
    let env = env();
    for i in 0..200u64 {
        ingest(
            &*env.events,
            &delivery(
                1 + i % 3,
                i + 1,
                "L",
                1 + i % 4,
                "T",
                "2024-01-01 10:00:00",
                &[(9, "C")],
            ),
        )
        .await;
    }
    let (tx1, t1) = start_all(&env, RunnerConfig::default());
    let (tx2, t2) = start_all(&env, RunnerConfig::default());
    caught_up(&env.read, 200, &whole_keys()).await;
    stop(tx1, t1).await;
    stop(tx2, t2).await;
    let s = env.read.snapshot().await.unwrap();
    let total: u64 = table(&s, "inst_summary")
        .iter()
        .map(|r| r[1].parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 200);
    assert_eq!(table(&s, "lrn_completions").len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_together_equal_the_whole() {
    let whole = env();
    let split = env();
    for i in 0..120u64 {
        let body = delivery(
            1 + i % 5,
            1 + i % 17,
            "L",
            1 + i % 4,
            "T",
            &format!("2024-01-{:02} 10:00:00", 1 + i % 20),
            &[(9, "C"), (10 + i % 3, "D")],
        );
        ingest(&*whole.events, &body).await;
        ingest(&*split.events, &body).await;
    }
    let (tx, tasks) = start_all(&whole, RunnerConfig::default());
    caught_up(&whole.read, 120, &whole_keys()).await;
    stop(tx, tasks).await;

    let (tx, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut keys = Vec::new();
    for index in 0..2 {
        for kind in ProjectionKind::ALL {
            let config = RunnerConfig {
                partition: Partition { index, count: 2 },
                ..RunnerConfig::default()
            };
            let r = runner(&split, kind, config);
            keys.push(r.key());
            tasks.push(tokio::spawn(r.run(rx.clone())));
        }
    }
    caught_up(&split.read, 120, &keys).await;
    stop(tx, tasks).await;
    assert_eq!(
        whole.read.snapshot().await.unwrap(),
        split.read.snapshot().await.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_during_live_ingest_ends_identical_to_a_clean_rebuild() {
    let env = env();
    for i in 0..300u64 {
        ingest(
            &*env.events,
            &delivery(
                1 + i % 4,
                1 + i % 50,
                "L",
                1 + i % 6,
                "T",
                "2024-02-01 10:00:00",
                &[(1, "C")],
            ),
        )
        .await;
    }
    let (tx, tasks) = start_all(&env, RunnerConfig::default());
    caught_up(&env.read, 300, &whole_keys()).await;
    let before = env.read.generation();

    // Keep ingesting, and keep reading, while the rebuild runs.
    let writer = {
        let events = Arc::clone(&env.events);
        tokio::spawn(async move {
            let mut last = 0;
            for i in 300..500u64 {
                last = ingest(
                    &*events,
                    &delivery(
                        1 + i % 4,
                        1 + i % 50,
                        "L",
                        1 + i % 6,
                        "T",
                        "2024-02-02 10:00:00",
                        &[(1, "C")],
                    ),
                )
                .await;
            }
            last
        })
    };
    let reader = {
        let read = env.read.clone();
        tokio::spawn(async move {
            for _ in 0..50 {
                let s = read.snapshot().await.unwrap();
                assert!(
                    !table(&s, "inst_summary").is_empty(),
                    "read models stay readable"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let generation =
        tracker_projections::replay::replay(Arc::clone(&env.events), &env.read, |_| {})
            .await
            .unwrap();
    assert_ne!(generation, before);
    let last = writer.await.unwrap();
    reader.await.unwrap();
    env.read.follow_current().await.unwrap();
    assert_eq!(env.read.generation(), generation);
    caught_up(&env.read, last, &whole_keys()).await;
    stop(tx, tasks).await;
    let live = env.read.snapshot().await.unwrap();

    // A clean rebuild of the same log.
    let clean = tracker_projections::replay::replay(Arc::clone(&env.events), &env.read, |_| {})
        .await
        .unwrap();
    env.read.follow_current().await.unwrap();
    assert_eq!(env.read.generation(), clean);
    assert_eq!(env.read.snapshot().await.unwrap(), live);
    let total: u64 = table(&live, "inst_summary")
        .iter()
        .map(|r| r[1].parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 500);
}

fn completions_strategy() -> impl Strategy<Value = Vec<Completion>> {
    proptest::collection::vec(
        (
            1u64..4,
            1u64..6,
            1u64..5,
            0u32..40,
            proptest::collection::vec(1u64..8, 0..4),
            0u8..3,
        ),
        1..60,
    )
    .prop_map(|rows| {
        rows.into_iter()
            .enumerate()
            .map(|(i, (inst, user, trail, minute, courses, name))| {
                let raw = format!("2024-05-{:02} 10:{:02}:00", 1 + minute % 3, minute);
                Completion {
                    position: i as u64 + 1,
                    event_id: uuid::Uuid::from_u128(i as u128 + 1),
                    institution_id: inst,
                    user_id: user,
                    user_name: format!("user {user} v{name}"),
                    user_email: format!("{user}@x"),
                    trail_id: trail,
                    trail_name: format!("trail {trail} v{name}"),
                    courses: courses
                        .into_iter()
                        .map(|id| CourseRef {
                            id,
                            title: format!("c{id} v{name}"),
                        })
                        .collect(),
                    finished_at: chrono::NaiveDateTime::parse_from_str(&raw, "%Y-%m-%d %H:%M:%S")
                        .unwrap()
                        .and_utc(),
                    day: raw[..10].to_owned(),
                    finished_at_raw: raw,
                }
            })
            .collect()
    })
}

async fn apply_ranges(read: &SqliteReadStore, events: &[Completion], ranges: &[(usize, usize)]) {
    for kind in ProjectionKind::ALL {
        for &(a, b) in ranges {
            read.apply(ApplyBatch {
                after: 0,
                key: CheckpointKey::whole(kind),
                completions: events[a..b].to_vec(),
                dead_letters: vec![],
                through: events[b - 1].position,
                lease: None,
            })
            .await
            .unwrap();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    /// Any re-delivery at-least-once delivery can produce (restarts from an
    /// earlier point, repeated batches, any batch sizes) leaves the read
    /// models equal to one clean in-order application.
    #[test]
    fn redelivery_changes_nothing(events in completions_strategy(), cuts in proptest::collection::vec((0usize..100, 0usize..100), 1..12)) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let n = events.len();
            let clean = env();
            apply_ranges(&clean.read, &events, &[(0, n)]).await;

            // Batches [a, b): each ends after the previous end and starts at
            // or before it: a restart re-sends what came after an older
            // checkpoint, but never skips past the last one.
            let mut ranges = Vec::new();
            let mut end = 0;
            for (x, y) in cuts {
                let b = (end + 1 + y % n).min(n);
                let a = x % (end + 1);
                ranges.push((a, b));
                end = b;
                if end == n { break; }
            }
            if end < n { ranges.push((0, n)); }
            let messy = env();
            apply_ranges(&messy.read, &events, &ranges).await;
            // And the whole thing once more.
            apply_ranges(&messy.read, &events, &[(0, n)]).await;
            prop_assert!(clean.read.snapshot().await.unwrap() == messy.read.snapshot().await.unwrap(), "redelivered read models differ from a clean application");
            Ok(())
        })?;
    }
}

/// Eight stores opened at once, each with connections of its own (threads
/// here; processes lock the same files the same way).
#[test]
fn stores_opening_a_new_read_store_together_agree_on_one_generation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("readmodels");
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (path, barrier) = (path.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                SqliteReadStore::open(&path).map(|s| s.generation())
            })
        })
        .collect();
    let generations: Vec<String> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert!(generations.iter().all(|g| g == "g1"), "{generations:?}");
}

/// Workers of different partition schemes would apply the same events under
/// different checkpoint keys: the runner refuses to start behind another
/// scheme's progress, and waits while another scheme's worker is live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_schemes_are_never_mixed() {
    let env = env();
    for i in 0..20u64 {
        ingest(
            &*env.events,
            &delivery(1 + i % 3, 1 + i, "L", 1, "T", "2024-01-01 10:00:00", &[]),
        )
        .await;
    }
    let half = |index| RunnerConfig {
        partition: Partition { index, count: 2 },
        ..RunnerConfig::default()
    };
    // Whole, then halves: the halves start from the whole checkpoint.
    let (tx, tasks) = start_all(&env, RunnerConfig::default());
    caught_up(&env.read, 20, &whole_keys()).await;
    stop(tx, tasks).await;
    let (tx, rx) = watch::channel(false);
    let halves: Vec<_> = (0..2)
        .map(|i| runner(&env, ProjectionKind::Institutions, half(i)))
        .collect();
    let keys: Vec<_> = halves.iter().map(Runner::key).collect();
    let tasks: Vec<_> = halves
        .into_iter()
        .map(|r| tokio::spawn(r.run(rx.clone())))
        .collect();
    let last = ingest(
        &*env.events,
        &delivery(2, 99, "L", 1, "T", "2024-01-02 10:00:00", &[]),
    )
    .await;
    caught_up(&env.read, last, &keys).await;

    // While the halves run, a whole worker waits instead of projecting.
    let (whole_tx, whole_rx) = watch::channel(false);
    let whole = tokio::spawn(
        runner(&env, ProjectionKind::Institutions, RunnerConfig::default()).run(whole_rx),
    );
    let another = ingest(
        &*env.events,
        &delivery(1, 98, "L", 1, "T", "2024-01-02 11:00:00", &[]),
    )
    .await;
    caught_up(&env.read, another, &keys).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let key = CheckpointKey::whole(ProjectionKind::Institutions);
    assert_eq!(
        env.read.checkpoint(key).await.unwrap(),
        20,
        "the whole worker projected beside the halves"
    );
    whole_tx.send(true).unwrap();
    whole.await.unwrap().unwrap();
    tx.send(true).unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let s = env.read.snapshot().await.unwrap();
    let total: u64 = table(&s, "inst_summary")
        .iter()
        .map(|r| r[1].parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 22, "each event counted once");

    // With the halves stopped but ahead, a whole worker refuses to start.
    let (_tx, rx) = watch::channel(false);
    let result = runner(&env, ProjectionKind::Institutions, RunnerConfig::default())
        .run(rx)
        .await;
    assert!(
        matches!(result, Err(RunnerError::PartitionSchemeChanged { .. })),
        "{result:?}"
    );
}

/// A rebuilt generation is built without its read-side indexes (faster) and
/// must come out with exactly the indexes and journal mode of a normal one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_generation_has_every_index_back() {
    let env = env();
    ingest_known(&*env.events).await;
    let dir = env.read.dir().to_path_buf();
    let first = env.read.generation();
    let rebuilt = tracker_projections::replay::replay(Arc::clone(&env.events), &env.read, |_| {})
        .await
        .unwrap();
    let describe = |generation: &str| {
        let mut indexes = Vec::new();
        let mut modes = Vec::new();
        for kind in ProjectionKind::ALL {
            let conn = rusqlite::Connection::open(
                dir.join(format!("{generation}.{}.sqlite", kind.name())),
            )
            .unwrap();
            let mut stmt = conn
                .prepare("SELECT name || ':' || COALESCE(sql, '') FROM sqlite_master WHERE type IN ('index', 'table') ORDER BY name")
                .unwrap();
            let names = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .unwrap()
                .map(|n| format!("{}/{}", kind.name(), n.unwrap()));
            indexes.extend(names);
            drop(stmt);
            let mode: String = conn
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap();
            modes.push(mode);
        }
        (indexes, modes)
    };
    let (fresh, fresh_modes) = describe(&first);
    let (built, built_modes) = describe(&rebuilt);
    assert!(
        fresh
            .iter()
            .any(|i| i.starts_with("institutions/inst_trails_by_name")),
        "{fresh:?}"
    );
    assert!(
        fresh
            .iter()
            .any(|i| i.starts_with("learners/lrn_completions_by_time")),
        "{fresh:?}"
    );
    assert_eq!(built, fresh);
    assert_eq!(built_modes, ["wal", "wal"]);
    assert_eq!(fresh_modes, ["wal", "wal"]);
}

/// A switch keeps the generation it replaces and removes every file of the
/// ones before it, a single file of the layout before the projections had
/// one each included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_removes_every_file_of_older_generations() {
    let env = env();
    ingest_known(&*env.events).await;
    let dir = env.read.dir().to_path_buf();
    let first = env.read.generation();
    std::fs::write(dir.join(format!("{first}.sqlite")), b"").unwrap();
    let files = |generation: &str| {
        ["sqlite", "institutions.sqlite", "learners.sqlite"]
            .map(|suffix| dir.join(format!("{generation}.{suffix}")).exists())
    };
    assert_eq!(files(&first), [true, true, true]);
    let replay = || tracker_projections::replay::replay(Arc::clone(&env.events), &env.read, |_| {});
    let second = replay().await.unwrap();
    assert_eq!(
        files(&first),
        [true, true, true],
        "the replaced one is kept"
    );
    let third = replay().await.unwrap();
    assert_eq!(files(&first), [false, false, false]);
    assert_eq!(files(&second), [false, true, true]);
    assert_eq!(files(&third), [false, true, true]);
}

/// Each projection has a file of its own, holding only its own tables
/// (with the checkpoints, leases and dead letters that commit with them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_projection_has_a_file_with_only_its_tables() {
    let env = env();
    let generation = env.read.generation();
    let tables = |kind: ProjectionKind| {
        let conn = rusqlite::Connection::open(
            env.read
                .dir()
                .join(format!("{generation}.{}.sqlite", kind.name())),
        )
        .unwrap();
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap();
        stmt.query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    };
    let institutions = tables(ProjectionKind::Institutions);
    let learners = tables(ProjectionKind::Learners);
    for common in ["checkpoints", "dead_letters", "leases"] {
        assert!(institutions.iter().any(|t| t == common), "{institutions:?}");
        assert!(learners.iter().any(|t| t == common), "{learners:?}");
    }
    assert!(
        institutions.iter().any(|t| t == "inst_summary")
            && !institutions.iter().any(|t| t.starts_with("lrn_")),
        "{institutions:?}"
    );
    assert!(
        learners.iter().any(|t| t == "lrn_completions")
            && !learners.iter().any(|t| t.starts_with("inst_")),
        "{learners:?}"
    );
    assert!(
        !env.read.dir().join(format!("{generation}.sqlite")).exists(),
        "no single file for both"
    );
    // Event ids are unique in the log; the read model does not index them
    // (a random-key insert per completion).
    let conn =
        rusqlite::Connection::open(env.read.dir().join(format!("{generation}.learners.sqlite")))
            .unwrap();
    let indexed: Vec<String> = conn
        .prepare("SELECT DISTINCT ii.name FROM pragma_index_list('lrn_completions') il, pragma_index_info(il.name) ii")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(indexed.iter().any(|c| c == "user_id"), "{indexed:?}");
    assert!(!indexed.iter().any(|c| c == "event_id"), "{indexed:?}");
}

/// The projections write through a connection each: a batch of one is
/// applied while the other's connection is busy (SQLite allows one writer
/// per file; with one file for both they took turns).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_projection_applies_while_the_others_connection_is_busy() {
    let env = env();
    let (release, held) = std::sync::mpsc::channel::<()>();
    let (started, busy) = tokio::sync::oneshot::channel::<()>();
    let hold = {
        let read = env.read.clone();
        tokio::spawn(async move {
            read.with_conn(ProjectionKind::Institutions, move |conn, _| {
                let tx = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(|e| ReadStoreError::Storage(e.to_string()))?;
                let _ = started.send(());
                let _ = held.recv_timeout(Duration::from_secs(30));
                tx.commit()
                    .map_err(|e| ReadStoreError::Storage(e.to_string()))
            })
            .await
        })
    };
    busy.await.unwrap();
    let applied = tokio::time::timeout(
        Duration::from_secs(10),
        env.read.apply(ApplyBatch {
            after: 0,
            key: CheckpointKey::whole(ProjectionKind::Learners),
            completions: Vec::new(),
            dead_letters: Vec::new(),
            through: 7,
            lease: None,
        }),
    )
    .await;
    release.send(()).unwrap();
    hold.await.unwrap().unwrap();
    applied
        .expect("the learners batch waited for the institutions connection")
        .unwrap();
    assert_eq!(
        env.read
            .checkpoint(CheckpointKey::whole(ProjectionKind::Learners))
            .await
            .unwrap(),
        7
    );
}

/// One entry of a generated log: a completion, an undecodable completion
/// or an event of another type.
#[derive(Debug, Clone)]
enum Logged {
    Completion {
        inst: u64,
        user: u64,
        trail: u64,
        day: u32,
        courses: Vec<u64>,
        name: u8,
    },
    Undecodable,
    Other,
}

fn log_strategy() -> impl Strategy<Value = Vec<Logged>> {
    let completion = (
        1u64..4,
        1u64..7,
        1u64..5,
        0u32..6,
        proptest::collection::vec(1u64..8, 0..4),
        0u8..3,
    )
        .prop_map(
            |(inst, user, trail, day, courses, name)| Logged::Completion {
                inst,
                user,
                trail,
                day,
                courses,
                name,
            },
        );
    proptest::collection::vec(
        prop_oneof![
            8 => completion,
            1 => Just(Logged::Undecodable),
            1 => Just(Logged::Other),
        ],
        1..50,
    )
}

async fn append_log(events: &dyn EventStore, log: &[Logged]) -> u64 {
    let mut last = 0;
    for (k, entry) in log.iter().enumerate() {
        last = match entry {
            Logged::Completion {
                inst,
                user,
                trail,
                day,
                courses,
                name,
            } => {
                let courses: Vec<(u64, String)> = courses
                    .iter()
                    .map(|c| (*c, format!("c{c} v{name}")))
                    .collect();
                let courses: Vec<(u64, &str)> =
                    courses.iter().map(|(c, t)| (*c, t.as_str())).collect();
                ingest(
                    events,
                    &delivery(
                        *inst,
                        *user,
                        &format!("user {user} v{name}"),
                        *trail,
                        &format!("trail {trail} v{name}"),
                        &format!("2024-05-{:02} {:02}:{:02}:00", 1 + day, k % 24, k % 60),
                        &courses,
                    ),
                )
                .await
            }
            Logged::Undecodable => append_undecodable(events).await,
            Logged::Other => {
                ingest(
                    events,
                    &format!(
                        r#"{{"event":{{"slug":"activities.course.completed"}},"data":{{"institution":{{"id":1}},"user":{{"id":{}}}}}}}"#,
                        k + 1
                    ),
                )
                .await
            }
        };
    }
    last
}

/// Everything a rebuild must reproduce: the read models, the checkpoints
/// and the dead letters (without when they were recorded).
async fn state(read: &dyn ReadStore) -> (Snapshot, Vec<(String, u64)>, Vec<String>) {
    let dead = read
        .dead_letters(10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|d| {
            format!(
                "{} {} {} {} {}",
                d.projection, d.position, d.event_id, d.event_type, d.error
            )
        })
        .collect();
    (
        read.snapshot().await.unwrap(),
        read.checkpoints().await.unwrap(),
        dead,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, .. ProptestConfig::default() })]
    /// A rebuild (folded in memory, bulk loaded) gives exactly what the
    /// live runner gives applying the same log incrementally in batches of
    /// any size: the same rows, dead letters and checkpoints (at the last
    /// position read, also when the log ends with events of other types).
    #[test]
    fn a_rebuild_equals_incremental_application(log in log_strategy(), batch_size in 1usize..12) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let env = env();
            let last = append_log(&*env.events, &log).await;
            let config = RunnerConfig { batch_size, ..RunnerConfig::default() };
            let (tx, tasks) = start_all(&env, config);
            caught_up(&env.read, last, &whole_keys()).await;
            stop(tx, tasks).await;
            let live = state(&env.read).await;

            tracker_projections::replay::replay(Arc::clone(&env.events), &env.read, |_| {})
                .await
                .unwrap();
            prop_assert!(env.read.follow_current().await.unwrap());
            let rebuilt = state(&env.read).await;
            prop_assert_eq!(&rebuilt.1, &live.1, "checkpoints");
            prop_assert_eq!(&rebuilt.2, &live.2, "dead letters");
            prop_assert!(rebuilt.0 == live.0, "rebuilt read models differ from incremental ones");
            let ends: Vec<u64> = rebuilt.1.iter().map(|(_, p)| *p).collect();
            prop_assert_eq!(ends, vec![last, last]);
            Ok(())
        })?;
    }
}

/// The live path goes on in a rebuilt generation: membership is complete,
/// so learners, trails and courses already seen do not count again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_continues_in_a_rebuilt_generation_without_double_counting() {
    let env = env();
    ingest_known(&*env.events).await;
    tracker_projections::replay::replay(Arc::clone(&env.events), &env.read, |_| {})
        .await
        .unwrap();
    env.read.follow_current().await.unwrap();
    // Same learner, trail, courses and day as the first event.
    let last = ingest(
        &*env.events,
        &delivery(
            1,
            10,
            "Ana Maria",
            100,
            "Trilha A",
            "2024-03-01 18:00:00",
            &[(1000, "C1"), (1001, "C2")],
        ),
    )
    .await;
    let (tx, tasks) = start_all(&env, RunnerConfig::default());
    caught_up(&env.read, last, &whole_keys()).await;
    stop(tx, tasks).await;
    let s = env.read.snapshot().await.unwrap();
    // completions, learners, trails, courses
    assert_eq!(row(&s, "inst_summary", &["1"])[1..5], ["5", "2", "2", "3"]);
    assert_eq!(row(&s, "inst_trails", &["1", "100"])[4..6], ["4", "2"]);
    assert_eq!(row(&s, "inst_courses", &["1", "1000"])[4..6], ["4", "2"]);
    assert_eq!(
        row(&s, "inst_daily", &["1", "2024-03-01"])[2..4],
        ["3", "2"]
    );
    assert_eq!(row(&s, "lrn_learners", &["1", "10"])[5..7], ["2", "4"]);
}

/// Every membership table (the distinct keys behind the counts), as text.
async fn membership(read: &SqliteReadStore) -> BTreeMap<String, Vec<String>> {
    let mut tables = BTreeMap::new();
    for kind in ProjectionKind::ALL {
        let dumped = read
            .with_conn(kind, |conn, _| {
                let names: Vec<String> = conn
                    .prepare(
                        "SELECT name FROM sqlite_master WHERE type = 'table' AND (name GLOB 'inst_m_*'
                         OR name GLOB 'lrn_m_*' OR name = 'inst_trail_courses')",
                    )
                    .unwrap()
                    .query_map([], |r| r.get(0))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                let mut tables = Vec::new();
                for name in names {
                    let mut stmt = conn.prepare(&format!("SELECT * FROM {name}")).unwrap();
                    let columns = stmt.column_count();
                    let mut rows: Vec<String> = stmt
                        .query_map([], |r| {
                            (0..columns)
                                .map(|i| Ok(format!("{:?}", r.get_ref(i)?)))
                                .collect::<Result<Vec<_>, _>>()
                                .map(|values| values.join(" "))
                        })
                        .unwrap()
                        .collect::<Result<_, _>>()
                        .unwrap();
                    rows.sort();
                    tables.push((name, rows));
                }
                Ok(tables)
            })
            .await
            .unwrap();
        tables.extend(dumped);
    }
    tables
}

/// Completion rows and a rebuild's membership keys go many rows to a
/// statement; with more rows than several statements hold (and a
/// remainder), every row is written, and the rebuilt tables hold exactly
/// the rows the live projector wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_writes_every_membership_key() {
    let env = env();
    let mut last = 0;
    for k in 0..130u64 {
        let (inst, user, trail) = (1 + k % 2, 1 + k, 10 + k % 3);
        let courses = [(100 + k % 5, "C a"), (200 + k % 7, "C b")];
        let finished = format!("2024-05-{:02} 10:00:00", 1 + k % 20);
        last = ingest(
            &*env.events,
            &delivery(inst, user, "Ana", trail, "Trilha", &finished, &courses),
        )
        .await;
    }
    let (tx, tasks) = start_all(&env, RunnerConfig::default());
    caught_up(&env.read, last, &whole_keys()).await;
    stop(tx, tasks).await;
    let live = membership(&env.read).await;
    assert_eq!(live["inst_m_learners"].len(), 130);
    assert_eq!(live["inst_m_course_learners"].len(), 260);
    let live_rows = env.read.snapshot().await.unwrap();
    let completions = |s: &Snapshot| -> Vec<String> {
        let (_, rows) = s
            .tables
            .iter()
            .find(|(t, _)| t == "lrn_completions")
            .unwrap();
        rows.iter().map(|r| r[0].clone()).collect()
    };
    let positions: Vec<String> = (1..=last).map(|p| p.to_string()).collect();
    assert_eq!(completions(&live_rows), positions);

    tracker_projections::replay::replay(Arc::clone(&env.events), &env.read, |_| {})
        .await
        .unwrap();
    assert!(env.read.follow_current().await.unwrap());
    assert_eq!(membership(&env.read).await, live);
    assert!(env.read.snapshot().await.unwrap() == live_rows);
}

/// Bulk loads skip the checkpoint, so only a generation being built takes
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_loads_are_refused_outside_a_build() {
    let env = env();
    let err = env.read.load_completions(Arc::from(Vec::new())).await;
    assert!(matches!(err, Err(ReadStoreError::Storage(_))), "{err:?}");
}

/// The live projections' writes run below the process's CPU priority: in
/// `serve` the receiver's answers come first, the read models follow.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_writes_run_below_the_process_cpu_priority() {
    fn nice() -> i32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Fields after the command name, from the third: nice is the 19th.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.split(' ').nth(16).unwrap().parse().unwrap()
    }
    let env = env();
    let own = nice();
    assert!(own <= 9, "the test itself runs at nice {own}");
    for kind in ProjectionKind::ALL {
        let writer = env.read.with_conn(kind, |_, _| Ok(nice())).await.unwrap();
        assert_eq!(writer, own + 10, "{kind:?}");
    }
}

/// A completion without courses, finished `secs` after the Unix epoch (the
/// raw time and day as the instant's own, UTC).
fn completion_at(position: u64, institution: u64, user: u64, trail: u64, secs: i64) -> Completion {
    let finished_at = chrono::DateTime::from_timestamp(secs, 0).unwrap();
    let raw = finished_at.format("%Y-%m-%d %H:%M:%S").to_string();
    Completion {
        position,
        event_id: uuid::Uuid::from_u128(u128::from(position)),
        institution_id: institution,
        user_id: user,
        user_name: "Zoë".into(),
        user_email: "z@x".into(),
        trail_id: trail,
        trail_name: format!("trail {trail}"),
        courses: vec![],
        day: raw[..10].to_owned(),
        finished_at_raw: raw,
        finished_at,
    }
}

/// Completions whose log order says nothing about their times (late and
/// early deliveries alike), over two institutions, some before 1970.
fn unordered_times_strategy() -> impl Strategy<Value = Vec<Completion>> {
    proptest::collection::vec((1u64..3, 1u64..4, -200_000i64..400_000, 1u64..4), 1..120).prop_map(
        |rows| {
            let mut position = 0;
            rows.into_iter()
                .map(|(inst, trail, secs, gap)| {
                    position += gap;
                    // Around the epoch (negative days) and around 2024.
                    let base = if secs % 2 == 0 { 0 } else { 1_704_067_200 };
                    completion_at(position, inst, 1 + position % 5, trail, base + secs)
                })
                .collect()
        },
    )
}

type Window = (Option<i64>, Option<i64>, Option<u64>);

fn window_strategy() -> impl Strategy<Value = Window> {
    let instant = prop_oneof![-250_000i64..450_000, 1_703_800_000i64..1_704_500_000];
    (
        proptest::option::of(instant.clone()),
        proptest::option::of(instant),
        proptest::option::of(1u64..4),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    /// A page of a time window in log order (which SQLite answers by
    /// scanning log order from the window's first day) holds exactly the
    /// window's completions, in order, walked page by page, whatever the
    /// times, batches, trail filter and page size.
    #[test]
    fn a_time_window_in_log_order_has_every_completion_of_the_window(
        events in unordered_times_strategy(),
        windows in proptest::collection::vec(window_strategy(), 1..6),
        batch in 1usize..40,
        limit in 1usize..9,
    ) {
        use tracker_projections::query::sqlite::SqliteQueries;
        use tracker_projections::query::{
            CompletionFilter, CompletionKey, CompletionSort, Lookup, PageRequest, ReadModelQueries,
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let env = env();
            let ranges: Vec<(usize, usize)> = (0..events.len())
                .step_by(batch)
                .map(|a| (a, (a + batch).min(events.len())))
                .collect();
            apply_ranges(&env.read, &events, &ranges).await;
            let queries = SqliteQueries::open(env.read.dir()).unwrap();
            let at = |s: i64| chrono::DateTime::from_timestamp(s, 0).unwrap();
            for (from, to, trail) in windows {
                let filter = CompletionFilter {
                    from: from.map(at),
                    to: to.map(at),
                    trail_id: trail,
                    user_id: None,
                };
                for institution in [1, 2] {
                    let expected: Vec<u64> = events
                        .iter()
                        .filter(|c| {
                            c.institution_id == institution
                                && trail.is_none_or(|t| c.trail_id == t)
                                && filter.from.is_none_or(|f| c.finished_at >= f)
                                && filter.to.is_none_or(|t| c.finished_at < t)
                        })
                        .map(|c| c.position)
                        .collect();
                    let mut got = Vec::new();
                    let mut after: Option<CompletionKey> = None;
                    loop {
                        let page = PageRequest { sort: CompletionSort::Position, after, limit };
                        let answer = queries.completions(institution, filter.clone(), page).await.unwrap();
                        let Lookup::Found(page) = answer.value else {
                            prop_assert!(expected.is_empty() && !events.iter().any(|c| c.institution_id == institution));
                            break;
                        };
                        prop_assert!(page.items.len() <= limit);
                        got.extend(page.items.iter().map(|r| r.position));
                        match page.next {
                            Some(k) => after = Some(k),
                            None => break,
                        }
                    }
                    prop_assert_eq!(got, expected, "institution {} window {:?}", institution, filter);
                }
            }
            Ok(())
        })?;
    }
}

/// Turns a learners file back into the schema of its second migration: no
/// positions per day yet, the learners' trails also kept as keys, and a
/// learner's completions indexed by time.
const LEARNERS_FILE_V2: &str = "
    DROP TABLE lrn_completion_days;
    CREATE INDEX lrn_completions_by_user_time
        ON lrn_completions (institution_id, user_id, finished_at, position);
    CREATE TABLE lrn_m_trail_learners (institution_id INTEGER NOT NULL, trail_id INTEGER NOT NULL,
        user_id INTEGER NOT NULL, PRIMARY KEY (institution_id, trail_id, user_id)) WITHOUT ROWID;
    INSERT INTO lrn_m_trail_learners SELECT institution_id, trail_id, user_id FROM lrn_learner_trails;
    PRAGMA user_version = 2;";

/// [`LEARNERS_FILE_V2`] applied to the current generation's learners file;
/// its path.
fn learners_file_as_v2(read: &SqliteReadStore) -> std::path::PathBuf {
    let path = read
        .dir()
        .join(format!("{}.learners.sqlite", read.generation()));
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(LEARNERS_FILE_V2)
        .unwrap();
    path
}

/// A learners file from before kept its learners' trails twice, as rows and
/// as keys in `lrn_m_trail_learners`, and indexed a learner's completions
/// by time. Opened for writing, it loses the keys and the index, and the
/// projector goes on counting a trail seen before once, from the rows alone.
#[tokio::test]
async fn an_older_learners_file_drops_its_trail_keys_and_counts_trails_once() {
    let env = env();
    let events = [
        completion_at(1, 1, 7, 1, 1_000),
        completion_at(2, 1, 7, 2, 2_000),
        completion_at(3, 1, 7, 1, 3_000),
        completion_at(4, 1, 7, 3, 4_000),
        completion_at(5, 1, 8, 1, 5_000),
        completion_at(6, 1, 7, 2, 6_000),
    ];
    apply_ranges(&env.read, &events, &[(0, 2)]).await;
    let path = learners_file_as_v2(&env.read);
    drop(env.read);
    let reopened = SqliteReadStore::open(path.parent().unwrap()).unwrap();
    let tables: Vec<String> = rusqlite::Connection::open(&path)
        .unwrap()
        .prepare("SELECT name FROM sqlite_master ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(tables.contains(&"lrn_completion_days".to_owned()));
    for dropped in ["lrn_m_trail_learners", "lrn_completions_by_user_time"] {
        assert!(!tables.contains(&dropped.to_owned()), "{tables:?}");
    }
    assert!(tables.contains(&"lrn_completions_by_user".to_owned()));
    apply_ranges(&reopened, &events, &[(2, 4), (4, 6)]).await;
    let s = reopened.snapshot().await.unwrap();
    // trails, completions
    assert_eq!(row(&s, "lrn_learners", &["1", "7"])[5..7], ["3", "5"]);
    assert_eq!(row(&s, "lrn_learners", &["1", "8"])[5..7], ["1", "1"]);
}

/// A learners file from before the positions-per-day table gets it
/// filled from its completions when opened, with the same rows the
/// projection writes (days of instants before 1970 included, and of the
/// instants past years 0 and 9999 that SQLite's date functions do not read).
#[tokio::test]
async fn an_older_learners_file_gets_the_completion_days_from_its_rows() {
    let env = env();
    let events: Vec<Completion> = [
        -86_401,
        -86_400,
        -1,
        0,
        86_399,
        86_400,
        1_704_067_199,
        5,
        // 10000-01-01T02:00:00Z and -0001-12-31T21:00:00Z: four-digit
        // local wall times shifted past either end by the source zone.
        253_402_308_000,
        -62_167_230_000,
    ]
    .into_iter()
    .enumerate()
    .map(|(i, secs)| completion_at(10 - i as u64, 1 + (i as u64 % 2), 1, 1, secs))
    .rev()
    .collect();
    apply_ranges(&env.read, &events, &[(0, 3), (3, events.len())]).await;
    let path = env
        .read
        .dir()
        .join(format!("{}.learners.sqlite", env.read.generation()));
    let days = |conn: &rusqlite::Connection| -> Vec<(i64, i64, i64, i64)> {
        conn.prepare("SELECT * FROM lrn_completion_days ORDER BY 1, 2")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let conn = rusqlite::Connection::open(&path).unwrap();
    let written = days(&conn);
    assert_eq!(
        written,
        vec![
            (1, -2, 10, 10),
            (1, -1, 8, 8),
            (1, 0, 6, 6),
            (1, 19_722, 4, 4),
            (1, 2_932_897, 2, 2),
            (2, -719_529, 1, 1),
            (2, -1, 9, 9),
            (2, 0, 3, 7),
            (2, 1, 5, 5),
        ],
        "one row per institution and UTC day, with its first and last positions"
    );
    conn.execute_batch(LEARNERS_FILE_V2).unwrap();
    drop(conn);
    drop(env.read);
    let reopened = SqliteReadStore::open(path.parent().unwrap()).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    assert_eq!(days(&conn), written);
    drop(reopened);
}

/// A learners file an older build's writer still holds (no positions per
/// day yet) answers time windows too, by sorting them as before.
#[tokio::test]
async fn a_learners_file_without_the_completion_days_still_answers_windows() {
    use tracker_projections::query::sqlite::SqliteQueries;
    use tracker_projections::query::{
        CompletionFilter, CompletionSort, Lookup, PageRequest, ReadModelQueries,
    };
    let env = env();
    let events: Vec<Completion> = (1..=30u64)
        .map(|p| completion_at(p, 1, p % 4, 1, 1_704_067_200 + (p as i64 % 7) * 86_400))
        .collect();
    apply_ranges(&env.read, &events, &[(0, events.len())]).await;
    learners_file_as_v2(&env.read);
    let queries = SqliteQueries::open(env.read.dir()).unwrap();
    let from = chrono::DateTime::from_timestamp(1_704_067_200 + 2 * 86_400, 0).unwrap();
    let to = chrono::DateTime::from_timestamp(1_704_067_200 + 4 * 86_400, 0).unwrap();
    let page = queries
        .completions(
            1,
            CompletionFilter {
                from: Some(from),
                to: Some(to),
                ..Default::default()
            },
            PageRequest {
                sort: CompletionSort::Position,
                after: None,
                limit: 100,
            },
        )
        .await
        .unwrap();
    let Lookup::Found(page) = page.value else {
        panic!("institution 1 not found")
    };
    let got: Vec<u64> = page.items.iter().map(|r| r.position).collect();
    let expected: Vec<u64> = events
        .iter()
        .filter(|c| c.finished_at >= from && c.finished_at < to)
        .map(|c| c.position)
        .collect();
    assert_eq!(got, expected);
    assert!(!got.is_empty());
}

/// A rebuild stops at a damaged event (data that is not UTF-8) with its
/// position, and leaves the current generation current: it neither sets
/// the event aside as undecodable nor switches to read models missing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_stops_at_a_damaged_event() {
    let env = env();
    ingest(
        &*env.events,
        &delivery(1, 1, "A", 1, "T", "2024-01-01 10:00:00", &[]),
    )
    .await;
    let damaged = ingest(
        &*env.events,
        &delivery(1, 2, "B", 1, "T", "2024-01-01 11:00:00", &[]),
    )
    .await;
    let conn = rusqlite::Connection::open(env._dir.path().join("events.sqlite")).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute("DROP TRIGGER events_no_update", []).unwrap();
    conn.execute(
        "UPDATE events SET data = CAST(x'7bff7d' AS TEXT) WHERE position = ?1",
        [damaged as i64],
    )
    .unwrap();
    let before = env.read.generation();
    let result =
        tracker_projections::replay::replay(Arc::clone(&env.events), &env.read, |_| {}).await;
    match result {
        Err(tracker_projections::replay::ReplayError::Events(
            tracker_store::StoreError::Corrupt { position, reason },
        )) => {
            assert_eq!(position, damaged);
            assert!(reason.contains("not UTF-8"), "{reason}");
        }
        other => panic!("expected the damaged event reported, got {other:?}"),
    }
    assert_eq!(env.read.generation(), before);
    assert_eq!(env.read.dead_letter_count().await.unwrap(), 0);
}
