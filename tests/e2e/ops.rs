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

/// Projection progress and dead letters are visible to operators.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_lag_and_dead_letters_in_metrics_and_readyz() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Three events, one of which no projection can read.
    seed_events(&data, vec![DOCUMENTED.to_owned()]).await;
    append_undecodable(&data).await;
    seed_events(&data, vec![MULTI.to_owned()]).await;

    // Without a projector, everything is lag.
    let app = TestApp::spawn_with(|c| c.data_dir = data.clone()).await;
    let ready: serde_json::Value = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    let projections = ready["projections"].as_array().unwrap();
    assert_eq!(projections.len(), 2);
    assert!(
        projections
            .iter()
            .all(|p| p["checkpoint"].as_u64().unwrap() <= 3)
    );

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
        if text.contains("tracker_projection_lag_events{projection=\"learners\"} 0")
            && text.contains("tracker_projection_lag_events{projection=\"institutions\"} 0")
        {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "projections did not catch up:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(
        text.contains("tracker_projection_checkpoint_position{projection=\"institutions\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("tracker_event_store_head_position 3"),
        "{text}"
    );
    assert!(text.contains("tracker_projection_dead_letters 2"), "{text}");
    app.stop().await;
}
