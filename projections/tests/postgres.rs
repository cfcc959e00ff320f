//! The PostgreSQL read store against the SQLite reference: the same events
//! give the same snapshot, whatever the batching; and the store's own
//! guarantees (redelivery, leases and fencing, blue/green generations, dead
//! letters and checkpoints).
//!
//! Needs PostgreSQL at `TRACKER_TEST_POSTGRES_URL`, else
//! `postgres://postgres@127.0.0.1:5432/postgres`, with the right to create
//! databases. Each test makes its own database and drops it at the end; the
//! tests fail, never skip, when PostgreSQL cannot be reached.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{NaiveDate, TimeDelta, Utc};
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;
use tracker_projections::model::{Completion, CourseRef};
use tracker_projections::postgres::PgReadStore;
use tracker_projections::readstore::{ApplyBatch, DeadLetter, LeaseHolder, Snapshot};
use tracker_projections::sqlite::SqliteReadStore;
use tracker_projections::{CheckpointKey, Partition, ProjectionKind, ReadStore, ReadStoreError};
use uuid::Uuid;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const DB_PREFIX: &str = "tracker_test_";
/// Test databases older than this are leftovers of a killed run.
const STALE_AFTER_SECS: u64 = 3600;

// ---------------------------------------------------------------------------
// A database per test.

fn admin_url() -> String {
    std::env::var("TRACKER_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// `url` with its database replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(end);
            let query = tail.find('?').map(|i| &tail[i..]).unwrap_or("");
            format!("{scheme}://{authority}/{database}{query}")
        }
        // key=value form: a later dbname wins.
        None => format!("{url} dbname={database}"),
    }
}

async fn admin_client() -> tokio_postgres::Client {
    let url = admin_url();
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL must be reachable for these tests (TRACKER_TEST_POSTGRES_URL, default {DEFAULT_URL}): {e}"
            )
        });
    tokio::spawn(connection);
    client
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh database, dropped when the guard goes (also when the test
/// panics); databases left by killed runs are dropped by the next run.
struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    async fn create() -> Self {
        let admin = admin_client().await;
        let existing = admin
            .query(
                "SELECT datname::text FROM pg_database WHERE starts_with(datname::text, $1)",
                &[&DB_PREFIX],
            )
            .await
            .expect("list test databases");
        for row in existing {
            let name: String = row.get(0);
            let created = name
                .strip_prefix(DB_PREFIX)
                .and_then(|rest| rest.split('_').next())
                .and_then(|secs| secs.parse::<u64>().ok());
            if created.is_some_and(|t| t + STALE_AFTER_SECS < unix_now()) {
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
            }
        }
        let name = format!("{DB_PREFIX}{}_{}", unix_now(), Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create the test database");
        Self {
            url: with_database(&admin_url(), &name),
            name,
        }
    }

    async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(connection);
        client
    }

    async fn schemas(&self) -> Vec<String> {
        self.client()
            .await
            .query(
                "SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname::text, 'tracker_rm_') ORDER BY 1",
                &[],
            )
            .await
            .expect("list schemas")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot block on
        // another future: a thread with a runtime of its own does it.
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let admin = admin_client().await;
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await
            })
        })
        .join();
        if !matches!(done, Ok(Ok(()))) {
            eprintln!(
                "could not drop test database {} (the next run drops it)",
                self.name
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Events.

/// A small deterministic generator (no dependency, same sequence everywhere).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// The last is above 2^53 (not exact in a double).
const INSTITUTIONS: [u64; 3] = [7, 42, 9_007_199_254_740_993];
/// Institution 7's last learner has an id above i64::MAX: stored bit for bit.
const HUGE_USER: u64 = u64::MAX - 5;
const LEARNERS: [&str; 8] = [
    "José Álvarez",
    "Zoë Müller",
    "Łukasz Żółć",
    "François Dupré",
    "Ana Luíza \"Nina\" Sá",
    "Søren Kierkegård",
    "Đorđe Đoković",
    "Ümit Çelik",
];
const TRAILS: [&str; 5] = [
    "Trilha Básica",
    "Programação Funcional",
    "Ética & Cidadania",
    "Redes \\ Sistemas",
    "Ciência de Dados",
];
const COURSES: [&str; 15] = [
    "Introdução",
    "Cálculo I",
    "Álgebra Linear",
    "Lógica",
    "Estruturas de Dados",
    "Programação \"Funcional\"",
    "Redes",
    "Ética",
    "Estatística",
    "Aprendizado de Máquina",
    "Bancos de Dados",
    "Compiladores",
    "Sistemas Operacionais",
    "Segurança",
    "Projeto Final",
];

/// Renamed later in the log: institution 42's trail 101, learner 1001 and
/// course 503.
const RENAMED_INSTITUTION: u64 = 42;
const RENAMED_TRAIL: u64 = 101;
const RENAMED_LEARNER: u64 = 1001;
const RENAMED_COURSE: u64 = 503;
const NEW_TRAIL_NAME: &str = "Programação Funcional — 2ª edição";
const NEW_LEARNER_NAME: &str = "Zoë Müller-Schmidt";
const NEW_COURSE_TITLE: &str = "Lógica (revisão 2025)";

/// 1 to 10 courses per trail, overlapping between trails; trail 102 lists a
/// course twice.
fn trail_courses(institution: u64, trail_ix: u64, renamed: bool) -> Vec<CourseRef> {
    let count = 1 + (institution + trail_ix * 3) % 10;
    let mut ids: Vec<u64> = (0..count).map(|j| 500 + (trail_ix * 4 + j) % 15).collect();
    if trail_ix == 2 {
        ids.push(ids[0]);
    }
    ids.into_iter()
        .map(|id| CourseRef {
            id,
            title: if renamed && institution == RENAMED_INSTITUTION && id == RENAMED_COURSE {
                NEW_COURSE_TITLE.to_owned()
            } else {
                COURSES[(id - 500) as usize].to_owned()
            },
        })
        .collect()
}

/// `n` completions with gaps in positions (other events in the log),
/// re-completions, times out of order, and renames in the last third.
fn generate(n: usize, seed: u64) -> Vec<Completion> {
    let mut rng = Lcg(seed);
    let base = NaiveDate::from_ymd_opt(2024, 3, 1)
        .and_then(|d| d.and_hms_opt(8, 0, 0))
        .expect("base time");
    let mut position = 0;
    (0..n)
        .map(|k| {
            position += 1 + rng.below(3);
            let institution = INSTITUTIONS[rng.below(3) as usize];
            let user_ix = rng.below(8);
            let user_id = if institution == 7 && user_ix == 7 {
                HUGE_USER
            } else {
                1000 + user_ix
            };
            let trail_ix = rng.below(5);
            let trail_id = 100 + trail_ix;
            let renamed = k >= n * 2 / 3;
            let local = base + TimeDelta::minutes(k as i64 * 53 - rng.below(900) as i64);
            let raw = local.format("%Y-%m-%d %H:%M:%S").to_string();
            // Some sub-second times: both stores keep whole seconds.
            let nanos = if k % 5 == 0 { 999_999_999 } else { 0 };
            let finished_at = local.and_utc() + TimeDelta::hours(3) + TimeDelta::nanoseconds(nanos);
            let rename_learner =
                renamed && institution == RENAMED_INSTITUTION && user_id == RENAMED_LEARNER;
            let rename_trail =
                renamed && institution == RENAMED_INSTITUTION && trail_id == RENAMED_TRAIL;
            Completion {
                position,
                event_id: Uuid::from_u128(0xE000_0000 + u128::from(position)),
                institution_id: institution,
                user_id,
                user_name: if rename_learner {
                    NEW_LEARNER_NAME.to_owned()
                } else {
                    LEARNERS[user_ix as usize].to_owned()
                },
                user_email: if rename_learner {
                    "zoe.schmidt@example.org".to_owned()
                } else {
                    format!("learner{user_ix}@example.org")
                },
                trail_id,
                trail_name: if rename_trail {
                    NEW_TRAIL_NAME.to_owned()
                } else {
                    TRAILS[trail_ix as usize].to_owned()
                },
                courses: trail_courses(institution, trail_ix, renamed),
                day: raw[..10].to_owned(),
                finished_at_raw: raw,
                finished_at,
            }
        })
        .collect()
}

fn batch(kind: ProjectionKind, completions: &[Completion], through: u64) -> ApplyBatch {
    ApplyBatch {
        after: 0,
        key: CheckpointKey::whole(kind),
        completions: completions.to_vec(),
        dead_letters: Vec::new(),
        through,
        lease: None,
    }
}

fn through(events: &[Completion]) -> u64 {
    events.last().map(|c| c.position).unwrap_or(0)
}

/// Applies `events` for both projections, in consecutive batches of the
/// given sizes (cycled).
async fn apply_in_batches(store: &dyn ReadStore, events: &[Completion], sizes: &[usize]) {
    let mut rest = events;
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at((*size).min(rest.len()));
        for kind in ProjectionKind::ALL {
            store
                .apply(batch(kind, chunk, through(chunk)))
                .await
                .expect("apply");
        }
        rest = tail;
    }
}

async fn sqlite_reference(events: &[Completion]) -> (tempfile::TempDir, SqliteReadStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteReadStore::open(dir.path()).expect("open sqlite");
    apply_in_batches(&store, events, &[events.len().max(1)]).await;
    (dir, store)
}

/// Equal snapshots, or a message naming the first row that differs.
fn assert_same(expected: &Snapshot, actual: &Snapshot, what: &str) {
    assert_eq!(
        expected.tables.len(),
        actual.tables.len(),
        "{what}: table count"
    );
    for ((table, want), (got_table, got)) in expected.tables.iter().zip(&actual.tables) {
        assert_eq!(table, got_table, "{what}: table order");
        for (i, (w, g)) in want.iter().zip(got).enumerate() {
            assert_eq!(w, g, "{what}: {table} row {i}");
        }
        assert_eq!(want.len(), got.len(), "{what}: {table} row count");
    }
}

fn rows<'a>(snapshot: &'a Snapshot, table: &str) -> &'a [Vec<String>] {
    snapshot
        .tables
        .iter()
        .find(|(name, _)| name == table)
        .map(|(_, rows)| rows.as_slice())
        .unwrap_or_else(|| panic!("no table {table} in the snapshot"))
}

fn row<'a>(snapshot: &'a Snapshot, table: &str, key: &[&str]) -> &'a [String] {
    rows(snapshot, table)
        .iter()
        .find(|r| r.iter().zip(key).all(|(a, b)| a == b))
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("no row {key:?} in {table}"))
}

fn is_empty(snapshot: &Snapshot) -> bool {
    snapshot.tables.iter().all(|(_, rows)| rows.is_empty())
}

// ---------------------------------------------------------------------------
// 1. Same events, same read models.

#[tokio::test]
async fn same_events_give_the_same_snapshot_as_sqlite_whatever_the_batching() {
    let db = TestDb::create().await;
    let events = generate(400, 1);
    let (_dir, sqlite) = sqlite_reference(&events).await;
    let expected = sqlite.snapshot().await.expect("sqlite snapshot");

    // Small, odd and large batches.
    let pg = PgReadStore::connect(&db.url).await.expect("connect");
    apply_in_batches(&pg, &events, &[1, 7, 64, 3, 150]).await;
    assert_same(
        &expected,
        &pg.snapshot().await.expect("snapshot"),
        "pg, mixed batches",
    );

    // One batch.
    let one = pg.create_generation().await.expect("generation");
    apply_in_batches(&*one, &events, &[events.len()]).await;
    assert_same(
        &expected,
        &one.snapshot().await.expect("snapshot"),
        "pg, one batch",
    );

    // Two partitions, each with its own checkpoint, interleaved.
    let split = pg.create_generation().await.expect("generation");
    for chunk in events.chunks(45) {
        for index in 0..2 {
            let partition = Partition { index, count: 2 };
            let mine: Vec<Completion> = chunk
                .iter()
                .filter(|c| partition.owns(c.institution_id))
                .cloned()
                .collect();
            for kind in ProjectionKind::ALL {
                split
                    .apply(ApplyBatch {
                        after: 0,
                        key: CheckpointKey {
                            projection: kind,
                            partition,
                        },
                        ..batch(kind, &mine, through(chunk))
                    })
                    .await
                    .expect("apply partition");
            }
        }
    }
    assert_same(
        &expected,
        &split.snapshot().await.expect("snapshot"),
        "pg, partitions",
    );

    // And the numbers themselves, counted here from the events, so that both
    // stores being wrong the same way fails too.
    let of_42: Vec<&Completion> = events
        .iter()
        .filter(|c| c.institution_id == RENAMED_INSTITUTION)
        .collect();
    let learners: HashSet<u64> = of_42.iter().map(|c| c.user_id).collect();
    let trails: HashSet<u64> = of_42.iter().map(|c| c.trail_id).collect();
    let courses: HashSet<u64> = of_42
        .iter()
        .flat_map(|c| c.courses.iter().map(|course| course.id))
        .collect();
    let first = of_42
        .iter()
        .map(|c| c.finished_at)
        .min()
        .expect("events of 42");
    let last = of_42
        .iter()
        .map(|c| c.finished_at)
        .max()
        .expect("events of 42");
    let summary = row(&expected, "inst_summary", &["42"]);
    assert_eq!(
        summary[1..5],
        [
            of_42.len().to_string(),
            learners.len().to_string(),
            trails.len().to_string(),
            courses.len().to_string()
        ],
        "institution 42: completions, learners, trails, courses"
    );
    assert_eq!(
        summary[5..7],
        [
            first.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            last.format("%Y-%m-%dT%H:%M:%SZ").to_string()
        ]
    );
    assert_eq!(
        summary[7],
        of_42.last().expect("events").position.to_string()
    );
    // A trail's distinct learners and completions.
    let on_trail: Vec<&&Completion> = of_42
        .iter()
        .filter(|c| c.trail_id == RENAMED_TRAIL)
        .collect();
    let trail = row(&expected, "inst_trails", &["42", "101"]);
    assert_eq!(trail[2], NEW_TRAIL_NAME, "the latest trail name wins");
    assert_eq!(trail[4], on_trail.len().to_string());
    let trail_learners: HashSet<u64> = on_trail.iter().map(|c| c.user_id).collect();
    assert_eq!(trail[5], trail_learners.len().to_string());
    let learner = row(&expected, "lrn_learners", &["42", "1001"]);
    assert_eq!(learner[2..4], [NEW_LEARNER_NAME, "zoe.schmidt@example.org"]);
    let course = row(&expected, "inst_courses", &["42", "503"]);
    assert_eq!(course[2], NEW_COURSE_TITLE);
    // A course listed twice in a trail counts once per completion.
    let course_completions = of_42
        .iter()
        .filter(|c| c.courses.iter().any(|course| course.id == 500 + 8))
        .count();
    assert_eq!(
        row(&expected, "inst_courses", &["42", "508"])[4],
        course_completions.to_string()
    );
    // Daily activity adds up to the completions.
    let daily: u64 = rows(&expected, "inst_daily")
        .iter()
        .filter(|r| r[0] == "42")
        .map(|r| r[2].parse::<u64>().expect("number"))
        .sum();
    assert_eq!(daily, of_42.len() as u64);
    // Ids beyond i64::MAX and above 2^53 stay exact (bit for bit).
    let huge = (HUGE_USER as i64).to_string();
    assert!(
        rows(&expected, "lrn_learners")
            .iter()
            .any(|r| r[0] == "7" && r[1] == huge)
    );
    assert!(
        rows(&expected, "inst_summary")
            .iter()
            .any(|r| r[0] == "9007199254740993")
    );
    // One row per completion, courses as the same JSON text.
    assert_eq!(rows(&expected, "lrn_completions").len(), events.len());
    let first_position = events[0].position.to_string();
    let json = &row(&expected, "lrn_completions", &[first_position.as_str()])[9];
    let parsed: serde_json::Value = serde_json::from_str(json).expect("courses json");
    assert_eq!(
        parsed.as_array().map(Vec::len),
        Some(events[0].courses.len())
    );
}

// ---------------------------------------------------------------------------
// 2. At-least-once delivery, exactly-once effect.

#[tokio::test]
async fn redelivered_and_overlapping_batches_change_nothing() {
    let db = TestDb::create().await;
    let events = generate(300, 2);
    let (_dir, sqlite) = sqlite_reference(&events).await;
    let expected = sqlite.snapshot().await.expect("sqlite snapshot");

    let pg = PgReadStore::connect(&db.url).await.expect("connect");
    let head = &events[..120];
    apply_in_batches(&pg, head, &[head.len()]).await;
    let once = pg.snapshot().await.expect("snapshot");
    let checkpoints = pg.checkpoints().await.expect("checkpoints");
    assert_eq!(
        checkpoints,
        vec![
            ("institutions".to_owned(), through(head)),
            ("learners".to_owned(), through(head))
        ]
    );
    // The same batch again, and an older one.
    apply_in_batches(&pg, head, &[head.len()]).await;
    apply_in_batches(&pg, &events[..50], &[50]).await;
    assert_same(
        &once,
        &pg.snapshot().await.expect("snapshot"),
        "redelivered",
    );
    assert_eq!(pg.checkpoints().await.expect("checkpoints"), checkpoints);

    // A restarted reader re-reads from before its checkpoint: windows that
    // overlap what was applied.
    for window in [&events[100..200], &events[150..260], &events[180..]] {
        apply_in_batches(&pg, window, &[window.len()]).await;
    }
    assert_same(
        &expected,
        &pg.snapshot().await.expect("snapshot"),
        "overlapping",
    );

    // Two writers of one key at once (no lease): one applies, the other
    // then finds the checkpoint moved and skips.
    let fresh = pg.create_generation().await.expect("generation");
    let all = [events.len()];
    tokio::join!(
        apply_in_batches(&*fresh, &events, &all),
        apply_in_batches(&*fresh, &events, &all),
    );
    assert_same(
        &expected,
        &fresh.snapshot().await.expect("snapshot"),
        "concurrent",
    );
}

/// A batch that continues the log after a position its stored checkpoint
/// has not reached (a runner that read on from another generation's
/// checkpoint) is a gap on both backends and writes nothing, so the runner
/// starts over from the stored checkpoint instead of losing the events in
/// between. Continuing from the checkpoint, or from before it, applies.
#[tokio::test]
async fn a_batch_that_skips_past_the_checkpoint_is_a_gap_on_both_backends() {
    let db = TestDb::create().await;
    let events = generate(100, 5);
    let pg = PgReadStore::connect(&db.url).await.expect("connect");
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = SqliteReadStore::open(dir.path()).expect("open sqlite");
    let (_ref_dir, reference) = sqlite_reference(&events).await;
    let expected = reference.snapshot().await.expect("snapshot");
    let stores: [(&str, &dyn ReadStore); 2] = [("postgres", &pg), ("sqlite", &sqlite)];
    for (name, store) in stores {
        let (head, skipped, rest) = (&events[..40], &events[40..60], &events[60..]);
        apply_in_batches(store, head, &[head.len()]).await;
        let before = store.snapshot().await.expect("snapshot");
        for kind in ProjectionKind::ALL {
            let mut gap = batch(kind, rest, through(rest));
            gap.after = through(skipped);
            match store.apply(gap).await {
                Err(ReadStoreError::Gap {
                    checkpoint, after, ..
                }) => assert_eq!(
                    (checkpoint, after),
                    (through(head), through(skipped)),
                    "{name}"
                ),
                other => panic!("{name} {kind:?}: expected a gap, got {other:?}"),
            }
        }
        assert_same(&before, &store.snapshot().await.expect("snapshot"), name);
        for kind in ProjectionKind::ALL {
            let mut from_before = batch(kind, &events[30..], through(&events));
            from_before.after = events[29].position;
            store.apply(from_before).await.expect("apply");
        }
        assert_same(&expected, &store.snapshot().await.expect("snapshot"), name);
    }
}

#[tokio::test]
async fn a_hand_counted_history() {
    let db = TestDb::create().await;
    let pg = PgReadStore::connect(&db.url).await.expect("connect");
    let t = |raw: &str| {
        chrono::NaiveDateTime::parse_from_str(raw, "%Y-%m-%d %H:%M:%S")
            .expect("time")
            .and_utc()
    };
    let c = |position: u64, user: u64, trail: u64, at: &str, courses: &[u64]| Completion {
        position,
        event_id: Uuid::from_u128(u128::from(position)),
        institution_id: 1,
        user_id: user,
        user_name: format!("Usuário {user}"),
        user_email: format!("u{user}@x"),
        trail_id: trail,
        trail_name: format!("Trilha {trail}"),
        courses: courses
            .iter()
            .map(|&id| CourseRef {
                id,
                title: format!("Curso {id}"),
            })
            .collect(),
        finished_at_raw: at.to_owned(),
        finished_at: t(at),
        day: at[..10].to_owned(),
    };
    // Learner 1 does trail 5 twice (courses 7, 8), learner 2 trail 5 once
    // and trail 6 (courses 8, 9) once.
    let events = [
        c(3, 1, 5, "2024-01-02 10:00:00", &[7, 8]),
        c(4, 2, 5, "2024-01-01 09:00:00", &[7, 8]),
        c(8, 1, 5, "2024-01-03 12:30:00", &[7, 8]),
        c(9, 2, 6, "2024-01-03 08:00:00", &[8, 9]),
    ];
    apply_in_batches(&pg, &events[..3], &[2]).await;
    apply_in_batches(&pg, &events, &[4]).await;
    let s = pg.snapshot().await.expect("snapshot");
    assert_eq!(
        rows(&s, "inst_summary"),
        [[
            "1",
            "4",
            "2",
            "2",
            "3",
            "2024-01-01T09:00:00Z",
            "2024-01-03T12:30:00Z",
            "9"
        ]]
    );
    assert_eq!(
        row(&s, "inst_trails", &["1", "5"]),
        [
            "1",
            "5",
            "Trilha 5",
            "8",
            "3",
            "2",
            "2024-01-01T09:00:00Z",
            "2024-01-03T12:30:00Z"
        ]
    );
    assert_eq!(
        row(&s, "inst_courses", &["1", "8"]),
        ["1", "8", "Curso 8", "9", "4", "2"]
    );
    assert_eq!(
        rows(&s, "inst_daily"),
        [
            ["1", "2024-01-01", "1", "1"],
            ["1", "2024-01-02", "1", "1"],
            ["1", "2024-01-03", "2", "2"]
        ]
    );
    assert_eq!(
        rows(&s, "inst_trail_courses"),
        [
            ["1", "5", "7"],
            ["1", "5", "8"],
            ["1", "6", "8"],
            ["1", "6", "9"]
        ]
    );
    assert_eq!(
        row(&s, "lrn_learners", &["1", "2"]),
        [
            "1",
            "2",
            "Usuário 2",
            "u2@x",
            "9",
            "2",
            "2",
            "2024-01-01T09:00:00Z",
            "2024-01-03T08:00:00Z"
        ]
    );
    assert_eq!(
        row(&s, "lrn_learner_trails", &["1", "1", "5"]),
        [
            "1",
            "1",
            "5",
            "2",
            "2024-01-02T10:00:00Z",
            "2024-01-03T12:30:00Z"
        ]
    );
    assert_eq!(
        row(&s, "lrn_completions", &["9"]),
        [
            "9",
            "00000000-0000-0000-0000-000000000009",
            "1",
            "2",
            "6",
            "Trilha 6",
            "2024-01-03 08:00:00",
            "2024-01-03T08:00:00Z",
            "2024-01-03",
            r#"[{"id":8,"title":"Curso 8"},{"id":9,"title":"Curso 9"}]"#
        ]
    );
}

// ---------------------------------------------------------------------------
// 3. Leases and fencing.

#[tokio::test]
async fn leases_let_one_writer_in_and_fence_the_others() {
    let db = TestDb::create().await;
    let pg = PgReadStore::connect(&db.url).await.expect("connect");
    let events = generate(20, 3);
    let (a, b) = (LeaseHolder("a".into()), LeaseHolder("b".into()));
    let long = Duration::from_secs(30);
    let key = CheckpointKey::whole(ProjectionKind::Institutions);
    let name = key.to_string();

    assert!(pg.acquire_lease(&name, &a, long).await.expect("lease"));
    assert!(!pg.acquire_lease(&name, &b, long).await.expect("lease"));
    assert!(pg.acquire_lease(&name, &a, long).await.expect("renew"));

    // B does not hold it: nothing is written.
    let with = |holder: &LeaseHolder, kind: ProjectionKind, ttl: Duration| ApplyBatch {
        after: 0,
        lease: Some((holder.clone(), ttl)),
        ..batch(kind, &events, through(&events))
    };
    let denied = pg.apply(with(&b, ProjectionKind::Institutions, long)).await;
    assert!(
        matches!(denied, Err(ReadStoreError::LeaseLost(ref k)) if k == "institutions"),
        "{denied:?}"
    );
    assert!(is_empty(&pg.snapshot().await.expect("snapshot")));
    assert_eq!(pg.checkpoint(key).await.expect("checkpoint"), 0);
    // Nor without any lease row at all.
    let unleased = pg.apply(with(&a, ProjectionKind::Learners, long)).await;
    assert!(
        matches!(unleased, Err(ReadStoreError::LeaseLost(_))),
        "{unleased:?}"
    );

    pg.apply(with(&a, ProjectionKind::Institutions, long))
        .await
        .expect("the holder writes");
    assert_eq!(
        pg.checkpoint(key).await.expect("checkpoint"),
        through(&events)
    );

    // Expiry: A's short lease runs out, A is fenced, B takes over.
    let learners = ProjectionKind::Learners.name();
    let short = Duration::from_millis(300);
    assert!(pg.acquire_lease(learners, &a, short).await.expect("lease"));
    assert!(!pg.acquire_lease(learners, &b, long).await.expect("lease"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let expired = pg.apply(with(&a, ProjectionKind::Learners, short)).await;
    assert!(
        matches!(expired, Err(ReadStoreError::LeaseLost(_))),
        "{expired:?}"
    );
    assert!(rows(&pg.snapshot().await.expect("snapshot"), "lrn_learners").is_empty());
    assert!(
        pg.acquire_lease(learners, &b, long)
            .await
            .expect("take over")
    );
    assert!(!pg.acquire_lease(learners, &a, long).await.expect("lease"));
    pg.apply(with(&b, ProjectionKind::Learners, long))
        .await
        .expect("the new holder writes");

    // Release hands it over at once.
    pg.release_lease(learners, &b).await.expect("release");
    assert!(pg.acquire_lease(learners, &a, long).await.expect("lease"));
}

// ---------------------------------------------------------------------------
// 4. Generations (blue/green).

#[tokio::test]
async fn generations_switch_atomically_and_old_ones_are_dropped() {
    let db = TestDb::create().await;
    let events = generate(240, 4);
    let (_dir, sqlite) = sqlite_reference(&events).await;
    let expected = sqlite.snapshot().await.expect("sqlite snapshot");

    let live = PgReadStore::connect(&db.url).await.expect("connect");
    assert_eq!(live.generation(), "g1");
    assert_eq!(live.schema(), "tracker_rm_g1");
    apply_in_batches(&live, &events[..100], &[40]).await;
    let live_before = live.snapshot().await.expect("snapshot");

    // A rebuild beside it; the live one is untouched.
    let rebuild = live.create_generation().await.expect("create");
    assert_eq!(rebuild.generation(), "g2");
    apply_in_batches(&*rebuild, &events[..180], &[90]).await;
    assert_eq!(live.generation(), "g1");
    assert_same(
        &live_before,
        &live.snapshot().await.expect("snapshot"),
        "live during rebuild",
    );

    live.switch_to("g2").await.expect("switch");
    let moved = live
        .apply(batch(
            ProjectionKind::Institutions,
            &events[100..],
            through(&events),
        ))
        .await;
    assert!(
        matches!(moved, Err(ReadStoreError::GenerationChanged { ref from, ref to }) if from == "g1" && to == "g2"),
        "{moved:?}"
    );
    // The rebuild's handle stays where it is and keeps writing.
    assert!(!rebuild.follow_current().await.expect("follow"));
    assert!(live.follow_current().await.expect("follow"));
    assert_eq!(live.generation(), "g2");
    assert!(!live.follow_current().await.expect("follow again"));
    // The live projector carries on from g2's checkpoint.
    for kind in ProjectionKind::ALL {
        assert_eq!(
            live.checkpoint(CheckpointKey::whole(kind))
                .await
                .expect("checkpoint"),
            through(&events[..180])
        );
    }
    apply_in_batches(&live, &events[100..], &[70]).await;
    assert_same(
        &expected,
        &live.snapshot().await.expect("snapshot"),
        "after switch",
    );
    assert_same(
        &expected,
        &rebuild.snapshot().await.expect("snapshot"),
        "same schema",
    );
    let reconnected = PgReadStore::connect(&db.url).await.expect("reconnect");
    assert_eq!(reconnected.generation(), "g2");
    assert_eq!(db.schemas().await, ["tracker_rm_g1", "tracker_rm_g2"]);

    // Next rebuild: the replaced generation stays, the one before goes.
    let g3 = live.create_generation().await.expect("create");
    apply_in_batches(&*g3, &events, &[240]).await;
    live.switch_to("g3").await.expect("switch");
    assert_eq!(db.schemas().await, ["tracker_rm_g2", "tracker_rm_g3"]);
    assert!(live.follow_current().await.expect("follow"));
    assert_same(&expected, &live.snapshot().await.expect("snapshot"), "g3");

    let g4 = live.create_generation().await.expect("create");
    assert_eq!(g4.generation(), "g4");
    live.switch_to("g4").await.expect("switch");
    assert_eq!(db.schemas().await, ["tracker_rm_g3", "tracker_rm_g4"]);

    // A reader keeps g3 busy when it should go: the switch does not wait for
    // it, and a later start-up drops it.
    let g5 = live.create_generation().await.expect("create");
    let mut reader = db.client().await;
    let reading = reader.transaction().await.expect("begin");
    reading
        .query("SELECT * FROM tracker_rm_g3.inst_summary", &[])
        .await
        .expect("read g3");
    let started = Instant::now();
    live.switch_to(&g5.generation()).await.expect("switch");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the switch waited for a reader"
    );
    assert_eq!(
        db.schemas().await,
        ["tracker_rm_g3", "tracker_rm_g4", "tracker_rm_g5"]
    );
    reading.rollback().await.expect("end reader");
    let _ = PgReadStore::connect(&db.url).await.expect("reconnect");
    assert_eq!(db.schemas().await, ["tracker_rm_g4", "tracker_rm_g5"]);

    // Unknown generations are refused and change nothing.
    assert!(live.switch_to("g99").await.is_err());
    assert!(live.follow_current().await.expect("follow"));
    assert_eq!(live.generation(), "g5");
}

// ---------------------------------------------------------------------------
// 5. Dead letters and checkpoints.

#[tokio::test]
async fn dead_letters_are_kept_once_and_checkpoints_listed() {
    let db = TestDb::create().await;
    let pg = PgReadStore::connect(&db.url).await.expect("connect");
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = SqliteReadStore::open(dir.path()).expect("sqlite");
    let events = generate(30, 5);
    let dead = |projection: ProjectionKind, position: u64| DeadLetter {
        projection: projection.name().to_owned(),
        position,
        event_id: Uuid::from_u128(0xDEAD_0000 + u128::from(position)),
        event_type: "TrailCompleted".to_owned(),
        error: format!("bad payload at {position}: missing \"trail\""),
        recorded_at: Utc::now(),
    };
    let end = through(&events);
    let batches = [
        ApplyBatch {
            after: 0,
            dead_letters: vec![
                dead(ProjectionKind::Institutions, end + 2),
                dead(ProjectionKind::Institutions, end + 1),
            ],
            ..batch(ProjectionKind::Institutions, &events, end + 3)
        },
        ApplyBatch {
            after: 0,
            dead_letters: vec![dead(ProjectionKind::Learners, end + 1)],
            ..batch(ProjectionKind::Learners, &events, end + 3)
        },
    ];
    for store in [&pg as &dyn ReadStore, &sqlite] {
        for b in &batches {
            store.apply(b.clone()).await.expect("apply");
            // Redelivered: no second copy.
            store.apply(b.clone()).await.expect("apply again");
        }
    }
    assert_eq!(pg.dead_letter_count().await.expect("count"), 3);
    let letters = pg.dead_letters(10).await.expect("dead letters");
    assert_eq!(
        letters
            .iter()
            .map(|d| (d.position, d.projection.as_str()))
            .collect::<Vec<_>>(),
        [
            (end + 1, "institutions"),
            (end + 1, "learners"),
            (end + 2, "institutions")
        ]
    );
    assert_eq!(
        letters[0].error,
        format!("bad payload at {}: missing \"trail\"", end + 1)
    );
    assert_eq!(
        letters[0].event_id,
        Uuid::from_u128(0xDEAD_0000 + u128::from(end + 1))
    );
    assert_eq!(
        letters,
        sqlite.dead_letters(10).await.expect("sqlite dead letters")
    );
    assert_eq!(pg.dead_letters(1).await.expect("limit").len(), 1);

    // A partition starts where the whole projection stands, then has its own.
    let part = CheckpointKey {
        projection: ProjectionKind::Institutions,
        partition: Partition { index: 1, count: 2 },
    };
    for store in [&pg as &dyn ReadStore, &sqlite] {
        assert_eq!(store.checkpoint(part).await.expect("checkpoint"), end + 3);
        store
            .apply(ApplyBatch {
                after: 0,
                key: part,
                dead_letters: vec![dead(ProjectionKind::Institutions, end + 3)],
                ..batch(ProjectionKind::Institutions, &[], end + 10)
            })
            .await
            .expect("apply");
        assert_eq!(store.checkpoint(part).await.expect("checkpoint"), end + 10);
    }
    assert_eq!(
        pg.dead_letter_count().await.expect("count"),
        3,
        "at the checkpoint: skipped"
    );
    let listed = pg.checkpoints().await.expect("checkpoints");
    assert_eq!(
        listed,
        [
            ("institutions".to_owned(), end + 3),
            ("institutions@1/2".to_owned(), end + 10),
            ("learners".to_owned(), end + 3)
        ]
    );
    assert_eq!(
        listed,
        sqlite.checkpoints().await.expect("sqlite checkpoints")
    );
    assert_same(
        &sqlite.snapshot().await.expect("sqlite"),
        &pg.snapshot().await.expect("pg"),
        "with dead letters",
    );
}

// ---------------------------------------------------------------------------
// Start-up.

#[tokio::test]
async fn connecting_twice_migrates_once_and_keeps_the_rows() {
    let db = TestDb::create().await;
    let events = generate(10, 6);
    let first = PgReadStore::connect(&db.url).await.expect("connect");
    apply_in_batches(&first, &events, &[10]).await;
    let second = PgReadStore::connect(&db.url).await.expect("connect again");
    assert_same(
        &first.snapshot().await.expect("snapshot"),
        &second.snapshot().await.expect("snapshot"),
        "reconnected",
    );
    let versions: BTreeMap<String, i32> = db
        .client()
        .await
        .query(
            "SELECT scope, MAX(version) FROM tracker_control.schema_migrations GROUP BY scope",
            &[],
        )
        .await
        .expect("versions")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        versions,
        BTreeMap::from([("control".to_owned(), 1), ("g1".to_owned(), 4)])
    );
}

/// A generation from before kept its learners' trails twice, as rows and as
/// keys in `lrn_m_trail_learners`, and indexed a learner's completions by
/// time. Reconnecting drops both, and the projector goes on counting a
/// trail seen before once, from the rows alone: the read models equal
/// SQLite's.
#[tokio::test]
async fn an_older_generation_drops_its_trail_keys_and_counts_trails_once() {
    let db = TestDb::create().await;
    let events = generate(300, 9);
    let (_dir, sqlite) = sqlite_reference(&events).await;
    let (before, after) = events.split_at(150);
    let first = PgReadStore::connect(&db.url).await.expect("connect");
    apply_in_batches(&first, before, &[40]).await;
    // Back to version 3: the key table, filled as it was kept, and the index.
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE tracker_rm_g1.lrn_m_trail_learners (institution_id BIGINT NOT NULL,
               trail_id BIGINT NOT NULL, user_id BIGINT NOT NULL,
               PRIMARY KEY (institution_id, trail_id, user_id));
             INSERT INTO tracker_rm_g1.lrn_m_trail_learners
               SELECT institution_id, trail_id, user_id FROM tracker_rm_g1.lrn_learner_trails;
             CREATE INDEX lrn_completions_by_user_time
               ON tracker_rm_g1.lrn_completions (institution_id, user_id, finished_at, position);
             DELETE FROM tracker_control.schema_migrations WHERE scope = 'g1' AND version = 4;",
        )
        .await
        .expect("make the generation version 3");
    drop(first);
    let reopened = PgReadStore::connect(&db.url).await.expect("reconnect");
    let left: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'tracker_rm_g1'
               AND c.relname IN ('lrn_m_trail_learners', 'lrn_completions_by_user_time')",
            &[],
        )
        .await
        .expect("catalog")
        .get(0);
    assert_eq!(left, 0, "the key table and the index are dropped");
    apply_in_batches(&reopened, after, &[1, 33, 70]).await;
    assert_same(
        &sqlite.snapshot().await.expect("sqlite snapshot"),
        &reopened.snapshot().await.expect("snapshot"),
        "migrated generation",
    );
}

#[tokio::test]
async fn an_unreachable_server_is_an_error_not_a_hang() {
    let started = Instant::now();
    let refused = PgReadStore::connect("postgres://postgres@127.0.0.1:1/postgres").await;
    assert!(
        matches!(refused, Err(ReadStoreError::Storage(_))),
        "{refused:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    let nonsense = PgReadStore::connect("not a url at all ://").await;
    assert!(nonsense.is_err());
}

// ---------------------------------------------------------------------------
// 6. Rebuilds (`replay`): folded in memory, bulk loaded.

/// The delivery a source would have sent for `c`.
fn delivery_of(c: &Completion) -> String {
    serde_json::json!({
        "event": {"slug": "activities.trail.completed", "send_at": c.finished_at_raw},
        "data": {
            "institution": {"id": c.institution_id},
            "user": {"id": c.user_id, "name": c.user_name, "email": c.user_email},
            "trail": {"id": c.trail_id, "name": c.trail_name, "finished_at": c.finished_at_raw,
                "courses": c.courses.iter().map(|course| serde_json::json!({"id": course.id, "title": course.title})).collect::<Vec<_>>()}
        }
    })
    .to_string()
}

fn metadata() -> tracker_store::EventMetadata {
    tracker_store::EventMetadata {
        received_at: Utc::now(),
        source_id: "test".into(),
        request_id: "r".into(),
        content_hash: "sha256:00".into(),
    }
}

async fn ingest(events: &dyn tracker_store::EventStore, body: &str) -> u64 {
    let zone = tracker_domain::SourceTimeZone::default();
    let parsed = tracker_domain::parse_delivery(body.as_bytes(), &zone).expect("delivery");
    let event = tracker_store::NewEvent {
        id: parsed.event_id(),
        event_type: parsed.event_type().to_owned(),
        schema_version: parsed.schema_version(),
        data: parsed.event_data(&zone).expect("event data"),
        metadata: metadata(),
    };
    events
        .append(
            &parsed.stream(),
            tracker_store::ExpectedRevision::Any,
            vec![event],
        )
        .await
        .expect("append")
        .events[0]
        .position
}

/// A log of `generate`d completions with undecodable completions and events
/// of another type among them, and one of another type at the end.
async fn event_log(n: usize, seed: u64) -> (tempfile::TempDir, Arc<dyn tracker_store::EventStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let events: Arc<dyn tracker_store::EventStore> = Arc::new(
        tracker_store::sqlite::SqliteEventStore::open(dir.path().join("events.sqlite"))
            .expect("event store"),
    );
    for (k, c) in generate(n, seed).iter().enumerate() {
        ingest(&*events, &delivery_of(c)).await;
        if k % 37 == 5 {
            events
                .append(
                    "learner-1-1",
                    tracker_store::ExpectedRevision::Any,
                    vec![tracker_store::NewEvent {
                        id: Uuid::new_v4(),
                        event_type: "TrailCompleted".into(),
                        schema_version: 1,
                        data: r#"{"institution_id": 1}"#.into(),
                        metadata: metadata(),
                    }],
                )
                .await
                .expect("append undecodable");
        }
        if k % 29 == 3 || k + 1 == n {
            ingest(
                &*events,
                &format!(
                    r#"{{"event":{{"slug":"activities.course.completed"}},"data":{{"institution":{{"id":7}},"user":{{"id":{}}}}}}}"#,
                    k + 1
                ),
            )
            .await;
        }
    }
    (dir, events)
}

/// What the runner does, in batches of the given sizes (cycled): decode,
/// dead-letter what does not decode, checkpoint at the batch's last event.
async fn apply_log(store: &dyn ReadStore, events: &dyn tracker_store::EventStore, sizes: &[usize]) {
    let log = events
        .read_all(tracker_store::ReadAll {
            from: 1,
            limit: 1_000_000,
        })
        .await
        .expect("read log");
    let mut rest = log.as_slice();
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at((*size).min(rest.len()));
        for kind in ProjectionKind::ALL {
            let mut completions = Vec::new();
            let mut dead_letters = Vec::new();
            for e in chunk.iter().filter(|e| Completion::wants(e)) {
                match Completion::decode(e) {
                    Ok(c) => completions.push(c),
                    Err(err) => dead_letters.push(DeadLetter {
                        projection: kind.name().to_owned(),
                        position: e.position,
                        event_id: e.id,
                        event_type: e.event_type.clone(),
                        error: err.0,
                        recorded_at: Utc::now(),
                    }),
                }
            }
            store
                .apply(ApplyBatch {
                    after: 0,
                    key: CheckpointKey::whole(kind),
                    completions,
                    dead_letters,
                    through: chunk.last().map(|e| e.position).unwrap_or(0),
                    lease: None,
                })
                .await
                .expect("apply");
        }
        rest = tail;
    }
}

/// Checkpoints and dead letters (without when they were recorded).
async fn bookkeeping(store: &dyn ReadStore) -> (Vec<(String, u64)>, Vec<String>) {
    let dead = store
        .dead_letters(100_000)
        .await
        .expect("dead letters")
        .into_iter()
        .map(|d| {
            format!(
                "{} {} {} {} {}",
                d.projection, d.position, d.event_id, d.event_type, d.error
            )
        })
        .collect();
    (store.checkpoints().await.expect("checkpoints"), dead)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_equals_incremental_application_on_postgres_and_sqlite() {
    let db = TestDb::create().await;
    let (dir, events) = event_log(300, 11).await;
    let head = events.head().await.expect("head");

    let pg = PgReadStore::connect(&db.url).await.expect("connect");
    apply_log(&pg, &*events, &[1, 7, 64, 3, 150]).await;
    let live = pg.snapshot().await.expect("snapshot");
    let live_books = bookkeeping(&pg).await;
    assert!(!live_books.1.is_empty(), "the log has undecodable events");
    assert_eq!(
        live_books.0,
        [
            ("institutions".to_owned(), head),
            ("learners".to_owned(), head)
        ]
    );

    let generation = tracker_projections::replay::replay(Arc::clone(&events), &pg, |_| {})
        .await
        .expect("replay into postgres");
    assert!(pg.follow_current().await.expect("follow"));
    assert_eq!(pg.generation(), generation);
    assert_same(&live, &pg.snapshot().await.expect("snapshot"), "pg rebuild");
    assert_eq!(bookkeeping(&pg).await, live_books);

    let sqlite = SqliteReadStore::open(dir.path().join("readmodels")).expect("sqlite");
    tracker_projections::replay::replay(Arc::clone(&events), &sqlite, |_| {})
        .await
        .expect("replay into sqlite");
    assert!(sqlite.follow_current().await.expect("follow"));
    assert_same(
        &live,
        &sqlite.snapshot().await.expect("snapshot"),
        "sqlite rebuild",
    );
    assert_eq!(bookkeeping(&sqlite).await, live_books);

    // The live path goes on in both rebuilt generations: more of the same
    // learners, trails and courses count as completions, not as new members.
    let more = generate(400, 11);
    let more: Vec<Completion> = more[300..]
        .iter()
        .map(|c| Completion {
            position: c.position + head,
            ..c.clone()
        })
        .collect();
    apply_in_batches(&pg, &more, &[33]).await;
    apply_in_batches(&sqlite, &more, &[100]).await;
    let reference = PgReadStore::connect(&db.url).await.expect("connect");
    let incremental = reference.create_generation().await.expect("generation");
    apply_log(&*incremental, &*events, &[50]).await;
    apply_in_batches(&*incremental, &more, &[100]).await;
    let expected = incremental.snapshot().await.expect("snapshot");
    assert_same(
        &expected,
        &pg.snapshot().await.expect("snapshot"),
        "pg after rebuild",
    );
    assert_same(
        &expected,
        &sqlite.snapshot().await.expect("snapshot"),
        "sqlite after rebuild",
    );
}

/// A rebuilt generation is loaded without its indexes (primary keys
/// included) and must come out with exactly the indexes, constraints and
/// NOT NULL columns of a normal one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_generation_has_every_index_back() {
    let db = TestDb::create().await;
    let (_dir, events) = event_log(40, 3).await;
    let pg = PgReadStore::connect(&db.url).await.expect("connect");
    let rebuilt = tracker_projections::replay::replay(Arc::clone(&events), &pg, |_| {})
        .await
        .expect("replay");
    let client = db.client().await;
    let describe = |generation: String| {
        let client = &client;
        async move {
            let schema = format!("tracker_rm_{generation}");
            let prefix = format!("{schema}.");
            let queries: [(&str, &[&(dyn ToSql + Sync)]); 3] = [
                (
                    "SELECT 'index ' || tablename::text || ' ' || indexname::text || ' '
                            || replace(indexdef, $1, 's')
                     FROM pg_indexes WHERE schemaname = $2 ORDER BY 1",
                    &[&prefix, &schema],
                ),
                (
                    "SELECT 'constraint ' || t.relname::text || ' ' || c.conname::text || ' '
                            || c.contype::text || ' ' || replace(pg_get_constraintdef(c.oid), $1, 's')
                     FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
                     JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = $2 ORDER BY 1",
                    &[&prefix, &schema],
                ),
                (
                    "SELECT 'column ' || t.relname::text || ' ' || a.attname::text || ' '
                            || a.attnotnull::text
                     FROM pg_attribute a JOIN pg_class t ON t.oid = a.attrelid
                     JOIN pg_namespace n ON n.oid = t.relnamespace
                     WHERE n.nspname = $1 AND t.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
                     ORDER BY 1",
                    &[&schema],
                ),
            ];
            let mut described = Vec::new();
            for (sql, params) in queries {
                let rows = client.query(sql, params).await.expect("catalog");
                described.extend(rows.iter().map(|r| r.get::<_, String>(0)));
            }
            described
        }
    };
    let fresh = describe("g1".to_owned()).await;
    let built = describe(rebuilt).await;
    assert!(
        fresh.iter().any(|i| i.contains("inst_trails_by_name")),
        "{fresh:?}"
    );
    assert!(
        fresh.iter().any(|i| i.contains("lrn_completions_pkey")),
        "{fresh:?}"
    );
    assert!(
        fresh.iter().any(|i| i.starts_with(
            "constraint inst_m_course_learners inst_m_course_learners_pkey p PRIMARY KEY"
        )),
        "{fresh:?}"
    );
    // Event ids are unique in the log; the read model does not index them.
    assert!(
        !fresh
            .iter()
            .any(|i| !i.starts_with("column ") && i.contains("event_id")),
        "{fresh:?}"
    );
    assert_eq!(built, fresh);
}

/// A generation is loaded without its primary keys; a key loaded twice
/// must still keep it from being sealed (its unique index is built then).
#[tokio::test]
async fn a_key_loaded_twice_is_refused_by_the_build() {
    let db = TestDb::create().await;
    let pg = PgReadStore::connect(&db.url).await.expect("connect");
    let target = pg.create_generation().await.expect("create");
    let mut rows = generate(3, 1);
    rows.push(rows[0].clone());
    let built = match target.load_completions(Arc::from(rows)).await {
        Ok(()) => target.seal().await,
        Err(e) => Err(e),
    };
    let err = built.expect_err("a generation with a position loaded twice");
    // The server's reason, not just "db error".
    assert!(
        err.to_string()
            .contains("building the read indexes: ERROR: could not create unique index"),
        "{err}"
    );
}

/// Bulk loads skip the checkpoint, so only a generation being built takes
/// them.
#[tokio::test]
async fn bulk_loads_are_refused_outside_a_build() {
    let db = TestDb::create().await;
    let pg = PgReadStore::connect(&db.url).await.expect("connect");
    let err = pg.load_completions(Arc::from(generate(3, 1))).await;
    assert!(matches!(err, Err(ReadStoreError::Storage(_))), "{err:?}");
    assert!(is_empty(&pg.snapshot().await.expect("snapshot")));
}
