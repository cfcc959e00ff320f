//! The query side on both backends: the same events, applied to a SQLite
//! and a PostgreSQL read store, give the same answer to every query (every
//! endpoint, sort, page, filter and bucket), checkpoint included.
//!
//! Needs PostgreSQL at `TRACKER_TEST_POSTGRES_URL`, else
//! `postgres://postgres@127.0.0.1:5432/postgres`, with the right to create
//! databases; the test makes its own database and drops it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Debug;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use tokio_postgres::NoTls;
use tracker_projections::model::{Completion, CourseRef};
use tracker_projections::postgres::PgReadStore;
use tracker_projections::query::postgres::PgQueries;
use tracker_projections::query::sqlite::SqliteQueries;
use tracker_projections::query::{
    ActivityRequest, Bucket, CompletionFilter, CompletionKey, CompletionSort, ListSort, Lookup,
    Page, PageRequest, QueryError, Read, ReadModelQueries, SortKey,
};
use tracker_projections::readstore::ApplyBatch;
use tracker_projections::sqlite::SqliteReadStore;
use tracker_projections::{CheckpointKey, ProjectionKind, ReadStore};
use uuid::Uuid;

fn admin_url() -> String {
    std::env::var("TRACKER_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

async fn admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&admin_url(), NoTls)
        .await
        .expect("PostgreSQL must be reachable for these tests (TRACKER_TEST_POSTGRES_URL)");
    tokio::spawn(connection);
    client
}

/// A database of its own, dropped at the end (also on panic).
struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    async fn create() -> Self {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let name = format!("tracker_test_{secs}_{}", Uuid::new_v4().simple());
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap();
        let url = admin_url();
        let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
        Self {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                admin()
                    .await
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await
            })
        })
        .join();
    }
}

const INSTITUTIONS: [u64; 3] = [7, 42, 9_007_199_254_740_993];
const HUGE_USER: u64 = u64::MAX - 5;
const NAMES: [&str; 6] = [
    "José Álvarez",
    "Zoë Müller",
    "ana",
    "Ana",
    "Łukasz Żółć",
    "Zoe",
];

/// `n` completions over 3 institutions, 12 learners (one above i64::MAX),
/// 6 trails, renames, re-completions and times out of order.
fn generate(n: u64) -> Vec<Completion> {
    let base = NaiveDate::from_ymd_opt(2024, 1, 29)
        .and_then(|d| d.and_hms_opt(8, 0, 0))
        .unwrap();
    let mut position = 0;
    (0..n)
        .map(|k| {
            position += 1 + k % 3;
            let institution = INSTITUTIONS[(k % 3) as usize];
            let j = k / 3;
            let user = if j % 17 == 5 {
                HUGE_USER
            } else {
                1000 + (j * 7) % 12
            };
            let trail = 100 + (j * 5) % 6;
            let local = base + TimeDelta::minutes((k * 397 % 5000) as i64 * 37);
            let raw = local.format("%Y-%m-%d %H:%M:%S").to_string();
            let renamed = k > n / 2;
            Completion {
                position,
                event_id: Uuid::from_u128(u128::from(position)),
                institution_id: institution,
                user_id: user,
                user_name: NAMES[((user + u64::from(renamed)) % 6) as usize].to_owned(),
                user_email: format!("u{user}@example.org"),
                trail_id: trail,
                trail_name: if renamed && trail == 101 {
                    "Ética — 2ª edição".to_owned()
                } else {
                    format!("Trilha {}", NAMES[(trail % 6) as usize])
                },
                courses: (0..1 + trail % 3)
                    .map(|j| CourseRef {
                        id: 500 + (trail + j) % 7,
                        title: NAMES[((trail + j) % 6) as usize].to_owned(),
                    })
                    .collect(),
                day: raw[..10].to_owned(),
                finished_at_raw: raw,
                finished_at: local.and_utc() + TimeDelta::hours(3),
            }
        })
        .collect()
}

async fn apply(store: &dyn ReadStore, events: &[Completion]) {
    for chunk in events.chunks(37) {
        let through = chunk.last().unwrap().position;
        for kind in ProjectionKind::ALL {
            store
                .apply(ApplyBatch {
                    after: 0,
                    key: CheckpointKey::whole(kind),
                    completions: chunk.to_vec(),
                    dead_letters: Vec::new(),
                    through,
                    lease: None,
                })
                .await
                .unwrap();
        }
    }
}

fn same<T: PartialEq + Debug>(a: Result<T, QueryError>, b: Result<T, QueryError>, what: &str) -> T {
    let a = a.unwrap_or_else(|e| panic!("sqlite {what}: {e}"));
    let b = b.unwrap_or_else(|e| panic!("postgres {what}: {e}"));
    assert_eq!(a, b, "{what}: SQLite and PostgreSQL differ");
    a
}

type Pager<T, K> = Read<Lookup<Page<T, K>>>;

/// Walks a list on both backends page by page; every page must be equal.
async fn walk<T, K, F, Fut>(what: &str, limit: usize, first: Option<K>, query: F) -> Vec<T>
where
    T: PartialEq + Debug + Clone,
    K: PartialEq + Debug + Clone,
    F: Fn(usize, Option<K>, bool) -> Fut,
    Fut: std::future::Future<Output = Result<Pager<T, K>, QueryError>>,
{
    let mut rows = Vec::new();
    let mut after = first;
    for page_no in 0..10_000 {
        let a = query(limit, after.clone(), false).await;
        let b = query(limit, after.clone(), true).await;
        let page = same(a, b, &format!("{what} page {page_no}"));
        let Lookup::Found(page) = page.value else {
            return rows;
        };
        assert!(page.items.len() <= limit);
        rows.extend(page.items);
        match page.next {
            Some(k) => after = Some(k),
            None => return rows,
        }
    }
    panic!("{what}: the walk does not end");
}

/// Queries opened on a database with no read models yet (a standby that
/// has not replayed the primary's schema) answer an error, not a wrong
/// answer, and the right answers once the schema and rows are there,
/// without reconnecting.
#[tokio::test]
async fn queries_opened_before_the_read_models_exist_answer_once_they_do() {
    let db = TestDb::create().await;
    let pg = PgQueries::connect(&db.url, 2).await.unwrap();
    let early = pg.summary(INSTITUTIONS[0]).await;
    let Err(e) = early else {
        panic!("an answer without read models: {early:?}");
    };
    assert!(e.to_string().contains("no current generation yet"), "{e}");

    let events = generate(60);
    let store = PgReadStore::connect(&db.url).await.unwrap();
    apply(&store, &events).await;
    let summary = pg.summary(INSTITUTIONS[0]).await.unwrap();
    assert!(summary.value.is_some());
    assert_eq!(summary.consistent_through, events.last().unwrap().position);
}

#[tokio::test]
async fn both_backends_answer_every_query_the_same() {
    let events = generate(600);
    let dir = tempfile::tempdir().unwrap();
    let sqlite_store = SqliteReadStore::open(dir.path()).unwrap();
    apply(&sqlite_store, &events).await;
    let db = TestDb::create().await;
    let pg_store = PgReadStore::connect(&db.url).await.unwrap();
    apply(&pg_store, &events).await;

    // The queries only read, so they can be served by a hot standby
    // (`read_store.query_url`): here every PostgreSQL query runs on
    // connections where a write would fail, as on a standby.
    admin()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET default_transaction_read_only = on",
            db.name
        ))
        .await
        .unwrap();
    let (standby, connection) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
    tokio::spawn(connection);
    let write = standby.batch_execute("CREATE TABLE public.w (x INT)").await;
    assert!(write.is_err(), "new connections are read-only");
    let sqlite = SqliteQueries::open(dir.path()).unwrap();
    let pg = PgQueries::connect(&db.url, 4).await.unwrap();
    let q = |on_pg: bool| -> &dyn ReadModelQueries { if on_pg { &pg } else { &sqlite } };
    let head = events.last().unwrap().position;

    let unknown = 123_456;
    let mut found = 0;
    for institution in INSTITUTIONS.into_iter().chain([unknown]) {
        let what = |s: &str| format!("institution {institution}: {s}");
        for kind in ProjectionKind::ALL {
            let at = same(
                sqlite.consistent_through(institution, kind).await,
                pg.consistent_through(institution, kind).await,
                &what("checkpoint"),
            );
            assert_eq!(at, head);
        }
        let summary = same(
            sqlite.summary(institution).await,
            pg.summary(institution).await,
            &what("summary"),
        );
        assert_eq!(summary.consistent_through, head);
        assert_eq!(summary.value.is_some(), institution != unknown);

        for sort in [ListSort::Id, ListSort::Name, ListSort::Completions] {
            for limit in [1, 4, 1000] {
                let trails = walk(&what("trails"), limit, None, |limit, after, on_pg| {
                    q(on_pg).trails(institution, PageRequest { sort, after, limit })
                })
                .await;
                let courses = walk(&what("courses"), limit, None, |limit, after, on_pg| {
                    q(on_pg).courses(institution, PageRequest { sort, after, limit })
                })
                .await;
                let learners = walk(&what("learners"), limit, None, |limit, after, on_pg| {
                    q(on_pg).learners(institution, PageRequest { sort, after, limit })
                })
                .await;
                if institution != unknown {
                    assert!(trails.len() >= 5 && courses.len() >= 5 && learners.len() >= 8);
                    found += 1;
                }
            }
        }
        // Keys that sort before everything, and a foreign key.
        let early = same(
            sqlite
                .trails(
                    institution,
                    PageRequest {
                        sort: ListSort::Name,
                        after: Some(SortKey::Name(String::new(), 0)),
                        limit: 3,
                    },
                )
                .await,
            pg.trails(
                institution,
                PageRequest {
                    sort: ListSort::Name,
                    after: Some(SortKey::Name(String::new(), 0)),
                    limit: 3,
                },
            )
            .await,
            &what("trails after an empty name"),
        );
        match early.value {
            Lookup::Found(page) => {
                assert!(institution != unknown);
                assert_eq!(page.items.len(), 3, "every name sorts after the empty one");
            }
            other => assert!(
                institution == unknown && matches!(other, Lookup::UnknownInstitution),
                "{other:?}"
            ),
        }
        let foreign = sqlite
            .trails(
                institution,
                PageRequest {
                    sort: ListSort::Id,
                    after: Some(SortKey::Completions(1, 1)),
                    limit: 3,
                },
            )
            .await;
        assert!(matches!(foreign, Err(QueryError::KeyMismatch)));

        for trail in [100, 101, 102, 103, 104, 105, 999] {
            same(
                sqlite.trail(institution, trail).await,
                pg.trail(institution, trail).await,
                &what(&format!("trail {trail}")),
            );
            walk(&what("trail learners"), 3, None, |limit, after, on_pg| {
                q(on_pg).trail_learners(
                    institution,
                    trail,
                    PageRequest {
                        sort: ListSort::Id,
                        after,
                        limit,
                    },
                )
            })
            .await;
        }
        for user in (1000..1012).chain([HUGE_USER, 5]) {
            let detail = same(
                sqlite.learner(institution, user).await,
                pg.learner(institution, user).await,
                &what(&format!("learner {user}")),
            );
            // Every institution has learners 1000-1011 and HUGE_USER, none 5.
            match (&detail.value, institution != unknown, user != 5) {
                (Lookup::Found(d), true, true) => {
                    assert_eq!(d.learner.completions as usize, d.completions.len());
                    assert!(!d.completions.is_empty());
                }
                (Lookup::UnknownEntity, true, false) | (Lookup::UnknownInstitution, false, _) => {}
                (other, ..) => panic!("{}: {other:?}", what(&format!("learner {user}"))),
            }
        }

        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let filters = [
            CompletionFilter::default(),
            CompletionFilter {
                user_id: Some(1003),
                ..Default::default()
            },
            CompletionFilter {
                user_id: Some(HUGE_USER),
                ..Default::default()
            },
            CompletionFilter {
                trail_id: Some(101),
                ..Default::default()
            },
            CompletionFilter {
                from: Some(t("2024-02-10T00:00:00.5Z")),
                to: Some(t("2024-03-01T12:00:00Z")),
                ..Default::default()
            },
            CompletionFilter {
                from: Some(t("2024-02-01T00:00:00Z")),
                trail_id: Some(102),
                user_id: Some(1001),
                ..Default::default()
            },
            CompletionFilter {
                from: Some(t("2024-02-05T00:00:00Z")),
                to: Some(t("2024-02-25T00:00:00Z")),
                trail_id: Some(101),
                ..Default::default()
            },
            CompletionFilter {
                from: Some(t("2024-02-20T06:30:00Z")),
                ..Default::default()
            },
            CompletionFilter {
                to: Some(t("2024-02-12T00:00:00Z")),
                ..Default::default()
            },
            CompletionFilter {
                from: Some(t("2030-01-01T00:00:00Z")),
                ..Default::default()
            },
        ];
        for filter in filters {
            for sort in [CompletionSort::Position, CompletionSort::FinishedAt] {
                for limit in [1, 7, 1000] {
                    let rows = walk(
                        &what(&format!("completions {filter:?} {sort:?}")),
                        limit,
                        None::<CompletionKey>,
                        |limit, after, on_pg| {
                            q(on_pg).completions(
                                institution,
                                filter.clone(),
                                PageRequest { sort, after, limit },
                            )
                        },
                    )
                    .await;
                    if let (Some(from), true) = (filter.from, institution != unknown) {
                        assert!(rows.iter().all(|r| r.finished_at >= from));
                    }
                    if sort == CompletionSort::Position {
                        // The events themselves say which rows a filter
                        // takes, in position order (whole-second times).
                        let expected: Vec<u64> = events
                            .iter()
                            .filter(|c| {
                                c.institution_id == institution
                                    && filter.user_id.is_none_or(|u| c.user_id == u)
                                    && filter.trail_id.is_none_or(|t| c.trail_id == t)
                                    && filter.from.is_none_or(|f| c.finished_at >= f)
                                    && filter.to.is_none_or(|t| c.finished_at < t)
                            })
                            .map(|c| c.position)
                            .collect::<std::collections::BTreeSet<_>>()
                            .into_iter()
                            .collect();
                        let got: Vec<u64> = rows.iter().map(|r| r.position).collect();
                        assert_eq!(got, expected, "completions {filter:?} limit {limit}");
                    }
                }
            }
        }

        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        for bucket in [Bucket::Day, Bucket::Week, Bucket::Month] {
            for (from, to) in [
                (None, None),
                (Some(d("2024-02-03")), Some(d("2024-02-20"))),
                (Some(d("2023-12-31")), None),
            ] {
                let request = ActivityRequest { bucket, from, to };
                let activity = same(
                    sqlite.activity(institution, request).await,
                    pg.activity(institution, request).await,
                    &what(&format!("activity {request:?}")),
                );
                let a = match activity.value {
                    Lookup::Found(a) if institution != unknown => a,
                    Lookup::UnknownInstitution if institution == unknown => continue,
                    other => panic!("{}: {other:?}", what(&format!("activity {request:?}"))),
                };
                let total: u64 = a.buckets.iter().map(|b| b.completions).sum();
                assert!(total > 0, "{request:?}");
                if from.is_none() && to.is_none() {
                    let expected = events
                        .iter()
                        .filter(|c| c.institution_id == institution)
                        .count() as u64;
                    assert_eq!(total, expected, "{request:?}");
                }
            }
        }
    }
    assert_eq!(found, 27, "every institution's lists were walked");
}
