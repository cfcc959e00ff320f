//! The learning-progress tracker application: configuration, the HTTP
//! receiver, operations endpoints, and the one place where backends are
//! chosen. The binary (`src/main.rs`) is a thin command-line layer over this.
#![forbid(unsafe_code)]

pub mod api;
pub mod backend;
pub mod config;
pub mod error;
pub mod metrics;
pub mod ops;
pub mod projector;
pub mod replay;
pub mod server;
pub mod signature;
pub mod sources;
pub mod state;
pub mod webhook;
