//! Durable appends per second through the embedded store alone (no HTTP):
//! `cargo run --release -p tracker-store --example append_throughput -- 200000 256`
//! (events, concurrent writers; then, optionally, the checkpoint interval in
//! milliseconds and the WAL size in pages past which it starts over).
//! Separates the store's share of the ingest cost from the HTTP layer's; on
//! Linux it also prints the bytes written and read calls per append.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use tracker_store::sqlite::{SqliteEventStore, SqliteOptions};
use tracker_store::{EventMetadata, EventStore, ExpectedRevision, NewEvent};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let events: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let writers: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let mut options = SqliteOptions::default();
    if let Some(ms) = args.next().and_then(|a| a.parse().ok()) {
        options.checkpoint_interval = std::time::Duration::from_millis(ms);
    }
    if let Some(frames) = args.next().and_then(|a| a.parse().ok()) {
        options.wal_restart_frames = frames;
    }
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(SqliteEventStore::open_with(dir.path().join("events.sqlite"), options).unwrap());
    let payload = format!("{{\"delivery\":\"{}\"}}", "x".repeat(1300));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, payload) = (Arc::clone(&store), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = w;
            while n < events {
                let event = NewEvent {
                    id: uuid::Uuid::new_v4(),
                    event_type: "TrailCompleted".into(),
                    schema_version: 1,
                    data: payload.clone(),
                    metadata: EventMetadata {
                        received_at: chrono::Utc::now(),
                        source_id: "bench".into(),
                        request_id: n.to_string(),
                        content_hash: "sha256:0".into(),
                    },
                };
                let stream = format!("learner-{}-{}", n % 2000, n % 250_000);
                let sent = Instant::now();
                store
                    .append(&stream, ExpectedRevision::Any, vec![event])
                    .await
                    .unwrap();
                latencies.push(sent.elapsed());
                n += writers;
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let stats = store.commit_stats();
    println!(
        "{events} appends in {secs:.2}s: {:.0}/s, {} groups ({:.1} appends per commit), latency p50 {:?} p99 {:?} max {:?}",
        events as f64 / secs,
        stats.groups,
        stats.appends as f64 / stats.groups.max(1) as f64,
        at(0.5),
        at(0.99),
        latencies[latencies.len() - 1],
    );
    // What the writer costs the kernel: bytes sent to the disk and page
    // reads (a page cache too small for the indexes reads them again).
    if let Ok(io) = std::fs::read_to_string("/proc/self/io") {
        let field = |name: &str| {
            io.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        println!(
            "per append: {:.0} bytes written, {:.2} read calls",
            field("write_bytes:") / events as f64,
            field("syscr:") / events as f64,
        );
    }
}
