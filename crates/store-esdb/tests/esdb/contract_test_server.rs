//! The whole contract against the adapter on the in-process test server, a
//! fresh node per case.

use crate::support::fresh_fixture;

tracker_store::contract_tests!(
    fresh_fixture,
    ids_checked_per_stream_only =
        "EventStoreDB adapter: event ids are checked within their stream only (see the crate docs)",
);
