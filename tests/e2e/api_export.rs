//! A large NDJSON export streams chunk by chunk: a reader that stops
//! reading holds the export back (what it holds does not grow with the range),
//! and reading on yields every event of the range once, in order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use tracker::server::StartOptions;

use crate::support::*;

const EVENTS: u64 = 50_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_export_is_held_back_by_a_reader_that_stops() {
    let app = TestApp::spawn_with_options(
        |c| c.api_keys = api_keys(),
        StartOptions {
            handle_signals: false,
            workers: Some(2),
            // Only the event log is read here.
            projector: false,
        },
    )
    .await;
    // Straight into the running tracker's store, as the receiver would
    // append them (concurrently, so group commit keeps it quick).
    let store = Arc::clone(&app.running().state().store);
    let zone = tracker_domain::SourceTimeZone::default();
    let mut tasks = Vec::new();
    for chunk in 0..EVENTS / 1000 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for i in chunk * 1000..(chunk + 1) * 1000 {
                // Institution 100 and, every fifth, institution 10.
                let institution = if i % 5 == 4 { 10 } else { 100 };
                let body = completion(
                    institution,
                    1 + i % 997,
                    1 + i % 13,
                    &format!(
                        "2024-01-01 {:02}:{:02}:{:02}",
                        (i / 3600) % 24,
                        (i / 60) % 60,
                        i % 60
                    ),
                );
                let parsed = tracker_domain::parse_delivery(body.as_bytes(), &zone).unwrap();
                let event = tracker_store::NewEvent {
                    id: uuid::Uuid::from_u128(u128::from(i) + 1),
                    event_type: parsed.event_type().to_owned(),
                    schema_version: parsed.schema_version(),
                    data: parsed.event_data(&zone).unwrap(),
                    metadata: tracker_store::EventMetadata {
                        received_at: chrono::Utc::now(),
                        source_id: "seed".into(),
                        request_id: format!("seed-{i}"),
                        content_hash: parsed.content_hash.clone(),
                    },
                };
                store
                    .append(
                        &parsed.stream(),
                        tracker_store::ExpectedRevision::Any,
                        vec![event],
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.head().await.unwrap(), EVENTS);
    let expected = EVENTS - EVENTS / 5;

    let exported = || app.running().api().exported_events();
    let res = app.ndjson("/v1/institutions/100/events", KEY_100).await;
    assert_eq!(res.status().as_u16(), 200);
    let mut body = res.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    let at_first_bytes = exported();
    assert!(
        at_first_bytes < expected,
        "the whole range ({at_first_bytes} events) was produced before the first bytes were sent"
    );
    // Stop reading: once the socket's buffers are full the export must
    // stop too, far from the end of the range.
    let mut stalled = exported();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = exported();
        if now == stalled {
            break;
        }
        stalled = now;
        assert!(Instant::now() < deadline, "the export never stalls");
    }
    eprintln!(
        "export: {at_first_bytes} events at the first bytes, stalled at {stalled} of {expected}"
    );
    assert!(
        stalled < expected,
        "the export ran to the end ({stalled} events) while nobody read it"
    );

    // Reading on yields every event of institution 100 once, in order.
    let mut pending = first.to_vec();
    let mut next_position = 0u64;
    let mut lines = 0u64;
    let mut consume = |pending: &mut Vec<u8>| {
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let event: serde_json::Value = serde_json::from_slice(&line[..line.len() - 1]).unwrap();
            let position = event["position"].as_u64().unwrap();
            assert!(
                position > next_position,
                "out of order or repeated: {position}"
            );
            assert_eq!(event["data"]["institution_id"], 100);
            assert!(
                event["stream"]
                    .as_str()
                    .unwrap()
                    .starts_with("learner-100-")
            );
            next_position = position;
            lines += 1;
        }
    };
    consume(&mut pending);
    while let Some(chunk) = body.next().await {
        pending.extend_from_slice(&chunk.unwrap());
        consume(&mut pending);
    }
    assert!(pending.is_empty(), "the last line is cut");
    assert_eq!(lines, expected);
    assert_eq!(exported(), expected);
    app.stop().await;
}
