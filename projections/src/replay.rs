//! Rebuilding every read model from position 0, blue/green: the new
//! generation is built beside the current one (which stays readable and, if
//! a projector runs, live), then made current in one atomic switch once it
//! has caught up with the log.
//!
//! The rebuild is a pipeline: one task reads the log in large slices and
//! decodes each event once, while the other applies the previous slice to
//! every projection; reading and writing overlap, on separate cores.

use std::sync::Arc;

use tokio::sync::mpsc;
use tracker_store::{EventStore, Position, ReadAll};

use crate::model::Completion;
use crate::plan::ProjectionKind;
use crate::readstore::{ApplyBatch, CheckpointKey, DeadLetter, ReadStore, ReadStoreError};

/// Events per transaction while rebuilding.
pub const REPLAY_BATCH: usize = 10_000;

/// Where a rebuild stands, for a progress bar or log lines.
#[derive(Debug, Clone, Copy)]
pub struct ReplayProgress {
    /// Every projection has applied the log up to here.
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

/// One decoded slice of the log.
struct Slice {
    completions: Vec<Completion>,
    /// (position, event id, event type, error) of events that did not decode.
    undecodable: Vec<(Position, uuid::Uuid, String, String)>,
    through: Position,
}

/// Rebuilds every projection into a new generation and switches to it.
/// Returns the new generation's name.
pub async fn replay(
    events: Arc<dyn EventStore>,
    read: &dyn ReadStore,
    progress: impl Fn(ReplayProgress) + Send + Sync + 'static,
) -> Result<String, ReplayError> {
    let target = read.create_generation().await?;
    let generation = target.generation();
    tracing::info!(%generation, "rebuilding read models");
    let mut head = events.head().await?;

    let (tx, mut rx) = mpsc::channel::<Result<Slice, ReplayError>>(2);
    let reader = tokio::spawn(read_slices(Arc::clone(&events), tx));
    while let Some(slice) = rx.recv().await {
        let mut slice = slice?;
        for (i, kind) in ProjectionKind::ALL.into_iter().enumerate() {
            let dead_letters = slice
                .undecodable
                .iter()
                .map(|(position, id, event_type, error)| DeadLetter {
                    projection: kind.name().to_owned(),
                    position: *position,
                    event_id: *id,
                    event_type: event_type.clone(),
                    error: error.clone(),
                    recorded_at: chrono::Utc::now(),
                })
                .collect();
            target
                .apply(ApplyBatch {
                    key: CheckpointKey::whole(kind),
                    // The last projection takes the slice; the others copy it.
                    completions: if i + 1 == ProjectionKind::ALL.len() {
                        std::mem::take(&mut slice.completions)
                    } else {
                        slice.completions.clone()
                    },
                    dead_letters,
                    through: slice.through,
                    lease: None,
                })
                .await?;
        }
        head = head.max(slice.through);
        progress(ReplayProgress {
            done: slice.through,
            head,
        });
    }
    reader.await.map_err(|e| ReplayError::Task(e.to_string()))?;
    target.seal().await?;
    read.switch_to(&generation).await?;
    tracing::info!(%generation, "rebuilt read models are now current");
    Ok(generation)
}

/// Reads the whole log (until a read finds nothing new) and decodes it.
async fn read_slices(events: Arc<dyn EventStore>, tx: mpsc::Sender<Result<Slice, ReplayError>>) {
    let mut next = 1;
    loop {
        let events = match events
            .read_all(ReadAll {
                from: next,
                limit: REPLAY_BATCH,
            })
            .await
        {
            Ok(events) => events,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let Some(through) = events.last().map(|e| e.position) else {
            return;
        };
        let mut slice = Slice {
            completions: Vec::with_capacity(events.len()),
            undecodable: Vec::new(),
            through,
        };
        for event in events.iter().filter(|e| Completion::wants(e)) {
            match Completion::decode(event) {
                Ok(c) => slice.completions.push(c),
                Err(e) => slice.undecodable.push((
                    event.position,
                    event.id,
                    event.event_type.clone(),
                    e.0,
                )),
            }
        }
        if tx.send(Ok(slice)).await.is_err() {
            return;
        }
        next = through + 1;
    }
}
