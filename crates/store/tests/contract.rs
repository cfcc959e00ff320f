//! The event-store contract, run against the embedded SQLite backend with a
//! fresh database file per case.

// Test setup: a failure here should stop the case with its message.
#![allow(clippy::expect_used)]

use std::sync::Arc;

use tracker_store::contract::Fixture;
use tracker_store::sqlite::SqliteEventStore;

async fn sqlite_store() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteEventStore::open(dir.path().join("events.sqlite")).expect("open store");
    Fixture::new(Arc::new(store)).keep_alive(dir)
}

tracker_store::contract_tests!(sqlite_store);
