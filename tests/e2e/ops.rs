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
