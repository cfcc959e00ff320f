//! The EventStoreDB adapter's tests, one binary:
//! - `contract_test_server`: the whole event-store contract against the
//!   adapter pointed at the in-process test server (a fresh node per case);
//! - `contract_real_server`: the same contract against a real EventStoreDB
//!   / KurrentDB when `TRACKER_TEST_EVENTSTORE_URL` is set at build time,
//!   reported as ignored otherwise;
//! - `adapter`: what only this adapter has (position mapping, redelivery
//!   across connections, racing processes, dropped connections, filters,
//!   connection errors).

// Test code: a failed expectation should stop the case with its message.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod adapter;
mod contract_real_server;
mod contract_test_server;
mod support;
