//! Rebuilding every read model from position 0, blue/green: the new
//! generation is built beside the current one (which stays readable and, if
//! a projector runs, live), then made current in one atomic switch once it
//! has caught up with the log.
//!
//! The rebuild is a pipeline: one task reads the log in large slices and
//! decodes each event once; each projection folds the slices in memory
//! ([`crate::fold`]) on a task of its own, on another core. Only completion
//! rows are written as they come; every other row is written once, at the
//! end, in key order ([`ReadStore::load_final`]), both projections at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use tracker_store::{EventStore, Position, RawEvents, ReadAll, StoreError};

use crate::fold::Fold;
use crate::model::Completion;
use crate::plan::ProjectionKind;
use crate::readstore::{DeadLetter, FinalLoad, ReadStore, ReadStoreError};
use crate::runner::OnError;

/// Events per slice read while rebuilding.
pub const REPLAY_BATCH: usize = 10_000;

/// Where a rebuild stands, for a progress bar or log lines.
#[derive(Debug, Clone, Copy)]
pub struct ReplayProgress {
    /// Every projection has folded the log up to here (and, at the end,
    /// written it).
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
    /// Under `on_error = "stop"`, an event no projection can read: the
    /// rebuild is not switched to (the live projectors halt before it too).
    #[error(
        "the rebuild stopped at position {position}: {error} (--on-error stop); \
         the current read models are unchanged"
    )]
    Halted { position: Position, error: String },
}

/// One decoded slice of the log.
struct Slice {
    /// Shared by the folds and the writing of the completion rows.
    completions: Arc<[Completion]>,
    /// (position, event id, event type, error) of events that did not decode.
    undecodable: Vec<(Position, uuid::Uuid, String, String)>,
    through: Position,
}

/// What a projection's fold task receives: the slices, then `End` once the
/// whole log was read. A channel closed without `End` means the rebuild
/// failed elsewhere: nothing is finalised.
enum Step {
    Slice(Arc<Slice>),
    End,
}

/// Rebuilds every projection into a new generation and switches to it.
/// Returns the new generation's name.
pub async fn replay(
    events: Arc<dyn EventStore>,
    read: &dyn ReadStore,
    progress: impl Fn(ReplayProgress) + Send + Sync + 'static,
) -> Result<String, ReplayError> {
    replay_with(events, read, OnError::DeadLetter, progress).await
}

/// [`replay`], with what to do with an event that cannot be read: record it
/// in the dead letters and go on, or stop before it without switching.
pub async fn replay_with(
    events: Arc<dyn EventStore>,
    read: &dyn ReadStore,
    on_error: OnError,
    progress: impl Fn(ReplayProgress) + Send + Sync + 'static,
) -> Result<String, ReplayError> {
    let target: Arc<dyn ReadStore> = Arc::from(read.create_generation().await?);
    let generation = target.generation();
    tracing::info!(%generation, "rebuilding read models");
    let mut head = events.head().await?;

    let (tx, mut rx) = mpsc::channel::<Result<Slice, ReplayError>>(2);
    let reader = tokio::spawn(read_slices(Arc::clone(&events), tx));
    let mut steps = Vec::new();
    let mut folds = Vec::new();
    let folded: Arc<Vec<AtomicU64>> = Arc::new(
        ProjectionKind::ALL
            .iter()
            .map(|_| AtomicU64::new(0))
            .collect(),
    );
    for (i, kind) in ProjectionKind::ALL.into_iter().enumerate() {
        let (step_tx, step_rx) = mpsc::channel::<Step>(2);
        steps.push(step_tx);
        folds.push(tokio::spawn(fold_projection(
            kind,
            Arc::clone(&target),
            step_rx,
            Arc::clone(&folded),
            i,
        )));
    }

    let mut outcome: Result<(), ReplayError> = Ok(());
    // A fold that stopped (its error is reported when it is joined): the
    // others must not finalise.
    let mut aborted = false;
    'read: while let Some(slice) = rx.recv().await {
        let slice = match slice {
            Ok(slice) => Arc::new(slice),
            Err(e) => {
                outcome = Err(e);
                break;
            }
        };
        if on_error == OnError::Stop
            && let Some((position, _, _, error)) = slice.undecodable.first()
        {
            outcome = Err(ReplayError::Halted {
                position: *position,
                error: error.clone(),
            });
            break;
        }
        head = head.max(slice.through);
        for step in &steps {
            if step.send(Step::Slice(Arc::clone(&slice))).await.is_err() {
                aborted = true;
                break 'read;
            }
        }
        let done = folded
            .iter()
            .map(|f| f.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        progress(ReplayProgress { done, head });
    }
    if outcome.is_ok() && !aborted {
        for step in &steps {
            // A failed fold reports its own error below.
            let _ = step.send(Step::End).await;
        }
    }
    drop(steps);
    drop(rx);
    let read_result = reader.await.map_err(|e| ReplayError::Task(e.to_string()));
    let mut through = 0;
    for fold in folds {
        let result = fold
            .await
            .map_err(|e| ReplayError::Task(e.to_string()))
            .and_then(|r| r);
        match result {
            Ok(t) => through = through.max(t),
            Err(e) if outcome.is_ok() => outcome = Err(e),
            Err(_) => {}
        }
    }
    outcome?;
    read_result?;
    progress(ReplayProgress {
        done: through,
        head: head.max(through),
    });
    target.seal().await?;
    read.switch_to(&generation).await?;
    tracing::info!(%generation, "rebuilt read models are now current");
    Ok(generation)
}

/// Folds one projection's slices and writes its completion rows as they
/// come; at `End`, writes everything else. Returns the position it wrote
/// the checkpoint at (0 for an empty log, which writes nothing).
async fn fold_projection(
    kind: ProjectionKind,
    target: Arc<dyn ReadStore>,
    mut steps: mpsc::Receiver<Step>,
    folded: Arc<Vec<AtomicU64>>,
    slot: usize,
) -> Result<Position, ReplayError> {
    let mut fold = Fold::new(kind);
    let mut dead_letters = Vec::new();
    let mut through = 0;
    loop {
        let slice = match steps.recv().await {
            Some(Step::Slice(slice)) => slice,
            Some(Step::End) => break,
            // The rebuild failed elsewhere.
            None => return Ok(0),
        };
        through = slice.through;
        dead_letters.extend(
            slice
                .undecodable
                .iter()
                .map(|(position, id, event_type, error)| DeadLetter {
                    projection: kind.name().to_owned(),
                    position: *position,
                    event_id: *id,
                    event_type: event_type.clone(),
                    error: error.clone(),
                    recorded_at: chrono::Utc::now(),
                }),
        );
        // The rows of this slice are written while it is folded.
        let rows = (fold.writes_rows() && !slice.completions.is_empty())
            .then(|| Arc::clone(&slice.completions));
        let folding = tokio::task::spawn_blocking(move || {
            fold.add(&slice.completions);
            fold
        });
        let writing = async {
            match rows {
                Some(rows) => target.load_completions(rows).await,
                None => Ok(()),
            }
        };
        let (folded_fold, written) = tokio::join!(folding, writing);
        fold = folded_fold.map_err(|e| ReplayError::Task(e.to_string()))?;
        written?;
        if let Some(f) = folded.get(slot) {
            f.store(through, Ordering::Relaxed);
        }
    }
    if through == 0 {
        return Ok(0);
    }
    let (plan, membership) = tokio::task::spawn_blocking(move || fold.finish())
        .await
        .map_err(|e| ReplayError::Task(e.to_string()))?;
    target
        .load_final(FinalLoad {
            projection: kind,
            plan,
            membership,
            dead_letters,
            through,
        })
        .await?;
    Ok(through)
}

/// Reads the whole log (until a read finds nothing new) and decodes it. The
/// log is read in its stored form: a rebuild needs only a completion's
/// type, version and data, not a `String` of every other field.
async fn read_slices(events: Arc<dyn EventStore>, tx: mpsc::Sender<Result<Slice, ReplayError>>) {
    let mut next = 1;
    let mut raw = RawEvents::default();
    loop {
        let read = ReadAll {
            from: next,
            limit: REPLAY_BATCH,
        };
        raw = match events.read_all_raw(read, raw).await {
            Ok(raw) => raw,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let Some(through) = raw.last_position() else {
            return;
        };
        let slice = decode_slice(&raw, through);
        let damaged = slice.is_err();
        if tx.send(slice).await.is_err() || damaged {
            return;
        }
        next = through + 1;
    }
}

fn decode_slice(raw: &RawEvents, through: Position) -> Result<Slice, ReplayError> {
    let mut completions = Vec::with_capacity(raw.len());
    let mut undecodable = Vec::new();
    for event in raw.iter().filter(|e| Completion::wants_type(e.event_type)) {
        // Stored text that is not UTF-8 is a damaged log, as on the
        // decoded reads; not an event to set aside.
        let data = std::str::from_utf8(event.data).map_err(|e| StoreError::Corrupt {
            position: event.position,
            reason: format!("data is not UTF-8: {e}"),
        })?;
        match Completion::decode_data(event.position, event.id, event.schema_version, data) {
            Ok(c) => completions.push(c),
            Err(e) => undecodable.push((
                event.position,
                event.id,
                String::from_utf8_lossy(event.event_type).into_owned(),
                e.0,
            )),
        }
    }
    Ok(Slice {
        completions: Arc::from(completions),
        undecodable,
        through,
    })
}
