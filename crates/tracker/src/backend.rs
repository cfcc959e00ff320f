//! The one place where the event-store backend is chosen from configuration.

use std::sync::Arc;

use tracker_store::sqlite::SqliteEventStore;
use tracker_store::{EventStore, StoreError};

use crate::config::Config;

/// The backends this build can run.
#[derive(Debug)]
pub enum EventStoreBackend {
    /// The embedded default: `events.sqlite` in the data directory.
    Embedded(SqliteEventStore),
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("event_store.url: {0}")]
    Unsupported(String),
    #[error("event store: {0}")]
    Store(#[from] StoreError),
}

impl EventStoreBackend {
    pub fn open(config: &Config) -> Result<Self, BackendError> {
        match config.event_store.url.as_ref().map(|u| u.expose()) {
            None | Some("") => Ok(Self::Embedded(SqliteEventStore::open(
                config.data_dir.join("events.sqlite"),
            )?)),
            Some(url) if url.starts_with("esdb://") || url.starts_with("esdb+discover://") => {
                Err(BackendError::Unsupported(
                    "the EventStoreDB backend is not part of this build yet".into(),
                ))
            }
            Some(_) => Err(BackendError::Unsupported(
                "expected esdb://... or esdb+discover://..., or leave it unset for the embedded store"
                    .into(),
            )),
        }
    }

    pub fn event_store(&self) -> Arc<dyn EventStore> {
        match self {
            Self::Embedded(s) => Arc::new(s.clone()),
        }
    }

    /// Stops taking writes and waits for what is queued to be durable.
    pub async fn close(&self) -> Result<(), StoreError> {
        match self {
            Self::Embedded(s) => s.close().await,
        }
    }
}
