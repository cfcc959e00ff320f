//! Running the projection workers: both projections, each its own runner
//! with its own checkpoint, in this process (`serve`) or alone (`project`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracker_projections::ProjectionKind;
use tracker_projections::ReadStore;
use tracker_projections::readstore::{LeaseHolder, Partition};
use tracker_projections::runner::{OnError, Runner, RunnerConfig, RunnerError};
use tracker_store::EventStore;

use crate::config::{OnErrorSetting, ProjectorConfig};

pub struct Projector {
    shutdown: watch::Sender<bool>,
    tasks: Vec<(String, JoinHandle<Result<(), RunnerError>>)>,
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
    /// process shares one lease holder id.
    pub fn start(
        events: Arc<dyn EventStore>,
        read: Arc<dyn ReadStore>,
        config: &ProjectorConfig,
        partition: Partition,
    ) -> Self {
        let (shutdown, rx) = watch::channel(false);
        let holder = LeaseHolder::new_random();
        let runner_config = RunnerConfig {
            partition,
            batch_size: config.batch_size.max(1),
            on_error: match config.on_error {
                OnErrorSetting::DeadLetter => OnError::DeadLetter,
                OnErrorSetting::Stop => OnError::Stop,
            },
            lease: Some((holder, Duration::from_secs(config.lease_ttl_secs.max(1)))),
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
                (key, tokio::spawn(runner.run(rx.clone())))
            })
            .collect();
        Self { shutdown, tasks }
    }

    /// Resolves when a runner ends on its own (a halt under
    /// `on_error = "stop"`), with what it said.
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
                Err(e) => tracing::error!(%key, error = %e, "projection task failed"),
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
                Err(e) => tracing::error!(%key, error = %e, "projection task failed"),
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
