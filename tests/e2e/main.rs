//! End-to-end tests: the tracker driven from outside, over HTTP, in process
//! and as a child process. One test binary for the whole suite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod api_export;
mod api_log;
mod api_openapi;
mod api_pages;
mod concurrency;
mod durability;
mod eventstoredb;
mod ops;
mod projections;
mod support;
mod webhook;
