//! Rebuilding every read model from position 0, blue/green: the new
//! generation is built beside the current one (which stays readable and, if
//! a projector runs, live), then made current in one atomic switch once it
//! has caught up with the log.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tracker_store::{EventStore, Position, ReadAll};

use crate::model::Completion;
use crate::plan::ProjectionKind;
use crate::readstore::{ApplyBatch, CheckpointKey, DeadLetter, ReadStore, ReadStoreError};

/// Events per transaction while rebuilding.
pub const REPLAY_BATCH: usize = 10_000;

/// Where a rebuild stands, for a progress bar or log lines.
#[derive(Debug, Clone, Copy)]
pub struct ReplayProgress {
    /// Events read and applied by every projection (summed over projections
    /// divided by their number: the log position they all passed).
    pub done: Position,
    /// The log head when last looked at.
    pub head: Position,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Read(#[from] ReadStoreError),
    #[error("event store: {0}")]
    Events(#[from] tracker_store::StoreError),
    #[error("rebuild task failed: {0}")]
    Task(String),
}

/// Rebuilds every projection into a new generation and switches to it.
/// Returns the new generation's name.
pub async fn replay(
    events: Arc<dyn EventStore>,
    read: &dyn ReadStore,
    progress: impl Fn(ReplayProgress) + Send + Sync + 'static,
) -> Result<String, ReplayError> {
    let target: Arc<dyn ReadStore> = Arc::from(read.create_generation().await?);
    let generation = target.generation();
    tracing::info!(%generation, "rebuilding read models");
    let done: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let head = Arc::new(AtomicU64::new(events.head().await?));
    let progress = Arc::new(progress);

    let mut tasks = Vec::new();
    for (slot, kind) in ProjectionKind::ALL.into_iter().enumerate() {
        let (events, target, done, head, progress) = (
            Arc::clone(&events),
            Arc::clone(&target),
            Arc::clone(&done),
            Arc::clone(&head),
            Arc::clone(&progress),
        );
        tasks.push(tokio::spawn(async move {
            let report = || {
                let total: u64 = done.iter().map(|d| d.load(Ordering::Relaxed)).sum();
                progress(ReplayProgress {
                    done: total / done.len() as u64,
                    head: head.load(Ordering::Relaxed),
                });
            };
            let through = rebuild(kind, &*events, &*target, |p| {
                done[slot].store(p, Ordering::Relaxed);
                report();
            })
            .await?;
            head.fetch_max(through, Ordering::Relaxed);
            Ok::<_, ReplayError>(())
        }));
    }
    for task in tasks {
        task.await.map_err(|e| ReplayError::Task(e.to_string()))??;
    }
    read.switch_to(&generation).await?;
    tracing::info!(%generation, "rebuilt read models are now current");
    Ok(generation)
}

/// Applies the whole log to `target` for one projection, until a read finds
/// nothing new. Returns the position reached.
async fn rebuild(
    kind: ProjectionKind,
    events: &dyn EventStore,
    target: &dyn ReadStore,
    mut on_progress: impl FnMut(Position),
) -> Result<Position, ReplayError> {
    let key = CheckpointKey::whole(kind);
    let mut next = target.checkpoint(key).await? + 1;
    loop {
        let slice = events
            .read_all(ReadAll {
                from: next,
                limit: REPLAY_BATCH,
            })
            .await?;
        let Some(last) = slice.last().map(|e| e.position) else {
            return Ok(next - 1);
        };
        let mut completions = Vec::with_capacity(slice.len());
        let mut dead_letters = Vec::new();
        for event in slice.iter().filter(|e| Completion::wants(e)) {
            match Completion::decode(event) {
                Ok(c) => completions.push(c),
                Err(e) => dead_letters.push(DeadLetter {
                    projection: kind.name().to_owned(),
                    position: event.position,
                    event_id: event.id,
                    event_type: event.event_type.clone(),
                    error: e.0,
                    recorded_at: chrono::Utc::now(),
                }),
            }
        }
        target
            .apply(ApplyBatch {
                key,
                completions,
                dead_letters,
                through: last,
                lease: None,
            })
            .await?;
        on_progress(last);
        next = last + 1;
    }
}
