//! The one place where backends are chosen from configuration: the event
//! store (`event_store.url`) and the read store (`read_store.url`).

use std::sync::Arc;

use tracker_projections::ReadStore;
use tracker_projections::postgres::PgReadStore;
use tracker_projections::query::ReadModelQueries;
use tracker_projections::query::postgres::PgQueries;
use tracker_projections::query::sqlite::SqliteQueries;
use tracker_projections::sqlite::SqliteReadStore;
use tracker_store::sqlite::SqliteEventStore;
use tracker_store::{EventStore, StoreError};
use tracker_store_esdb::{EsdbEventStore, EsdbOptions};

use crate::config::{Config, Secret};

/// The backends this build can run.
#[derive(Debug)]
pub enum EventStoreBackend {
    /// The embedded default: `events.sqlite` in the data directory.
    Embedded(SqliteEventStore),
    /// EventStoreDB / KurrentDB over gRPC.
    EventStoreDb(EsdbEventStore),
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("event_store.url: {0}")]
    Unsupported(String),
    #[error("event store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    ReadStore(#[from] tracker_projections::ReadStoreError),
    #[error(transparent)]
    Queries(#[from] tracker_projections::QueryError),
}

impl EventStoreBackend {
    pub async fn open(config: &Config) -> Result<Self, BackendError> {
        match config.event_store.url.as_ref().map(|u| u.expose()) {
            None | Some("") => Ok(Self::Embedded(SqliteEventStore::open(
                config.data_dir.join("events.sqlite"),
            )?)),
            Some(url) if url.starts_with("esdb://") || url.starts_with("esdb+discover://") => {
                let options = EsdbOptions::with_prefix(&config.event_store.stream_prefix);
                Ok(Self::EventStoreDb(
                    EsdbEventStore::connect(url, options).await?,
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
            Self::EventStoreDb(s) => Arc::new(s.clone()),
        }
    }

    /// Stops taking writes and waits for what is queued to be durable.
    pub async fn close(&self) -> Result<(), StoreError> {
        match self {
            Self::Embedded(s) => s.close().await,
            Self::EventStoreDb(s) => {
                s.close();
                Ok(())
            }
        }
    }
}

/// The read side: the store projectors write to and the queries the API
/// answers from, over the same files or database.
#[derive(Debug)]
pub struct ReadBackend {
    pub store: Arc<dyn ReadStore>,
    pub queries: Arc<dyn ReadModelQueries>,
}

const READ_STORE_URL: &str =
    "read_store.url: expected postgres://..., or leave it unset for SQLite in data_dir";

/// Connections of the PostgreSQL query pool (its own, apart from the
/// projector's, so queries never queue behind projection batches).
pub const QUERY_POOL_SIZE: usize = 8;

/// Opens the read store named by `read_store.url` (SQLite in the data
/// directory when unset) and the queries over it, or over
/// `read_store.query_url` when set (a PostgreSQL standby: the queries only
/// read, and every answer's `X-Consistent-Through` is the standby's own
/// checkpoint, read with the rows). The store is opened first: it creates
/// and migrates what the queries read.
pub async fn open_read_backend(config: &Config) -> Result<ReadBackend, BackendError> {
    fn given(url: &Option<Secret>) -> Option<&str> {
        url.as_ref().map(Secret::expose).filter(|u| !u.is_empty())
    }
    let (url, query_url) = (
        given(&config.read_store.url),
        given(&config.read_store.query_url),
    );
    if url.is_none() && query_url.is_some() {
        return Err(BackendError::Unsupported(
            "read_store.query_url: only with a PostgreSQL read_store.url".into(),
        ));
    }
    let store = open_read_store(config).await?;
    let queries: Arc<dyn ReadModelQueries> = match url {
        None => Arc::new(SqliteQueries::open(config.data_dir.join("readmodels"))?),
        Some(url) => Arc::new(PgQueries::connect(query_url.unwrap_or(url), QUERY_POOL_SIZE).await?),
    };
    Ok(ReadBackend { store, queries })
}

/// The read store alone, for commands that do not answer queries: they
/// neither open a query pool nor need `read_store.query_url`'s standby.
pub async fn open_read_store(config: &Config) -> Result<Arc<dyn ReadStore>, BackendError> {
    match config.read_store.url.as_ref().map(|u| u.expose()) {
        None | Some("") => Ok(Arc::new(SqliteReadStore::open(
            config.data_dir.join("readmodels"),
        )?)),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Arc::new(PgReadStore::connect(url).await?))
        }
        Some(_) => Err(BackendError::Unsupported(READ_STORE_URL.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A standby for the queries only exists beside a PostgreSQL read
    /// store: with the SQLite files it is refused by name, not ignored.
    #[tokio::test]
    async fn a_query_url_without_a_postgres_read_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        config.read_store.query_url = Some(Secret::new("postgres://standby/db"));
        let Err(e) = open_read_backend(&config).await else {
            panic!("opened");
        };
        assert!(e.to_string().contains("read_store.query_url"), "{e}");
        assert!(!dir.path().join("readmodels").exists(), "nothing created");
    }
}
