//! Running the projection workers: both projections, each its own runner
//! with its own checkpoint, in this process (`serve`) or alone (`project`).

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::FutureExt as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracker_projections::ProjectionKind;
use tracker_projections::ReadStore;
use tracker_projections::decode::{DecodeStats, SharedDecode};
use tracker_projections::readstore::{LeaseHolder, Partition};
use tracker_projections::runner::{Runner, RunnerConfig, RunnerError};
use tracker_store::EventStore;

use crate::config::ProjectorConfig;

/// Whether each runner of this process still runs, by checkpoint key, and
/// what a runner that ended on its own said: under `serve` the receiver goes
/// on after a projection halts, so `/readyz` and `/metrics` say so. Cheap to
/// clone; clones share the states.
#[derive(Debug, Clone, Default)]
pub struct RunnerStates {
    states: Arc<Mutex<BTreeMap<String, Option<String>>>>,
    /// Counted up by the runners after every batch they commit.
    applied: Arc<watch::Sender<u64>>,
}

impl RunnerStates {
    /// Changes after every batch a runner of this process commits: what a
    /// request waiting for a position (`min_position`) waits on.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Each runner's key with `None` while it runs, or the error it ended
    /// with.
    pub fn snapshot(&self) -> BTreeMap<String, Option<String>> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Option<String>>> {
        self.states.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `runner` as the runner of `key`, recording how it ends: an
    /// error, or a panic as [`RunnerError::Failed`].
    fn supervise<F>(&self, key: String, runner: F) -> impl Future<Output = F::Output> + use<F>
    where
        F: Future<Output = Result<(), RunnerError>>,
    {
        let states = self.clone();
        states.lock().insert(key.clone(), None);
        async move {
            let result = match AssertUnwindSafe(runner).catch_unwind().await {
                Ok(result) => result,
                Err(panic) => Err(RunnerError::Failed {
                    key: key.clone(),
                    error: panic_message(panic.as_ref()),
                }),
            };
            if let Err(e) = &result {
                tracing::error!(%key, error = %e, "projection halted");
                states.lock().insert(key, Some(e.to_string()));
            }
            result
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    format!("the runner panicked: {text}")
}

pub struct Projector {
    shutdown: watch::Sender<bool>,
    tasks: Vec<(String, JoinHandle<Result<(), RunnerError>>)>,
    decode: Arc<SharedDecode>,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector")
            .field(
                "runners",
                &self.tasks.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Projector {
    /// Starts one runner per projection for `partition`. Every runner of this
    /// process shares one lease holder id, and each event is decoded once for
    /// all of them: a runner up to two batches ahead of the other leaves its
    /// results for it (two batches of completions in memory at most).
    /// `states` follows each runner (see [`RunnerStates`]).
    pub fn start(
        events: Arc<dyn EventStore>,
        read: Arc<dyn ReadStore>,
        config: &ProjectorConfig,
        partition: Partition,
        states: &RunnerStates,
    ) -> Self {
        let (shutdown, rx) = watch::channel(false);
        let holder = LeaseHolder::new_random();
        let batch_size = config.batch_size.max(1);
        let decode = Arc::new(SharedDecode::new(
            ProjectionKind::ALL.len(),
            batch_size.saturating_mul(2),
        ));
        let runner_config = RunnerConfig {
            partition,
            batch_size,
            on_error: config.on_error.into(),
            lease: Some((holder, Duration::from_secs(config.lease_ttl_secs.max(1)))),
            decode: Arc::clone(&decode),
            applied: Arc::clone(&states.applied),
        };
        let tasks = ProjectionKind::ALL
            .into_iter()
            .map(|kind| {
                let runner = Runner::new(
                    Arc::clone(&events),
                    Arc::clone(&read),
                    kind,
                    runner_config.clone(),
                );
                let key = runner.key().to_string();
                let run = states.supervise(key.clone(), runner.run(rx.clone()));
                (key, tokio::spawn(run))
            })
            .collect();
        Self {
            shutdown,
            tasks,
            decode,
        }
    }

    /// How many events the runners decoded, and how many they handed over.
    pub async fn decode_stats(&self) -> DecodeStats {
        self.decode.stats().await
    }

    /// Resolves when a runner ends on its own: a halt under
    /// `on_error = "stop"` with what it said, a runner whose task failed
    /// (a panic) as [`RunnerError::Failed`], so that the process ends
    /// and its supervisor restarts it rather than serve a projection that
    /// no longer advances.
    pub async fn halted(&mut self) -> Result<(), RunnerError> {
        loop {
            if self.tasks.is_empty() {
                return Ok(());
            }
            let (i, result) = {
                let futures = self.tasks.iter_mut().map(|(_, t)| t);
                let (result, i, _) = futures::future::select_all(futures).await;
                (i, result)
            };
            let (key, _) = self.tasks.remove(i);
            match result {
                Ok(Ok(())) => tracing::info!(%key, "projection stopped"),
                Ok(Err(e)) => return Err(e),
                Err(e) => {
                    return Err(RunnerError::Failed {
                        key,
                        error: e.to_string(),
                    });
                }
            }
        }
    }

    /// Asks every runner to stop after its current batch, and waits.
    pub async fn stop(self) -> Result<(), RunnerError> {
        let _ = self.shutdown.send(true);
        let mut first_error = None;
        for (key, task) in self.tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    tracing::error!(%key, error = %e, "projection task failed");
                    first_error.get_or_insert(RunnerError::Failed {
                        key,
                        error: e.to_string(),
                    });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use chrono::Utc;
    use tracker_domain::{SourceTimeZone, parse_delivery};
    use tracker_projections::CheckpointKey;
    use tracker_projections::sqlite::SqliteReadStore;
    use tracker_store::sqlite::SqliteEventStore;
    use tracker_store::{EventMetadata, ExpectedRevision};

    use super::*;

    async fn append(events: &dyn EventStore, n: u64) {
        let body = serde_json::json!({
            "event": {"slug": "activities.trail.completed", "send_at": "2024-03-01 10:00:00"},
            "data": {
                "institution": {"id": 1 + n % 3},
                "user": {"id": n + 1, "name": "Ana", "email": "ana@example.edu.br"},
                "trail": {"id": 9, "name": "Trilha", "finished_at": "2024-03-01 10:00:00",
                    "courses": [{"id": 1, "title": "Curso"}]}
            }
        })
        .to_string();
        let zone = SourceTimeZone::default();
        let parsed = parse_delivery(body.as_bytes(), &zone).unwrap();
        let metadata = EventMetadata {
            received_at: Utc::now(),
            source_id: "test".into(),
            request_id: "r".into(),
            content_hash: parsed.content_hash.clone(),
        };
        let event = crate::webhook::recorded_event(&parsed, &zone, metadata).unwrap();
        events
            .append(&parsed.stream(), ExpectedRevision::Any, vec![event])
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_runner_that_panics_ends_the_projector_with_an_error_and_is_shown_halted() {
        let (shutdown, _) = watch::channel(false);
        let states = RunnerStates::default();
        let calm = tokio::spawn(states.supervise(
            "institutions".into(),
            std::future::pending::<Result<(), RunnerError>>(),
        ));
        let panics = tokio::spawn(
            states.supervise("learners".into(), async { panic!("a bug in the runner") }),
        );
        let mut projector = Projector {
            shutdown,
            tasks: vec![("institutions".into(), calm), ("learners".into(), panics)],
            decode: Arc::new(SharedDecode::new(2, 2)),
        };
        let halted = tokio::time::timeout(Duration::from_secs(10), projector.halted()).await;
        match halted.expect("halted() answers once a runner failed") {
            Err(RunnerError::Failed { key, error }) => {
                assert_eq!(key, "learners");
                assert!(error.contains("panicked: a bug in the runner"), "{error}");
            }
            other => panic!("expected the failed runner, got {other:?}"),
        }
        let snapshot = states.snapshot();
        assert_eq!(snapshot.get("institutions"), Some(&None), "{snapshot:?}");
        assert_eq!(
            snapshot.get("learners"),
            Some(&Some(
                "projection learners failed: the runner panicked: a bug in the runner".to_owned()
            )),
            "{snapshot:?}"
        );
    }

    #[tokio::test]
    async fn a_runner_that_halts_is_shown_with_its_error() {
        let states = RunnerStates::default();
        let halt = RunnerError::Halted {
            key: "institutions".into(),
            position: 7,
            error: "undecodable".into(),
        };
        let message = halt.to_string();
        let ended = states
            .supervise("institutions".into(), async move { Err(halt) })
            .await;
        assert!(matches!(
            ended,
            Err(RunnerError::Halted { position: 7, .. })
        ));
        assert_eq!(
            states.snapshot(),
            BTreeMap::from([("institutions".to_owned(), Some(message))])
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_projections_are_built_from_one_decode_of_each_event() {
        let dir = tempfile::tempdir().unwrap();
        let events: Arc<dyn EventStore> =
            Arc::new(SqliteEventStore::open(dir.path().join("events.sqlite")).unwrap());
        let read = SqliteReadStore::open(dir.path().join("readmodels")).unwrap();
        // Some events before the start (read in batches), some after it
        // (followed live).
        for n in 0..300 {
            append(events.as_ref(), n).await;
        }
        // Results wait for the other runner up to two batches: with
        // batches of 200 that holds every event here, so the test does not
        // depend on how far one runner gets ahead (each projection writes on
        // its own thread, and on a busy machine one can lead by more than
        // two batches of 100). Dropping beyond the bound is tested in
        // `tracker_projections::decode`.
        let config = ProjectorConfig {
            batch_size: 200,
            ..ProjectorConfig::default()
        };
        let states = RunnerStates::default();
        let applied = states.applied();
        let projector = Projector::start(
            Arc::clone(&events),
            Arc::new(read.clone()),
            &config,
            Partition::WHOLE,
            &states,
        );
        for n in 300..400 {
            append(events.as_ref(), n).await;
        }

        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        for kind in ProjectionKind::ALL {
            while read.checkpoint(CheckpointKey::whole(kind)).await.unwrap() < 400 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{kind:?} not caught up"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let stats = projector.decode_stats().await;
        projector.stop().await.unwrap();
        // Every committed batch is signalled (what `min_position` waits on).
        assert!(*applied.borrow() >= 2, "{}", *applied.borrow());

        // Each runner alone would have decoded all 400.
        assert_eq!(stats.decoded + stats.shared, 800);
        assert!(
            stats.decoded < 500,
            "most events decoded once, not once per runner: {stats:?}"
        );
    }
}
