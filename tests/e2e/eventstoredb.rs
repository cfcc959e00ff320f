//! The same tracker with its event log in EventStoreDB: only configuration
//! changes. The node is the in-process test server that speaks EventStoreDB's
//! gRPC protocol (it proves the wiring, not EventStoreDB's own semantics).

use std::time::{Duration, Instant};

use tracker::config::Secret;
use tracker_store_esdb::test_server::TestServer;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_dedup_and_projections_work_on_eventstoredb() {
    let node = TestServer::start().await.unwrap();
    let url = node.url();
    let app = TestApp::spawn_with(|c| c.event_store.url = Some(Secret::new(url.clone()))).await;

    let (status, first) = app.post(TOKEN, DOCUMENTED).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["position"], 1);
    let (status, again) = app.post(TOKEN, DOCUMENTED).await;
    assert_eq!(status, 200);
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["position"], 1);
    let (_, multi) = app.post(TOKEN, MULTI).await;
    assert_eq!(multi["position"], 2);

    // On the server: this tracker's streams, under its prefix.
    let ours = || -> Vec<String> {
        node.log()
            .iter()
            .map(|e| e.stream.clone())
            .filter(|s| !s.starts_with('$'))
            .collect()
    };
    let streams = ours();
    assert_eq!(
        streams,
        [
            "tracker-learner-12345-123456798",
            "tracker-learner-4401-90017"
        ]
    );

    // The projector follows the EventStoreDB log like the embedded one.
    let read = &app.running().state().read;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let cps = read.checkpoints().await.unwrap();
        if cps.len() == 2 && cps.iter().all(|(_, p)| *p >= 2) {
            break;
        }
        assert!(Instant::now() < deadline, "not projected: {cps:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dir = app.stop().await;

    // Days later, through a new process and connection: still one event.
    let app = TestApp::spawn_with(|c| {
        c.event_store.url = Some(Secret::new(url.clone()));
        c.data_dir = dir.path().to_path_buf();
    })
    .await;
    let (status, late) = app.post(TOKEN, DOCUMENTED).await;
    assert_eq!(status, 200);
    assert_eq!(late["duplicate"], true);
    assert_eq!(late["event_id"], first["event_id"]);
    assert_eq!(ours().len(), 2);
    app.stop().await;
}
