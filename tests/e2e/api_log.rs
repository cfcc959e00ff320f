//! The whole event log over the query API (`GET /v1/events`), for
//! operators: every event exactly as recorded, in position order, as pages
//! or one NDJSON stream held back by a reader that stops, and resumable.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::{Value, json};
use tracker::server::StartOptions;

use crate::support::*;

/// A tracker with a small, varied log: several institutions, a learner
/// stream and an institution stream, a pretty-printed delivery (line
/// breaks in `data`), accents and quotes.
async fn varied_app() -> TestApp {
    let app = TestApp::spawn_with_options(
        |c| c.api_keys = api_keys(),
        StartOptions {
            handle_signals: false,
            workers: Some(2),
            projector: false,
        },
    )
    .await;
    let no_user = json!({
        "event": {"name": "Aviso \"geral\"", "slug": "activities.notice.sent", "send_at": "2024-01-02 10:00:00"},
        "data": {"institution": {"id": 100}}
    })
    .to_string();
    let bodies = [
        completion(100, 1, 10, "2024-01-01 09:00:00"),
        MULTI.to_owned(),
        completion(10, 9, 10, "2024-01-05 12:00:00"),
        no_user,
        DOCUMENTED.to_owned(),
        completion(100, 2, 11, "2024-01-03 08:00:00"),
        OTHER_SLUG.to_owned(),
        completion(100, 1, 12, "2024-01-04 08:00:00"),
    ];
    for (i, body) in bodies.iter().enumerate() {
        let (status, answer) = app.post(TOKEN, body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["position"], i as u64 + 1);
    }
    app
}

/// What a page's item for `e` serializes to, on one line: the export's
/// line for it, byte for byte.
fn expected_line(e: &tracker_store::RecordedEvent) -> String {
    let event = tracker::api::dto::Event::try_from(e.clone()).unwrap();
    let text = serde_json::to_string(&event).unwrap();
    format!("{}\n", text.replace(['\n', '\r'], " "))
}

async fn ndjson(app: &TestApp, path: &str, key: &str) -> (u16, String) {
    let (status, headers, body) = app
        .api_get(path, Some(key), Some("application/x-ndjson"))
        .await;
    if status == 200 {
        assert_eq!(headers["content-type"], "application/x-ndjson", "{path}");
    }
    (status, body)
}

fn positions(ndjson: &str) -> Vec<u64> {
    ndjson
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["position"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_log_is_every_event_exactly_as_recorded() {
    let app = varied_app().await;
    let events = app.events().await;
    assert_eq!(events.len(), 8);
    assert!(
        events.iter().any(|e| e.data.contains('\n')),
        "a delivery with line breaks is in the log"
    );
    assert!(events.iter().any(|e| e.stream == "institution-100"));

    // NDJSON: one line per event, in position order, each byte for byte
    // what the page item of the event serializes to.
    let (status, body) = ndjson(&app, "/v1/events", OPERATOR_KEY).await;
    assert_eq!(status, 200, "{body}");
    let expected: String = events.iter().map(expected_line).collect();
    assert_eq!(body, expected);
    // And what was recorded is what comes out: data, times, metadata.
    for (line, e) in body.lines().zip(&events) {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["position"], e.position);
        assert_eq!(v["event_id"], e.id.to_string());
        assert_eq!(v["stream"], e.stream);
        assert_eq!(v["revision"], e.revision);
        assert_eq!(v["type"], e.event_type);
        assert_eq!(v["schema_version"], e.schema_version);
        let received: chrono::DateTime<chrono::Utc> =
            v["received_at"].as_str().unwrap().parse().unwrap();
        assert_eq!(received, e.metadata.received_at);
        assert_eq!(v["source_id"], e.metadata.source_id);
        assert_eq!(v["request_id"], e.metadata.request_id);
        assert_eq!(v["content_hash"], e.metadata.content_hash);
        assert_eq!(v["data"], serde_json::from_str::<Value>(&e.data).unwrap());
    }

    // The JSON pages hold the same events as the same objects.
    let mut from_pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/events?limit=3&cursor={c}"),
            None => "/v1/events?limit=3".to_owned(),
        };
        let (status, _, page) = app.api_json(&path, OPERATOR_KEY).await;
        assert_eq!(status, 200, "{page}");
        from_pages.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(from_pages, lines);

    // CSV: a header and one record per event.
    let (status, headers, csv) = app
        .api_get(
            "/v1/events?limit=1000",
            Some(OPERATOR_KEY),
            Some("text/csv"),
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(records.len(), events.len());
    assert_eq!(&records[1][0], "2");
    assert_eq!(&records[1][10], events[1].data.as_str());

    // One institution's export is the whole log's lines of its streams, the
    // same bytes: one parser reads both.
    let (status, inst) = ndjson(&app, "/v1/institutions/100/events", KEY_100).await;
    assert_eq!(status, 200);
    let of_100: String = body
        .lines()
        .filter(|l| {
            let stream = serde_json::from_str::<Value>(l).unwrap()["stream"]
                .as_str()
                .unwrap()
                .to_owned();
            stream.starts_with("learner-100-") || stream == "institution-100"
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(positions(&inst), [1, 4, 6, 8]);
    assert_eq!(inst, of_100);
    // A learner's stream too.
    let (status, learner) = ndjson(&app, "/v1/institutions/100/learners/1/events", KEY_100).await;
    assert_eq!(status, 200);
    assert_eq!(
        learner,
        format!("{}{}", expected_line(&events[0]), expected_line(&events[7]))
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_key_for_every_institution_reads_the_whole_log() {
    let app = varied_app().await;
    for accept in [None, Some("application/x-ndjson"), Some("text/csv")] {
        let (status, headers, body) = app.api_get("/v1/events", None, accept).await;
        assert_eq!(status, 401, "{body}");
        assert!(headers.contains_key("www-authenticate"));
        let (status, _, _) = app
            .api_get("/v1/events", Some("not-a-key-0123456789"), accept)
            .await;
        assert_eq!(status, 401);
        for key in [KEY_100, KEY_10] {
            // Refused before anything else is looked at, parameters included.
            for path in ["/v1/events", "/v1/events?limit=0", "/v1/events?bogus=1"] {
                let (status, _, body) = app.api_get(path, Some(key), accept).await;
                assert_eq!(status, 403, "{path}: {body}");
                let body: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(body["error"]["code"], "operator_key_required", "{body}");
            }
        }
    }
    let (status, _, _) = app
        .api_get(
            "/v1/events",
            Some(OPERATOR_KEY),
            Some("application/x-ndjson"),
        )
        .await;
    assert_eq!(status, 200);
    // Other methods are refused like everywhere else in the API.
    let res = app
        .client
        .post(app.url("/v1/events"))
        .bearer_auth(OPERATOR_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 405);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_resumes_from_a_cursor_or_a_position() {
    let app = varied_app().await;
    let (_, all) = ndjson(&app, "/v1/events", OPERATOR_KEY).await;
    let lines: Vec<&str> = all.lines().collect();
    let tail = |from: usize| -> String { lines[from..].iter().map(|l| format!("{l}\n")).collect() };

    // A page's cursor resumes the stream right after that page.
    let (_, _, page) = app.api_json("/v1/events?limit=3", OPERATOR_KEY).await;
    let cursor = page["next_cursor"].as_str().unwrap();
    let (status, rest) = ndjson(&app, &format!("/v1/events?cursor={cursor}"), OPERATOR_KEY).await;
    assert_eq!(status, 200);
    assert_eq!(rest, tail(3));

    // Positions: both ends inclusive; beyond the head is just the end.
    let (_, range) = ndjson(
        &app,
        "/v1/events?from_position=4&to_position=6",
        OPERATOR_KEY,
    )
    .await;
    assert_eq!(positions(&range), [4, 5, 6]);
    assert_eq!(
        range,
        lines[3..6]
            .iter()
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    );
    let (_, beyond) = ndjson(
        &app,
        "/v1/events?from_position=7&to_position=99",
        OPERATOR_KEY,
    )
    .await;
    assert_eq!(positions(&beyond), [7, 8]);
    let (status, empty) = ndjson(&app, "/v1/events?from_position=9", OPERATOR_KEY).await;
    assert_eq!((status, empty.as_str()), (200, ""));

    // Received-time filters: `to` exclusive.
    let events = app.events().await;
    let t3 = events[2]
        .metadata
        .received_at
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let t6 = events[5]
        .metadata
        .received_at
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let (status, by_time) =
        ndjson(&app, &format!("/v1/events?from={t3}&to={t6}"), OPERATOR_KEY).await;
    assert_eq!(status, 200);
    assert_eq!(positions(&by_time), [3, 4, 5]);

    // A cursor past every position the log can hold is the end, on both
    // lists whose cursor is a position, as a page and as a stream.
    use tracker::api::params::{CursorKey, CursorScope, encode_cursor};
    for (list, path) in [
        ("events", "/v1/events"),
        ("events/100", "/v1/institutions/100/events"),
    ] {
        let last = encode_cursor(
            &CursorScope::new(list, "position"),
            CursorKey::Position { p: u64::MAX },
        );
        let (status, _, page) = app
            .api_json(&format!("{path}?limit=3&cursor={last}"), OPERATOR_KEY)
            .await;
        assert_eq!(status, 200, "{path}: {page}");
        assert_eq!(page["items"], serde_json::json!([]), "{path}: {page}");
        let (status, rest) = ndjson(&app, &format!("{path}?cursor={last}"), OPERATOR_KEY).await;
        assert_eq!((status, rest.as_str()), (200, ""), "{path}");
    }

    // A cursor of another list is refused, naming it.
    let (_, _, inst_page) = app
        .api_json("/v1/institutions/100/events?limit=1", OPERATOR_KEY)
        .await;
    let foreign = inst_page["next_cursor"].as_str().unwrap();
    let (status, _, body) = app
        .api_json(&format!("/v1/events?cursor={foreign}"), OPERATOR_KEY)
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["field"], "cursor");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_refused_naming_the_field() {
    let app = varied_app().await;
    for (query, field, code) in [
        ("limit=0", "limit", "invalid_parameter"),
        ("limit=1001", "limit", "invalid_parameter"),
        ("from_position=abc", "from_position", "invalid_parameter"),
        ("to_position=-1", "to_position", "invalid_parameter"),
        (
            "from_position=5&to_position=2",
            "from_position",
            "invalid_range",
        ),
        ("from=yesterday", "from", "invalid_parameter"),
        (
            "from=2024-02-01T00:00:00Z&to=2024-01-01T00:00:00Z",
            "from",
            "invalid_range",
        ),
        ("cursor=!!", "cursor", "invalid_cursor"),
        ("cursor=bm90LWEtY3Vyc29y", "cursor", "invalid_cursor"),
        ("institution_id=100", "institution_id", "unknown_parameter"),
        ("limit=1&limit=2", "limit", "invalid_parameter"),
    ] {
        for accept in [None, Some("application/x-ndjson"), Some("text/csv")] {
            let (status, _, body) = app
                .api_get(&format!("/v1/events?{query}"), Some(OPERATOR_KEY), accept)
                .await;
            assert_eq!(status, 400, "{query} {accept:?}: {body}");
            let body: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["error"]["field"], field, "{query}: {body}");
            assert_eq!(body["error"]["code"], code, "{query}: {body}");
        }
    }
    app.stop().await;
}

const EVENTS: u64 = 50_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_log_export_is_held_back_by_a_reader_that_stops() {
    // 50,000 events of 50 institutions, appended before the tracker starts.
    let seeded = tempfile::tempdir().unwrap();
    let bodies = (0..EVENTS)
        .map(|i| {
            completion(
                1 + i % 50,
                1 + i % 997,
                1 + i % 13,
                &format!(
                    "2024-01-01 {:02}:{:02}:{:02}",
                    (i / 3600) % 24,
                    (i / 60) % 60,
                    i % 60
                ),
            )
        })
        .collect();
    let head = seed_events(seeded.path(), bodies).await;
    assert_eq!(head, EVENTS);
    let data_dir = seeded.path().to_path_buf();
    let app = TestApp::spawn_with_options(
        |c| {
            c.api_keys = api_keys();
            c.data_dir = data_dir;
        },
        StartOptions {
            handle_signals: false,
            workers: Some(2),
            projector: false,
        },
    )
    .await;

    let exported = || app.running().api().exported_events();
    let res = app.ndjson("/v1/events", OPERATOR_KEY).await;
    assert_eq!(res.status().as_u16(), 200);
    let mut body = res.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    // Stop reading: once the socket's buffers and the export's one queued
    // chunk are full, the reading of the log must stop too, far from the
    // end.
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
    eprintln!("whole-log export stalled at {stalled} of {EVENTS} events");
    assert!(
        stalled < EVENTS / 2,
        "the export read {stalled} of {EVENTS} events while nobody read it"
    );

    // Reading on yields every event once, in position order.
    let mut pending = first.to_vec();
    let mut next = 1u64;
    let mut institutions = BTreeSet::new();
    let mut consume = |pending: &mut Vec<u8>| {
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let event: Value = serde_json::from_slice(&line[..line.len() - 1]).unwrap();
            assert_eq!(event["position"], next, "out of order, missing or repeated");
            institutions.insert(event["data"]["institution_id"].as_u64().unwrap());
            next += 1;
        }
    };
    consume(&mut pending);
    while let Some(chunk) = body.next().await {
        pending.extend_from_slice(&chunk.unwrap());
        consume(&mut pending);
    }
    assert!(pending.is_empty(), "the last line is cut");
    assert_eq!(next - 1, EVENTS);
    assert_eq!(institutions.len(), 50);
    assert_eq!(exported(), EVENTS);

    // A client that goes away mid-export stops it.
    let before = exported();
    let res = app.ndjson("/v1/events", OPERATOR_KEY).await;
    let mut body = res.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after_drop = exported() - before;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(exported() - before, after_drop, "the export went on alone");
    assert!(after_drop < EVENTS / 2, "{after_drop}");
    app.stop().await;
}

/// A damaged log (here a position missing: a row deleted behind the
/// store's back) is the server's failure, naming the position: a 500 to
/// stop on, not a 503 to retry for ever. What lies before it still reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_is_a_server_error_naming_the_position() {
    let app = varied_app().await;
    let conn = rusqlite::Connection::open(app.dir.path().join("events.sqlite")).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch("DROP TRIGGER events_no_delete; DELETE FROM events WHERE position = 3;")
        .unwrap();

    let (status, _, body) = app.api_get("/v1/events", Some(OPERATOR_KEY), None).await;
    assert_eq!(status, 500, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], "damaged_log", "{body}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("position 4"), "{message}");

    let (status, _, body) = app
        .api_get("/v1/events?limit=2", Some(OPERATOR_KEY), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "{body}");
}

/// A row whose `data` is not JSON is damage too: JSON and CSV pages answer
/// 500 `damaged_log` naming its position, and the NDJSON export ends before
/// it, cut short (no final chunk), so a client cannot take it for whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_data_column_is_damage_naming_its_position() {
    let app = varied_app().await;
    let conn = rusqlite::Connection::open(app.dir.path().join("events.sqlite")).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch(
        "DROP TRIGGER events_no_update; UPDATE events SET data = 'not json' WHERE position = 3;",
    )
    .unwrap();

    for accept in ["application/json", "text/csv"] {
        let (status, _, body) = app
            .api_get("/v1/events", Some(OPERATOR_KEY), Some(accept))
            .await;
        assert_eq!(status, 500, "{accept}: {body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["error"]["code"], "damaged_log", "{body}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("position 3"), "{message}");
    }

    let res = app.ndjson("/v1/events", OPERATOR_KEY).await;
    assert_eq!(res.status().as_u16(), 200);
    let mut body = res.bytes_stream();
    let mut received = Vec::new();
    let mut cut_short = false;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => received.extend_from_slice(&bytes),
            Err(_) => {
                cut_short = true;
                break;
            }
        }
    }
    assert!(cut_short, "the export ended as if whole");
    let positions: Vec<u64> = received
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            serde_json::from_slice::<Value>(line).unwrap()["position"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(positions, [1, 2]);
}
