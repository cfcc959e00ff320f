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
