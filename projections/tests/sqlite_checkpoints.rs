//! The live read store's WAL is checkpointed by a background thread, not by
//! the projector's commits, and the files close with the store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use tracker_projections::model::{Completion, CourseRef};
use tracker_projections::readstore::ApplyBatch;
use tracker_projections::sqlite::{LIVE_WAL_FRAMES, SqliteReadStore};
use tracker_projections::{CheckpointKey, ProjectionKind, ReadStore, ReadStoreError};

fn completion(position: u64) -> Completion {
    let at = Utc.with_ymd_and_hms(2024, 3, 1, 10, 0, 0).unwrap();
    Completion {
        position,
        event_id: uuid::Uuid::new_v4(),
        institution_id: 1 + position % 13,
        user_id: position,
        user_name: format!("Learner {position}"),
        user_email: format!("l{position}@example.edu.br"),
        trail_id: 1 + position % 5,
        trail_name: "Trilha".into(),
        courses: vec![CourseRef {
            id: 1 + position % 11,
            title: "Curso".into(),
        }],
        finished_at_raw: "2024-03-01 07:00:00".into(),
        finished_at: at,
        day: "2024-03-01".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_commits_leave_checkpoints_to_a_background_thread() {
    let dir = tempfile::tempdir().unwrap();
    let read = SqliteReadStore::open(dir.path().join("readmodels")).unwrap();
    for kind in ProjectionKind::ALL {
        let (autocheckpoint, temp_store): (i64, i64) = read
            .with_conn(kind, |conn, _| {
                let pragma = |name: &str| {
                    conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
                        .map_err(|e| ReadStoreError::Storage(e.to_string()))
                };
                Ok((pragma("wal_autocheckpoint")?, pragma("temp_store")?))
            })
            .await
            .unwrap();
        // It checkpoints only once the WAL is large, so that the WAL can start
        // over (another connection's checkpoints never rewind it).
        assert_eq!(
            autocheckpoint,
            i64::from(LIVE_WAL_FRAMES),
            "the {kind:?} projection's connection checkpoints at another WAL size"
        );
        // 2 = MEMORY: a many-row statement's undo copy of the pages it
        // changes stays in memory instead of a temporary file.
        assert_eq!(
            temp_store, 2,
            "the {kind:?} projection's statement journals go to temporary files"
        );
    }

    for kind in ProjectionKind::ALL {
        let file = dir.path().join("readmodels").join(format!(
            "{}.{}.sqlite",
            read.generation(),
            kind.name()
        ));
        let before = std::fs::metadata(&file).unwrap().len();
        read.apply(ApplyBatch {
            after: 0,
            key: CheckpointKey::whole(kind),
            completions: (1..=3_000).map(completion).collect(),
            dead_letters: Vec::new(),
            through: 3_000,
            lease: None,
        })
        .await
        .unwrap();

        // The rows reach the database file (from the WAL) without another
        // commit: only the background checkpoint can have copied them.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&file).unwrap().len() <= before {
            assert!(
                Instant::now() < deadline,
                "the {kind:?} WAL was never checkpointed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A store dropped at shutdown closes its files before the drop returns:
/// the last connection to each file empties and removes its WAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_store_closes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let read = SqliteReadStore::open(dir.path().join("readmodels")).unwrap();
    let generation = read.generation();
    for kind in ProjectionKind::ALL {
        read.apply(ApplyBatch {
            after: 0,
            key: CheckpointKey::whole(kind),
            completions: (1..=500).map(completion).collect(),
            dead_letters: Vec::new(),
            through: 500,
            lease: None,
        })
        .await
        .unwrap();
    }
    let wal = |kind: ProjectionKind| {
        dir.path()
            .join("readmodels")
            .join(format!("{generation}.{}.sqlite-wal", kind.name()))
    };
    for kind in ProjectionKind::ALL {
        assert!(wal(kind).exists(), "{kind:?}: no WAL while open");
    }
    drop(read);
    for kind in ProjectionKind::ALL {
        assert!(!wal(kind).exists(), "{kind:?}: the file was left open");
    }
}

/// A job that panics fails its own call; the file's writer goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_panics_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let read = SqliteReadStore::open(dir.path().join("readmodels")).unwrap();
    let failed = read
        .with_conn(
            ProjectionKind::Learners,
            |_, _| -> Result<(), ReadStoreError> { panic!("a job that panics, on purpose") },
        )
        .await;
    assert!(
        matches!(failed, Err(ReadStoreError::Storage(_))),
        "{failed:?}"
    );
    read.apply(ApplyBatch {
        after: 0,
        key: CheckpointKey::whole(ProjectionKind::Learners),
        completions: (1..=3).map(completion).collect(),
        dead_letters: Vec::new(),
        through: 3,
        lease: None,
    })
    .await
    .unwrap();
    assert_eq!(
        read.checkpoint(CheckpointKey::whole(ProjectionKind::Learners))
            .await
            .unwrap(),
        3
    );
}

/// A completion of learner `1 + position % 100` on trail `1 + position % 5`
/// (one course each), every name ending in `name`.
fn visit(position: u64, name: &str) -> Completion {
    let user = 1 + position % 100;
    let trail = 1 + position % 5;
    Completion {
        position,
        event_id: uuid::Uuid::from_u128(u128::from(position)),
        institution_id: 1 + user % 7,
        user_id: user,
        user_name: format!("Learner {user}{name}"),
        user_email: format!("l{user}@example.edu.br"),
        trail_id: trail,
        trail_name: format!("Trilha {trail}{name}"),
        courses: vec![CourseRef {
            id: trail * 10,
            title: format!("Curso {trail}{name}"),
        }],
        ..completion(position)
    }
}

/// Every row `sql` selects from `kind`'s file.
async fn rows<T>(read: &SqliteReadStore, kind: ProjectionKind, sql: &'static str) -> Vec<T>
where
    T: for<'r> TryFrom<&'r rusqlite::Row<'r>, Error = rusqlite::Error> + Send + 'static,
{
    read.with_conn(kind, move |conn, _| {
        let mut stmt = conn
            .prepare(sql)
            .map_err(|e| ReadStoreError::Storage(e.to_string()))?;
        stmt.query_map([], |r| T::try_from(r))
            .and_then(|rows| rows.collect())
            .map_err(|e| ReadStoreError::Storage(e.to_string()))
    })
    .await
    .unwrap()
}

/// Empties `kind`'s WAL into its file, applies `completions`, and
/// returns the pages that commit wrote to the WAL, by the index or table
/// they belong to (`dbstat`).
async fn pages_written(
    read: &SqliteReadStore,
    dir: &std::path::Path,
    kind: ProjectionKind,
    completions: Vec<Completion>,
) -> std::collections::BTreeMap<String, usize> {
    let busy: i64 = read
        .with_conn(kind, |conn, _| {
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
                .map_err(|e| ReadStoreError::Storage(e.to_string()))
        })
        .await
        .unwrap();
    assert_eq!(busy, 0, "the WAL could not be emptied");
    let through = completions.last().unwrap().position;
    read.apply(ApplyBatch {
        after: 0,
        key: CheckpointKey::whole(kind),
        completions,
        dead_letters: Vec::new(),
        through,
        lease: None,
    })
    .await
    .unwrap();
    // The frames of the WAL's current round (their salts are the header's).
    let wal = std::fs::read(dir.join(format!("{}.{}.sqlite-wal", read.generation(), kind.name())))
        .unwrap();
    let be = |at: usize| u32::from_be_bytes(wal[at..at + 4].try_into().unwrap());
    let page_size = be(8) as usize;
    let mut pages = std::collections::BTreeSet::new();
    let mut at = 32;
    while at + 24 + page_size <= wal.len() && wal[at + 8..at + 16] == wal[16..24] {
        pages.insert(i64::from(be(at)));
        at += 24 + page_size;
    }
    assert!(!pages.is_empty(), "the batch wrote nothing to the WAL");
    let owners: Vec<(i64, String)> = rows(read, kind, "SELECT pageno, name FROM dbstat").await;
    let mut by_owner = std::collections::BTreeMap::new();
    for (page, name) in owners {
        if pages.contains(&page) {
            *by_owner.entry(name).or_insert(0) += 1;
        }
    }
    by_owner
}

/// SQLite rewrites an index entry whenever a statement assigns one of its
/// columns, even to the value it has: a batch that brings the names and
/// titles already stored must leave the name and title indexes' pages out
/// of its commit, and one that renames must still rename.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_seen_again_leave_their_indexes_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("readmodels");
    let read = SqliteReadStore::open(&files).unwrap();
    let name_indexes = [
        (ProjectionKind::Institutions, "inst_trails_by_name"),
        (ProjectionKind::Institutions, "inst_courses_by_title"),
        (ProjectionKind::Learners, "lrn_learners_by_name"),
    ];
    // Each round 300 completions at the next positions, each learner 3.
    let mut next = 1;
    let mut round = |name: &str| {
        let completions: Vec<Completion> = (next..next + 300).map(|p| visit(p, name)).collect();
        next += 300;
        completions
    };
    // New rows enter the indexes; the same names again leave them alone;
    // new names move their entries.
    for (name, writes_names) in [("", true), ("", false), (" (2025)", true)] {
        let completions = round(name);
        for kind in ProjectionKind::ALL {
            let pages = pages_written(&read, &files, kind, completions.clone()).await;
            for (_, index) in name_indexes.iter().filter(|(k, _)| *k == kind) {
                assert_eq!(
                    pages.contains_key(*index),
                    writes_names,
                    "names {name:?}: {index} in {pages:?}"
                );
            }
            // What the batch did change it wrote (the counts and their index).
            let counted = match kind {
                ProjectionKind::Institutions => "inst_trails_by_completions",
                ProjectionKind::Learners => "lrn_learners_by_completions",
            };
            assert!(pages.contains_key(counted), "{pages:?}");
        }
    }
    for (kind, sql) in [
        (ProjectionKind::Institutions, "SELECT name FROM inst_trails"),
        (
            ProjectionKind::Institutions,
            "SELECT title FROM inst_courses",
        ),
        (ProjectionKind::Learners, "SELECT name FROM lrn_learners"),
    ] {
        let names: Vec<(String,)> = rows(&read, kind, sql).await;
        assert!(!names.is_empty());
        assert!(
            names.iter().all(|(n,)| n.ends_with(" (2025)")),
            "{sql}: {names:?}"
        );
    }
}
