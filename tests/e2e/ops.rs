//! `/healthz`, `/readyz`, `/metrics`.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let app = TestApp::spawn().await;
    let get = |path: &str| app.client.get(app.url(path)).send();
    assert_eq!(get("/healthz").await.unwrap().status().as_u16(), 200);
    assert_eq!(get("/readyz").await.unwrap().status().as_u16(), 200);

    app.post(TOKEN, DOCUMENTED).await;
    app.post(TOKEN, DOCUMENTED).await;
    app.post(TOKEN, "{").await;
    app.post(TOKEN, OTHER_SLUG).await;

    let res = get("/metrics").await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let text = res.text().await.unwrap();
    let value = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        value("tracker_webhook_deliveries_total{outcome=\"accepted\",status=\"200\"}"),
        2.0
    );
    assert_eq!(
        value("tracker_webhook_deliveries_total{outcome=\"duplicate\",status=\"200\"}"),
        1.0
    );
    assert_eq!(
        value("tracker_webhook_deliveries_total{outcome=\"invalid_json\",status=\"400\"}"),
        1.0
    );
    assert_eq!(value("tracker_events_appended_total"), 2.0);
    assert_eq!(value("tracker_event_store_head_position"), 2.0);
    assert_eq!(value("tracker_append_duration_seconds_count"), 3.0);
    app.stop().await;
}

/// Projection progress (metrics and `/readyz`) and dead letters (metrics)
/// are visible to operators.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_progress_and_dead_letters_are_visible() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Three events, one of which no projection can read.
    seed_three_the_second_undecodable(&data).await;

    // Whatever the projector has done so far, checkpoint and lag add up to
    // the head.
    let app = TestApp::spawn_with(|c| c.data_dir = data.clone()).await;
    let projections = readyz_projections(&app).await;
    assert_eq!(projections.len(), 2, "{projections:?}");
    for p in &projections {
        let (checkpoint, lag) = (p["checkpoint"].as_u64(), p["lag"].as_u64());
        assert_eq!(checkpoint.zip(lag).map(|(c, l)| c + l), Some(3), "{p}");
    }

    // The in-process projector catches up; then lag is 0 and the dead
    // letters (one per projection) are counted.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let text = metrics_text(&app).await;
        let line = |l: &str| text.lines().any(|t| t == l);
        if line("tracker_projection_lag_events{projection=\"learners\"} 0")
            && line("tracker_projection_lag_events{projection=\"institutions\"} 0")
        {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "projections did not catch up:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_lines(
        &text,
        &[
            "tracker_projection_checkpoint_position{projection=\"institutions\"} 3",
            "tracker_projection_checkpoint_position{projection=\"learners\"} 3",
            "tracker_event_store_head_position 3",
            "tracker_projection_dead_letters 2",
            "tracker_projection_halted{projection=\"institutions\"} 0",
            "tracker_projection_halted{projection=\"learners\"} 0",
        ],
    );
    let projections = readyz_projections(&app).await;
    let mut names: Vec<&str> = projections
        .iter()
        .map(|p| p["projection"].as_str().unwrap_or(""))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["institutions", "learners"], "{projections:?}");
    for p in &projections {
        assert_eq!(
            (p["checkpoint"].as_u64(), p["lag"].as_u64()),
            (Some(3), Some(0)),
            "{p}"
        );
        assert!(p.get("halted").is_none(), "{p}");
    }
    app.stop().await;
}

/// Under `serve`, a projection halted by `on_error = "stop"` is shown with
/// its error in `/readyz` and `/metrics`, and deliveries are still taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halted_projection_is_shown_and_deliveries_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    seed_three_the_second_undecodable(&data).await;

    let app = TestApp::spawn_with(|c| {
        c.data_dir = data.clone();
        c.projector.on_error = tracker::config::OnErrorSetting::Stop;
    })
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let projections = loop {
        let projections = readyz_projections(&app).await;
        if projections.iter().all(|p| p.get("halted").is_some()) {
            break projections;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the projections did not halt: {projections:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(projections.len(), 2, "{projections:?}");
    for p in &projections {
        let name = p["projection"].as_str().unwrap();
        assert_eq!(
            (p["checkpoint"].as_u64(), p["lag"].as_u64()),
            (Some(1), Some(2)),
            "{p}"
        );
        let halted = p["halted"].as_str().unwrap();
        assert!(
            halted.starts_with(&format!("projection {name} stopped at position 2: "))
                && halted.ends_with("(--on-error stop)"),
            "{halted}"
        );
    }
    let text = metrics_text(&app).await;
    assert_lines(
        &text,
        &[
            "tracker_projection_halted{projection=\"institutions\"} 1",
            "tracker_projection_halted{projection=\"learners\"} 1",
        ],
    );

    let (status, body) = app
        .post(TOKEN, &completion(7, 8, 9, "2024-05-01 10:00:00"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["position"], 4, "{body}");
    // And `serve` ends with the error (a non-zero exit), not as if all
    // had gone well.
    let mut app = app;
    let stopped = app.running.take().unwrap().stop(true).await;
    let e = stopped.unwrap_err().to_string();
    assert!(
        e.starts_with("a projection stopped with an error: projection "),
        "{e}"
    );
}

async fn metrics_text(app: &TestApp) -> String {
    app.client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Each of `expected` is a whole line of `text`.
fn assert_lines(text: &str, expected: &[&str]) {
    for expected in expected {
        assert!(text.lines().any(|l| l == *expected), "{expected}:\n{text}");
    }
}

async fn readyz_projections(app: &TestApp) -> Vec<serde_json::Value> {
    let ready: serde_json::Value = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");
    ready["projections"].as_array().cloned().unwrap_or_default()
}
