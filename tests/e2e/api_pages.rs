//! Walking every page of every list: each row exactly once, in the
//! documented order, also while webhooks keep arriving.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::api::trail_done;
use crate::support::*;

/// A deterministic spread of completions over 40 learners, 9 trails and
/// their courses, for institution 100.
fn history(n: u64, offset: u64) -> Vec<String> {
    (offset..offset + n)
        .map(|i| {
            let trail = 1 + (i * 7) % 9;
            let courses: Vec<(u64, String)> = (0..1 + trail % 3)
                .map(|k| {
                    (
                        100 + (trail * 3 + k) % 17,
                        format!("Course {}", (trail * 3 + k) % 17),
                    )
                })
                .collect();
            let courses: Vec<(u64, &str)> =
                courses.iter().map(|(id, t)| (*id, t.as_str())).collect();
            trail_done(
                100,
                1 + (i * 13) % 40,
                trail,
                &format!(
                    "2024-{:02}-{:02} {:02}:{:02}:00",
                    1 + i % 12,
                    1 + (i * 5) % 28,
                    (i * 3) % 24,
                    i % 60
                ),
                &courses,
            )
        })
        .collect()
}

async fn ingest(app: &TestApp, bodies: Vec<String>) -> u64 {
    let mut last = 0;
    for body in bodies {
        let (status, answer) = app.post(TOKEN, &body).await;
        assert_eq!(status, 200, "{answer}");
        last = last.max(answer["position"].as_u64().unwrap());
    }
    last
}

/// Every page of `path` (which has its other parameters), `limit` rows at
/// a time: the rows, in order, and how many pages.
async fn walk(app: &TestApp, path: &str, limit: u32, pause: Duration) -> (Vec<Value>, usize) {
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let url = match &cursor {
            Some(c) => format!("{path}{sep}limit={limit}&cursor={c}"),
            None => format!("{path}{sep}limit={limit}"),
        };
        let (status, _, body) = app.api_json(&url, OPERATOR_KEY).await;
        assert_eq!(status, 200, "{url}: {body}");
        pages += 1;
        let items = body["items"].as_array().unwrap();
        assert!(items.len() <= limit as usize);
        rows.extend(items.iter().cloned());
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(pages < 10_000, "the walk does not end");
        tokio::time::sleep(pause).await;
    }
    (rows, pages)
}

fn key_of(row: &Value, field: &str) -> u64 {
    row[field].as_u64().unwrap()
}

/// The lists, with their id field, and the sorts each offers.
fn lists() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    vec![
        (
            "/v1/institutions/100/trails",
            "trail_id",
            vec!["id", "name", "completions"],
        ),
        (
            "/v1/institutions/100/courses",
            "course_id",
            vec!["id", "title", "completions"],
        ),
        (
            "/v1/institutions/100/learners",
            "user_id",
            vec!["id", "name", "completions"],
        ),
        ("/v1/institutions/100/trails/1/learners", "user_id", vec![]),
        (
            "/v1/institutions/100/completions",
            "position",
            vec!["position", "finished_at"],
        ),
        (
            "/v1/institutions/100/completions?trail_id=1",
            "position",
            vec![],
        ),
        ("/v1/institutions/100/events", "position", vec![]),
        (
            "/v1/institutions/100/learners/14/events",
            "position",
            vec![],
        ),
    ]
}

/// Whether `rows` are in `sort`'s documented order.
fn check_order(rows: &[Value], id: &str, sort: &str, what: &str) {
    for pair in rows.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let ordered = match sort {
            "name" => (a["name"].as_str(), key_of(a, id)) < (b["name"].as_str(), key_of(b, id)),
            "title" => (a["title"].as_str(), key_of(a, id)) < (b["title"].as_str(), key_of(b, id)),
            "completions" => {
                (key_of(a, "completions"), key_of(a, id))
                    > (key_of(b, "completions"), key_of(b, id))
            }
            "finished_at" => {
                (a["finished_at"].as_str(), key_of(a, id))
                    < (b["finished_at"].as_str(), key_of(b, id))
            }
            _ => key_of(a, id) < key_of(b, id),
        };
        assert!(ordered, "{what}: {a} then {b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_list_walks_every_row_exactly_once_in_every_sort() {
    let app = TestApp::spawn_with(|c| c.api_keys = api_keys()).await;
    let head = ingest(&app, history(150, 0)).await;
    let (status, _, _) = app
        .api_json(
            &format!("/v1/institutions/100/learners?min_position={head}&wait_ms=5000"),
            OPERATOR_KEY,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _, _) = app
        .api_json(
            &format!("/v1/institutions/100/summary?min_position={head}&wait_ms=5000"),
            OPERATOR_KEY,
        )
        .await;
    assert_eq!(status, 200);

    for (path, id, sorts) in lists() {
        // The whole list in one page is the reference.
        let (all, pages) = walk(&app, path, 1000, Duration::ZERO).await;
        assert_eq!(pages, 1);
        assert!(all.len() >= 3, "{path}: {}", all.len());
        let expected: HashSet<u64> = all.iter().map(|r| key_of(r, id)).collect();
        assert_eq!(
            expected.len(),
            all.len(),
            "{path}: duplicate ids in one page"
        );
        let mut sorts: Vec<Option<&str>> = sorts.into_iter().map(Some).collect();
        sorts.push(None);
        for sort in sorts {
            let full = match sort {
                Some(s) => format!(
                    "{path}{}sort={s}",
                    if path.contains('?') { '&' } else { '?' }
                ),
                None => path.to_owned(),
            };
            for limit in [1, 2, 7] {
                let (rows, pages) = walk(&app, &full, limit, Duration::ZERO).await;
                let got: Vec<u64> = rows.iter().map(|r| key_of(r, id)).collect();
                let unique: HashSet<u64> = got.iter().copied().collect();
                assert_eq!(unique.len(), got.len(), "{full} by {limit}: a row twice");
                assert_eq!(unique, expected, "{full} by {limit}: rows missing or extra");
                assert!(pages >= got.len().div_ceil(limit as usize), "{full}");
                check_order(&rows, id, sort.unwrap_or("id"), &full);
                // Without a sort, the one-page reference order is the same.
                if sort.is_none() || sort == Some("id") || sort == Some("position") {
                    assert_eq!(rows, all, "{full} by {limit}");
                }
            }
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walks_on_immutable_sorts_stay_exact_while_webhooks_arrive() {
    let app = Arc::new(TestApp::spawn_with(|c| c.api_keys = api_keys()).await);
    let head = ingest(&app, history(120, 0)).await;
    let (status, _, _) = app
        .api_json(
            &format!("/v1/institutions/100/completions?min_position={head}&wait_ms=5000"),
            OPERATOR_KEY,
        )
        .await;
    assert_eq!(status, 200);

    // Background ingest: new learners, trails and courses (new rows, some
    // sorting before the walk's position) and completions of existing ones
    // (rows that change).
    let stop = Arc::new(AtomicBool::new(false));
    let posted = Arc::new(AtomicU64::new(0));
    let writer = {
        let (app, stop, posted) = (Arc::clone(&app), Arc::clone(&stop), Arc::clone(&posted));
        tokio::spawn(async move {
            // Until told to stop, a webhook every few milliseconds (bounded).
            let mut i = 1000;
            while !stop.load(Ordering::Relaxed) && i < 21_000 {
                tokio::time::sleep(Duration::from_millis(8)).await;
                let body = if i % 2 == 0 {
                    history(1, i).remove(0)
                } else {
                    trail_done(
                        100,
                        200 + i,
                        20 + i % 5,
                        "2023-06-01 10:00:00",
                        &[(90, "New")],
                    )
                };
                let (status, _) = app.post(TOKEN, &body).await;
                assert_eq!(status, 200);
                posted.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };

    let immutable = [
        ("/v1/institutions/100/trails", "trail_id"),
        ("/v1/institutions/100/courses", "course_id"),
        ("/v1/institutions/100/learners", "user_id"),
        ("/v1/institutions/100/trails/1/learners", "user_id"),
        ("/v1/institutions/100/completions", "position"),
        (
            "/v1/institutions/100/completions?sort=finished_at",
            "position",
        ),
        ("/v1/institutions/100/events", "position"),
        ("/v1/institutions/100/learners/14/events", "position"),
    ];
    let mut grown = 0;
    let mut during = 0;
    for (path, id) in immutable {
        let (before, _) = walk(&app, path, 1000, Duration::ZERO).await;
        let before: HashMap<u64, Value> = before.into_iter().map(|r| (key_of(&r, id), r)).collect();
        let posted_before = posted.load(Ordering::Relaxed);
        let (rows, _) = walk(&app, path, 5, Duration::from_millis(5)).await;
        let got: Vec<u64> = rows.iter().map(|r| key_of(r, id)).collect();
        let unique: HashSet<u64> = got.iter().copied().collect();
        assert_eq!(unique.len(), got.len(), "{path}: a row twice during ingest");
        for key in before.keys() {
            assert!(
                unique.contains(key),
                "{path}: row {key} missed during ingest"
            );
        }
        if unique.len() > before.len() {
            grown += 1;
        }
        during += posted.load(Ordering::Relaxed) - posted_before;
        eprintln!(
            "{path}: {} rows before, {} walked, {} webhooks meanwhile",
            before.len(),
            unique.len(),
            posted.load(Ordering::Relaxed) - posted_before
        );
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert!(
        during >= 20,
        "only {during} webhooks arrived during the walks"
    );
    assert!(
        grown >= 3,
        "ingest added rows to only {grown} lists during their walks"
    );
    match Arc::try_unwrap(app) {
        Ok(app) => {
            app.stop().await;
        }
        Err(_) => panic!("app still shared"),
    }
}
