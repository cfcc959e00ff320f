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
    seed_events(&data, vec![DOCUMENTED.to_owned()]).await;
    append_undecodable(&data).await;
    seed_events(&data, vec![MULTI.to_owned()]).await;

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
        let text = app
            .client
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
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
    for expected in [
        "tracker_projection_checkpoint_position{projection=\"institutions\"} 3",
        "tracker_projection_checkpoint_position{projection=\"learners\"} 3",
        "tracker_event_store_head_position 3",
        "tracker_projection_dead_letters 2",
    ] {
        assert!(text.lines().any(|l| l == expected), "{expected}:\n{text}");
    }
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
    }
    app.stop().await;
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
