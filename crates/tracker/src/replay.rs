//! `tracker replay`: the rebuild with a progress bar on a terminal (events
//! done, rate, ETA) and plain log lines otherwise.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tracker_projections::ReadStore;
use tracker_projections::replay::{ReplayError, ReplayProgress, replay_with};
use tracker_projections::runner::OnError;
use tracker_store::EventStore;

/// Rebuilds every read model and switches to them; returns the generation.
/// Under `OnError::Stop` an event that cannot be read ends the rebuild
/// before the switch.
pub async fn run(
    events: Arc<dyn EventStore>,
    read: &dyn ReadStore,
    on_error: OnError,
) -> Result<String, ReplayError> {
    let head = events.head().await?;
    if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(head);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} rebuilding [{bar:40}] {pos}/{len} events  {per_sec}  ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        let shown = bar.clone();
        let generation = replay_with(events, read, on_error, move |p: ReplayProgress| {
            shown.set_length(p.head.max(p.done));
            shown.set_position(p.done);
        })
        .await;
        bar.finish_and_clear();
        generation
    } else {
        let started = Instant::now();
        let last_line = Mutex::new(Instant::now());
        replay_with(events, read, on_error, move |p: ReplayProgress| {
            let Ok(mut last) = last_line.lock() else {
                return;
            };
            if last.elapsed() < Duration::from_secs(2) && p.done < p.head {
                return;
            }
            *last = Instant::now();
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let rate = p.done as f64 / secs;
            let eta = if rate > 0.0 {
                p.head.saturating_sub(p.done) as f64 / rate
            } else {
                0.0
            };
            tracing::info!(
                done = p.done,
                head = p.head,
                rate = format!("{rate:.0}/s"),
                eta = format!("{eta:.0}s"),
                "rebuilding read models"
            );
        })
        .await
    }
}
