//! The query side of the read store named by `read_store.url`, beside
//! [`crate::backend::open_read_store`] (which must have opened it first: it
//! creates and migrates what the queries read).

use std::sync::Arc;

use tracker_projections::query::postgres::PgQueries;
use tracker_projections::query::sqlite::SqliteQueries;
use tracker_projections::query::{QueryError, ReadModelQueries};

use crate::config::Config;

/// Connections of the PostgreSQL query pool (its own, apart from the
/// projector's, so queries never queue behind projection batches).
pub const QUERY_POOL_SIZE: usize = 8;

pub async fn open_queries(config: &Config) -> Result<Arc<dyn ReadModelQueries>, QueryError> {
    match config.read_store.url.as_ref().map(|u| u.expose()) {
        None | Some("") => Ok(Arc::new(SqliteQueries::open(
            config.data_dir.join("readmodels"),
        )?)),
        Some(url) => Ok(Arc::new(PgQueries::connect(url, QUERY_POOL_SIZE).await?)),
    }
}
