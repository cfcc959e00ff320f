//! Shared set-up: test-server nodes and stores pointed at them.

use std::sync::Arc;

use tracker_store::NewEvent;
use tracker_store::contract::Fixture;
use tracker_store_esdb::test_server::TestServer;
use tracker_store_esdb::{EsdbEventStore, EsdbOptions};
use uuid::Uuid;

/// Options for tests: short timeouts so that a hang fails fast.
pub fn options(prefix: &str) -> EsdbOptions {
    EsdbOptions {
        stream_prefix: prefix.to_owned(),
        operation_timeout: std::time::Duration::from_secs(5),
        index_timeout: std::time::Duration::from_secs(10),
        max_resubscribe_backoff: std::time::Duration::from_millis(200),
        ..EsdbOptions::default()
    }
}

/// A prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("t{}-", Uuid::new_v4().simple())
}

pub async fn node() -> TestServer {
    TestServer::start().await.expect("start the test server")
}

pub async fn store_on(node: &TestServer, prefix: &str) -> EsdbEventStore {
    EsdbEventStore::connect(&node.url(), options(prefix))
        .await
        .expect("connect to the test server")
}

/// A fresh node and a store on it, with the default prefix, as a contract
/// fixture.
pub async fn fresh_fixture() -> Fixture {
    let node = node().await;
    let store = EsdbEventStore::connect(
        &node.url(),
        EsdbOptions {
            stream_prefix: EsdbOptions::default().stream_prefix,
            ..options("unused")
        },
    )
    .await
    .expect("connect to the test server");
    Fixture::new(Arc::new(store)).keep_alive(node)
}

/// A new event; the metadata is derived from `n`.
pub fn event(n: u64, data: &str) -> NewEvent {
    tracker_store::contract::event(n, data)
}

pub fn simple(n: u64) -> NewEvent {
    event(n, &format!("{{\"n\":{n}}}"))
}
