//! The whole contract against a real EventStoreDB / KurrentDB, each case
//! under its own stream prefix so that cases (and runs) sharing the server
//! do not see one another.
//!
//! The cases exist in every build; without `TRACKER_TEST_EVENTSTORE_URL` at
//! build time they are `#[ignore]`d ("needs TRACKER_TEST_EVENTSTORE_URL"),
//! so cargo lists each one as ignored, never as passed. Run them with
//!
//! ```sh
//! TRACKER_TEST_EVENTSTORE_URL='esdb://localhost:2113?tls=false' \
//!     cargo test -p tracker-store-esdb contract_real_server
//! ```

use std::sync::Arc;

use tracker_store::contract::Fixture;
use tracker_store_esdb::EsdbEventStore;

use crate::support::{options, unique_prefix};

const URL_VARIABLE: &str = "TRACKER_TEST_EVENTSTORE_URL";

async fn real_server_fixture() -> Fixture {
    let Some(url) = std::env::var(URL_VARIABLE).ok().filter(|u| !u.is_empty()) else {
        eprintln!("SKIPPED: contract vs real EventStoreDB: {URL_VARIABLE} not set");
        panic!(
            "{URL_VARIABLE} is not set: this case cannot run against a real EventStoreDB \
             (it was built with the variable set, or run with --ignored)"
        );
    };
    let store = EsdbEventStore::connect(&url, options(&unique_prefix()))
        .await
        .unwrap_or_else(|err| panic!("connect to the EventStoreDB at {URL_VARIABLE}: {err}"));
    Fixture::new(Arc::new(store))
}

tracker_store::contract_tests!(
    real_server_fixture,
    ids_checked_per_stream_only = "EventStoreDB adapter: event ids are checked within their stream only (see the crate docs)",
    #[cfg_attr(not(tracker_esdb_real), ignore = "needs TRACKER_TEST_EVENTSTORE_URL")]
);
