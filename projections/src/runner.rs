//! The projection runner: reads the log from a checkpoint, batches, applies,
//! retries, and follows the live log. While behind it reads `batch_size`
//! events per read and applies each read in one transaction (a catch-up, or
//! a burst larger than the projection keeps up with, costs one commit per
//! `batch_size` events); once a read comes back short it follows the
//! subscription and applies whatever arrived since the last batch. A projection only says what it wants
//! ([`Completion::EVENT_TYPES`]) and how to apply a batch (the read store's
//! `apply`, driven by [`crate::plan`]).
//!
//! Delivery is at least once (after a crash the runner re-reads from the
//! last checkpoint); the effect is exactly once because the checkpoint is
//! written in the same transaction as the rows and `apply` skips anything at
//! or below it.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::watch;
use tracker_store::{EventStore, Position, ReadAll, RecordedEvent};

use crate::decode::SharedDecode;
use crate::plan::ProjectionKind;
use crate::readstore::{
    ApplyBatch, CheckpointKey, DeadLetter, LeaseHolder, Partition, ReadStore, ReadStoreError,
};

/// A live batch at least this large (or `batch_size`, if smaller) means the
/// log is ahead of the projection: it goes back to reading whole batches.
const FALLING_BEHIND: usize = 256;

/// What to do with an event that cannot be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Record it in the dead letters and go on (the default).
    #[default]
    DeadLetter,
    /// Stop the projection before the event, so it can be fixed first.
    Stop,
}

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub partition: Partition,
    /// Most events in one transaction.
    pub batch_size: usize,
    pub on_error: OnError,
    /// `Some`: hold a lease on the checkpoint key, so two projectors of the
    /// same partition never write at once (the second waits).
    pub lease: Option<(LeaseHolder, Duration)>,
    /// Where events are decoded: give the runners of one process the same
    /// [`SharedDecode`] so each event is decoded once, not once per runner.
    pub decode: Arc<SharedDecode>,
    /// Counted up after every batch committed, so that a reader of this
    /// process waiting for a position (`min_position`) looks again at once.
    pub applied: Arc<watch::Sender<u64>>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            partition: Partition::WHOLE,
            batch_size: 5_000,
            on_error: OnError::DeadLetter,
            lease: Some((LeaseHolder::new_random(), Duration::from_secs(15))),
            decode: Arc::new(SharedDecode::new(1, 0)),
            applied: Arc::new(watch::Sender::new(0)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(
        "projection {key} cannot start: {other} has projected further ({other_position} > {position}) \
         under another partition scheme; run `tracker replay` after changing --partition"
    )]
    PartitionSchemeChanged {
        key: String,
        position: Position,
        other: String,
        other_position: Position,
    },
    #[error("projection {key} stopped at position {position}: {error} (--on-error stop)")]
    Halted {
        key: String,
        position: Position,
        error: String,
    },
    /// The runner's task ended without an answer (it panicked or was
    /// cancelled): the projection no longer advances in this process.
    #[error("projection {key} failed: {error}")]
    Failed { key: String, error: String },
}

/// One projection (one checkpoint key) kept up to date.
#[derive(Debug)]
pub struct Runner {
    events: Arc<dyn EventStore>,
    read: Arc<dyn ReadStore>,
    key: CheckpointKey,
    config: RunnerConfig,
    /// When the lease was last taken or renewed (every applied batch renews
    /// it in its own transaction).
    lease_renewed: std::sync::Mutex<std::time::Instant>,
}

/// How a followed subscription came to an end.
enum Ended {
    /// It ended: the store was shut down.
    Closed,
    Failed(tracker_store::StoreError),
}

enum Step {
    /// Start over from the stored checkpoint (lease lost, generation changed,
    /// subscription failed).
    Restart,
    Stop,
}

impl Runner {
    pub fn new(
        events: Arc<dyn EventStore>,
        read: Arc<dyn ReadStore>,
        projection: ProjectionKind,
        config: RunnerConfig,
    ) -> Self {
        Self {
            events,
            read,
            key: CheckpointKey {
                projection,
                partition: config.partition,
            },
            config,
            lease_renewed: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    fn mark_lease_renewed(&self) {
        *self
            .lease_renewed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = std::time::Instant::now();
    }

    /// Renews the lease before a batch is written when a third of its time
    /// has passed since it was last renewed: reading and decoding a batch
    /// (or waiting for the other runner's decode) may outlast it, and the
    /// write would then find it expired and start the same batch over, for
    /// ever. False when another projector holds it now.
    async fn lease_still_held(&self) -> bool {
        let Some((_, ttl)) = &self.config.lease else {
            return true;
        };
        let since = self
            .lease_renewed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .elapsed();
        if since < *ttl / 3 {
            return true;
        }
        self.renew_lease().await
    }

    pub fn key(&self) -> CheckpointKey {
        self.key
    }

    fn batch_size(&self) -> usize {
        self.config.batch_size.max(1)
    }

    /// Runs until `shutdown` turns true (returns Ok) or `--on-error stop`
    /// halts it. Store failures are retried with backoff, never fatal.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), RunnerError> {
        let mut backoff = Backoff::default();
        let ended = loop {
            if *shutdown.borrow() {
                break Ok(());
            }
            match self.session(&mut shutdown, &mut backoff).await {
                Ok(Step::Stop) => break Ok(()),
                Ok(Step::Restart) => {}
                Err(e) => break Err(e),
            }
        };
        // Halted or stopped, a standby projector may take over at once
        // rather than wait out the lease.
        if let Some((holder, _)) = &self.config.lease
            && let Err(e) = self.read.release_lease(&self.key.to_string(), holder).await
        {
            tracing::warn!(key = %self.key, error = %e, "could not release lease");
        }
        ended
    }

    /// Takes the lease, then projects from the checkpoint until something
    /// says start over or stop.
    async fn session(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> Result<Step, RunnerError> {
        if let Err(e) = self.read.follow_current().await {
            tracing::warn!(key = %self.key, error = %e, "reading the current generation");
            return Ok(self.pause(shutdown, backoff.next()).await);
        }
        if let Some((holder, ttl)) = &self.config.lease {
            // Workers of another partition scheme would apply the same events
            // to the same rows under other checkpoint keys: never run beside them.
            match self.read.live_leases().await {
                Ok(leases) => {
                    if let Some(other) = leases.iter().find(|l| self.other_scheme(l)) {
                        tracing::warn!(key = %self.key, %other, "a projector with another partition scheme is running; waiting");
                        return Ok(self.pause(shutdown, *ttl / 3).await);
                    }
                }
                Err(e) => {
                    tracing::warn!(key = %self.key, error = %e, "listing leases");
                    return Ok(self.pause(shutdown, backoff.next()).await);
                }
            }
            match self
                .read
                .acquire_lease(&self.key.to_string(), holder, *ttl)
                .await
            {
                Ok(true) => self.mark_lease_renewed(),
                Ok(false) => {
                    tracing::info!(key = %self.key, "another projector holds the lease; waiting");
                    return Ok(self.pause(shutdown, *ttl / 3).await);
                }
                Err(e) => {
                    tracing::warn!(key = %self.key, error = %e, "taking the lease");
                    return Ok(self.pause(shutdown, backoff.next()).await);
                }
            }
        }
        let checkpoint = match self.read.checkpoint(self.key).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(key = %self.key, error = %e, "reading the checkpoint");
                return Ok(self.pause(shutdown, backoff.next()).await);
            }
        };
        match self.read.checkpoints().await {
            Ok(all) => {
                if let Some((other, other_position)) = all
                    .into_iter()
                    .find(|(k, p)| self.other_scheme(k) && *p > checkpoint)
                {
                    return Err(RunnerError::PartitionSchemeChanged {
                        key: self.key.to_string(),
                        position: checkpoint,
                        other,
                        other_position,
                    });
                }
            }
            Err(e) => {
                tracing::warn!(key = %self.key, error = %e, "reading the checkpoints");
                return Ok(self.pause(shutdown, backoff.next()).await);
            }
        }
        tracing::info!(key = %self.key, generation = %self.read.generation(), checkpoint, "projecting");
        let renew_every = self
            .config
            .lease
            .as_ref()
            .map(|(_, ttl)| *ttl / 3)
            .unwrap_or(Duration::from_secs(3600));
        let mut next = checkpoint + 1;
        loop {
            // Behind: read the log in batches of `batch_size`, one
            // transaction each, until a read comes back short.
            loop {
                if *shutdown.borrow() {
                    return Ok(Step::Stop);
                }
                let events = match self
                    .events
                    .read_all(ReadAll {
                        from: next,
                        limit: self.batch_size(),
                    })
                    .await
                {
                    Ok(events) => events,
                    Err(e) => {
                        tracing::warn!(key = %self.key, error = %e, "reading the event log");
                        return Ok(self.pause(shutdown, backoff.next()).await);
                    }
                };
                let full = events.len() >= self.batch_size();
                let after = next - 1;
                if let Some(last) = events.last() {
                    next = last.position + 1;
                }
                if let Err(step) = self.apply_or_step(events, after, shutdown, backoff).await? {
                    return Ok(step);
                }
                if !full {
                    break;
                }
            }
            // Caught up: follow the subscription, applying whatever has
            // arrived since the last batch.
            let mut subscription = self.events.subscribe_all(next);
            loop {
                let first = tokio::select! {
                    _ = shutdown.changed() => return Ok(Step::Stop),
                    item = subscription.next() => item,
                    _ = tokio::time::sleep(renew_every) => {
                        if !self.renew_lease().await || self.generation_moved().await {
                            return Ok(Step::Restart);
                        }
                        continue;
                    }
                };
                let mut events = Vec::with_capacity(64);
                // A subscription that fails yields its error once and ends:
                // what came before it is applied, and the log is read again
                // from there after a pause. One that just ends means the
                // store was shut down (a node drained): the runner stops.
                let mut ended = None;
                match first {
                    None => ended = Some(Ended::Closed),
                    Some(Err(e)) => ended = Some(Ended::Failed(e)),
                    Some(Ok(e)) => events.push(e),
                }
                while ended.is_none() && events.len() < self.batch_size() {
                    match subscription.next().now_or_never() {
                        Some(Some(Ok(e))) => events.push(e),
                        Some(Some(Err(e))) => ended = Some(Ended::Failed(e)),
                        Some(None) => ended = Some(Ended::Closed),
                        None => break,
                    }
                }
                // This many at once means the log is running ahead: go
                // back to reading whole batches.
                let behind = events.len() >= self.batch_size().min(FALLING_BEHIND);
                let after = next - 1;
                if let Some(last) = events.last() {
                    next = last.position + 1;
                }
                if let Err(step) = self.apply_or_step(events, after, shutdown, backoff).await? {
                    return Ok(step);
                }
                match ended {
                    None => {}
                    Some(Ended::Closed) => return Ok(Step::Stop),
                    Some(Ended::Failed(e)) => {
                        tracing::warn!(key = %self.key, next, error = %e, "event subscription failed; reading on after a pause");
                        return Ok(self.pause(shutdown, backoff.next()).await);
                    }
                }
                if behind {
                    break;
                }
            }
        }
    }

    /// Applies a batch; `Ok(Err(step))` when the session must end with
    /// `step` (restart, or a pause before retrying from the checkpoint).
    /// `events` are every event of the log after position `after`.
    async fn apply_or_step(
        &self,
        events: Vec<RecordedEvent>,
        after: Position,
        shutdown: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> Result<Result<(), Step>, RunnerError> {
        let any = !events.is_empty();
        match self.apply(events, after).await {
            Ok(()) => {
                // Only progress resets the backoff: the (usually empty)
                // catch-up read that starts every session is not progress.
                if any {
                    backoff.reset();
                }
                Ok(Ok(()))
            }
            Err(Applied::Restart) => Ok(Err(Step::Restart)),
            Err(Applied::Halt(e)) => Err(e),
            Err(Applied::Retry(e)) => {
                tracing::warn!(key = %self.key, error = %e, "applying a batch failed; retrying from the checkpoint");
                Ok(Err(self.pause(shutdown, backoff.next()).await))
            }
        }
    }

    async fn apply(&self, events: Vec<RecordedEvent>, after: Position) -> Result<(), Applied> {
        let Some(through) = events.last().map(|e| e.position) else {
            return Ok(());
        };
        let decoded = self.config.decode.decode(&events).await;
        let mut completions = Vec::with_capacity(events.len());
        let mut dead_letters = Vec::new();
        let mut halt = None;
        for (event, decoded) in events.iter().zip(decoded) {
            let Some(decoded) = decoded else {
                continue;
            };
            match decoded {
                Ok(c) if self.key.partition.owns(c.institution_id) => completions.push(c),
                Ok(_) => {}
                Err(e) if self.config.on_error == OnError::Stop => {
                    halt = Some((event.position, e.0));
                    break;
                }
                Err(e) => {
                    tracing::error!(key = %self.key, position = event.position, error = %e, "dead letter");
                    dead_letters.push(DeadLetter {
                        projection: self.key.projection.name().to_owned(),
                        position: event.position,
                        event_id: event.id,
                        event_type: event.event_type.clone(),
                        error: e.0,
                        recorded_at: Utc::now(),
                    });
                }
            }
        }
        let through = match &halt {
            Some((position, _)) => position - 1,
            None => through,
        };
        let (events_read, completions_in) = (events.len(), completions.len());
        let batch = ApplyBatch {
            key: self.key,
            after,
            completions,
            dead_letters,
            through,
            lease: self.config.lease.clone(),
        };
        if !self.lease_still_held().await {
            return Err(Applied::Restart);
        }
        let started = std::time::Instant::now();
        match self.read.apply(batch).await {
            Ok(()) => {
                self.mark_lease_renewed();
                self.config.applied.send_modify(|n| *n = n.wrapping_add(1));
                tracing::debug!(key = %self.key, through, events = events_read, completions = completions_in,
                    apply_ms = started.elapsed().as_secs_f64() * 1e3, "batch applied");
            }
            Err(ReadStoreError::LeaseLost(_)) | Err(ReadStoreError::GenerationChanged { .. }) => {
                return Err(Applied::Restart);
            }
            Err(e @ ReadStoreError::Gap { .. }) => {
                tracing::warn!(key = %self.key, error = %e, "starting over from the stored checkpoint");
                return Err(Applied::Restart);
            }
            Err(e) => return Err(Applied::Retry(e)),
        }
        match halt {
            Some((position, error)) => Err(Applied::Halt(RunnerError::Halted {
                key: self.key.to_string(),
                position,
                error,
            })),
            None => Ok(()),
        }
    }

    /// Whether `key` names this projection under another partition count.
    fn other_scheme(&self, key: &str) -> bool {
        CheckpointKey::parse(key).is_some_and(|k| {
            k.projection == self.key.projection && k.partition.count != self.key.partition.count
        })
    }

    async fn renew_lease(&self) -> bool {
        let Some((holder, ttl)) = &self.config.lease else {
            return true;
        };
        match self
            .read
            .acquire_lease(&self.key.to_string(), holder, *ttl)
            .await
        {
            Ok(held) => {
                if held {
                    self.mark_lease_renewed();
                }
                held
            }
            Err(e) => {
                tracing::warn!(key = %self.key, error = %e, "renewing the lease");
                false
            }
        }
    }

    async fn generation_moved(&self) -> bool {
        let before = self.read.generation();
        match self.read.follow_current().await {
            Ok(moved) => {
                if moved {
                    tracing::info!(key = %self.key, from = %before, to = %self.read.generation(), "read models rebuilt; following the new generation");
                }
                moved
            }
            Err(_) => false,
        }
    }

    async fn pause(&self, shutdown: &mut watch::Receiver<bool>, wait: Duration) -> Step {
        tokio::select! {
            _ = shutdown.changed() => Step::Stop,
            _ = tokio::time::sleep(wait) => Step::Restart,
        }
    }
}

enum Applied {
    Restart,
    Retry(ReadStoreError),
    Halt(RunnerError),
}

/// 50 ms doubling to 5 s.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let ms = 50u64.saturating_mul(1 << self.failures.min(7));
        self.failures = self.failures.saturating_add(1);
        Duration::from_millis(ms.min(5_000))
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}
