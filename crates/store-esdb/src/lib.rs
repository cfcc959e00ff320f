//! The EventStoreDB / KurrentDB backend of the tracker's event-store port
//! ([`tracker_store::EventStore`]), over the official `eventstore` gRPC
//! client. See [`client`] for how streams, positions and duplicates map onto
//! the server.
//!
//! With the `test-server` feature (tests only) the crate also carries
//! `test_server`, an in-process server speaking the same gRPC protocol,
//! backed by memory, so that the adapter's own code runs in CI without an
//! EventStoreDB.
#![forbid(unsafe_code)]

pub mod client;
#[cfg(feature = "test-server")]
pub mod test_server;

pub use client::{EsdbEventStore, EsdbOptions};
