//! The PostgreSQL read store: one schema per generation (`tracker_rm_g1`,
//! `tracker_rm_g2`, ...) with the same tables, columns and column order as
//! the two files of a SQLite generation, and the `tracker_control` schema, which names the
//! current generation and records which migrations each schema has had.
//!
//! It gives the same read models as [`crate::sqlite`] for the same events
//! (the same [`Snapshot`]): both run the pure [`crate::plan`] and write its
//! rows with the same arithmetic. What differs is how: a batch is a handful
//! of statements whatever its size, each carrying a whole key set or row set
//! as arrays (`INSERT ... SELECT * FROM UNNEST($1::bigint[], ...)`), and the
//! statements of one step are pipelined on one connection.
//!
//! Ids are the source's `u64`s in `BIGINT` bit for bit (as in SQLite). Times
//! are `TIMESTAMPTZ` truncated to whole seconds, which is what SQLite keeps
//! (`sqlite::sql_time`); the snapshot renders them the same way. Text keys
//! that are sorted on use `COLLATE "C"`, SQLite's byte order, whatever the
//! database's default collation.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Transaction};
use rustc_hash::{FxHashMap, FxHashSet};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{IsolationLevel, NoTls, Row};
use tracker_store::Position;
use uuid::Uuid;

use crate::fold::Membership;
use crate::model::Completion;
use crate::plan::{
    CourseDelta, DayDelta, LearnerDelta, LearnerTrailDelta, MembershipKeys, Plan, ProjectionKind,
    SummaryDelta, TrailDelta, membership_keys, plan, sorted,
};
use crate::readstore::{
    ApplyBatch, CheckpointKey, DeadLetter, FinalLoad, LeaseHolder, ReadStore, ReadStoreError,
    Snapshot, lease_ms,
};
use crate::sqlite::{SNAPSHOT_TABLES, courses_json, from_sql_id, sql_id, sql_position, sql_time};

/// Connections per store (shared by every handle made from it).
pub const DEFAULT_POOL_SIZE: usize = 8;

const CONTROL_SCHEMA: &str = "tracker_control";
const SCHEMA_PREFIX: &str = "tracker_rm_";
/// Serialises migrations and generation creation across processes.
const MIGRATION_LOCK: i64 = 0x7472_6163_6b65_7201;
/// How long dropping an obsolete generation may wait for readers before it
/// gives up and leaves the schema for the next switch (or start-up).
const DROP_LOCK_TIMEOUT: &str = "2s";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Always run first, idempotent: the table that versions everything else.
const BOOTSTRAP: &str = r#"
CREATE SCHEMA IF NOT EXISTS tracker_control;
CREATE TABLE IF NOT EXISTS tracker_control.schema_migrations (
    scope      TEXT COLLATE "C" NOT NULL,
    version    INTEGER     NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, version)
);
"#;

/// Migrations of `tracker_control` (scope `control`).
const CONTROL_MIGRATIONS: &[&str] = &[r#"
CREATE TABLE tracker_control.generations (
    name       TEXT COLLATE "C" PRIMARY KEY,
    number     BIGINT      NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE tracker_control.current_generation (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT COLLATE "C" NOT NULL REFERENCES tracker_control.generations (name)
);
"#];

/// Migrations of a generation schema (scope: the generation's name); `{s}`
/// stands for the schema. Columns in the same order as SQLite's, so
/// `SELECT *` snapshots line up.
const GENERATION_MIGRATIONS: &[&str] = &[
    r#"
CREATE SCHEMA {s};
CREATE TABLE {s}.checkpoints (
    key      TEXT COLLATE "C" PRIMARY KEY,
    position BIGINT NOT NULL
);
CREATE TABLE {s}.dead_letters (
    projection  TEXT COLLATE "C" NOT NULL,
    position    BIGINT      NOT NULL,
    event_id    UUID        NOT NULL,
    event_type  TEXT        NOT NULL,
    error       TEXT        NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (projection, position)
);
CREATE TABLE {s}.leases (
    name       TEXT COLLATE "C" PRIMARY KEY,
    holder     TEXT        NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);

-- institutions projection
CREATE TABLE {s}.inst_summary (
    institution_id     BIGINT PRIMARY KEY,
    completions        BIGINT      NOT NULL,
    learners           BIGINT      NOT NULL,
    trails             BIGINT      NOT NULL,
    courses            BIGINT      NOT NULL,
    first_completed_at TIMESTAMPTZ NOT NULL,
    last_completed_at  TIMESTAMPTZ NOT NULL,
    last_position      BIGINT      NOT NULL
);
CREATE TABLE {s}.inst_trails (
    institution_id     BIGINT      NOT NULL,
    trail_id           BIGINT      NOT NULL,
    name               TEXT        NOT NULL,
    name_position      BIGINT      NOT NULL,
    completions        BIGINT      NOT NULL,
    learners           BIGINT      NOT NULL,
    first_completed_at TIMESTAMPTZ NOT NULL,
    last_completed_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (institution_id, trail_id)
);
CREATE TABLE {s}.inst_courses (
    institution_id BIGINT NOT NULL,
    course_id      BIGINT NOT NULL,
    title          TEXT   NOT NULL,
    title_position BIGINT NOT NULL,
    completions    BIGINT NOT NULL,
    learners       BIGINT NOT NULL,
    PRIMARY KEY (institution_id, course_id)
);
CREATE TABLE {s}.inst_trail_courses (
    institution_id BIGINT NOT NULL,
    trail_id       BIGINT NOT NULL,
    course_id      BIGINT NOT NULL,
    PRIMARY KEY (institution_id, trail_id, course_id)
);
CREATE INDEX inst_trail_courses_by_course ON {s}.inst_trail_courses (institution_id, course_id, trail_id);
CREATE TABLE {s}.inst_daily (
    institution_id BIGINT NOT NULL,
    day            TEXT COLLATE "C" NOT NULL,
    completions    BIGINT NOT NULL,
    learners       BIGINT NOT NULL,
    PRIMARY KEY (institution_id, day)
);
CREATE TABLE {s}.inst_m_learners (institution_id BIGINT NOT NULL, user_id BIGINT NOT NULL,
    PRIMARY KEY (institution_id, user_id));
CREATE TABLE {s}.inst_m_trails (institution_id BIGINT NOT NULL, trail_id BIGINT NOT NULL,
    PRIMARY KEY (institution_id, trail_id));
CREATE TABLE {s}.inst_m_courses (institution_id BIGINT NOT NULL, course_id BIGINT NOT NULL,
    PRIMARY KEY (institution_id, course_id));
CREATE TABLE {s}.inst_m_trail_learners (institution_id BIGINT NOT NULL, trail_id BIGINT NOT NULL,
    user_id BIGINT NOT NULL, PRIMARY KEY (institution_id, trail_id, user_id));
CREATE TABLE {s}.inst_m_course_learners (institution_id BIGINT NOT NULL, course_id BIGINT NOT NULL,
    user_id BIGINT NOT NULL, PRIMARY KEY (institution_id, course_id, user_id));
CREATE TABLE {s}.inst_m_day_learners (institution_id BIGINT NOT NULL, day TEXT COLLATE "C" NOT NULL,
    user_id BIGINT NOT NULL, PRIMARY KEY (institution_id, day, user_id));

-- learners projection
CREATE TABLE {s}.lrn_learners (
    institution_id     BIGINT      NOT NULL,
    user_id            BIGINT      NOT NULL,
    name               TEXT        NOT NULL,
    email              TEXT        NOT NULL,
    profile_position   BIGINT      NOT NULL,
    trails             BIGINT      NOT NULL,
    completions        BIGINT      NOT NULL,
    first_completed_at TIMESTAMPTZ NOT NULL,
    last_completed_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (institution_id, user_id)
);
CREATE TABLE {s}.lrn_learner_trails (
    institution_id     BIGINT      NOT NULL,
    user_id            BIGINT      NOT NULL,
    trail_id           BIGINT      NOT NULL,
    completions        BIGINT      NOT NULL,
    first_completed_at TIMESTAMPTZ NOT NULL,
    last_completed_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (institution_id, user_id, trail_id)
);
CREATE INDEX lrn_learner_trails_by_trail ON {s}.lrn_learner_trails (institution_id, trail_id, user_id);
CREATE TABLE {s}.lrn_completions (
    position        BIGINT PRIMARY KEY,
    event_id        UUID        NOT NULL UNIQUE,
    institution_id  BIGINT      NOT NULL,
    user_id         BIGINT      NOT NULL,
    trail_id        BIGINT      NOT NULL,
    trail_name      TEXT        NOT NULL,
    finished_at_raw TEXT        NOT NULL,
    finished_at     TIMESTAMPTZ NOT NULL,
    day             TEXT COLLATE "C" NOT NULL,
    courses         TEXT        NOT NULL
);
CREATE INDEX lrn_completions_by_time ON {s}.lrn_completions (institution_id, finished_at, position);
CREATE INDEX lrn_completions_by_user ON {s}.lrn_completions (institution_id, user_id, position);
CREATE INDEX lrn_completions_by_trail ON {s}.lrn_completions (institution_id, trail_id, position);
CREATE TABLE {s}.lrn_m_trail_learners (institution_id BIGINT NOT NULL, trail_id BIGINT NOT NULL,
    user_id BIGINT NOT NULL, PRIMARY KEY (institution_id, trail_id, user_id));
"#,
    r#"
-- The query API: every sort of every list is an index range (keyset pages);
-- text sorts in byte order, as SQLite's.
CREATE INDEX inst_trails_by_name ON {s}.inst_trails (institution_id, name COLLATE "C", trail_id);
CREATE INDEX inst_trails_by_completions ON {s}.inst_trails (institution_id, completions, trail_id);
CREATE INDEX inst_courses_by_title ON {s}.inst_courses (institution_id, title COLLATE "C", course_id);
CREATE INDEX inst_courses_by_completions ON {s}.inst_courses (institution_id, completions, course_id);
CREATE INDEX lrn_learners_by_name ON {s}.lrn_learners (institution_id, name COLLATE "C", user_id);
CREATE INDEX lrn_learners_by_completions ON {s}.lrn_learners (institution_id, completions, user_id);
CREATE INDEX lrn_completions_by_institution ON {s}.lrn_completions (institution_id, position);
CREATE INDEX lrn_completions_by_user_time ON {s}.lrn_completions (institution_id, user_id, finished_at, position);
CREATE INDEX lrn_completions_by_trail_time ON {s}.lrn_completions (institution_id, trail_id, finished_at, position);
"#,
    r#"
-- The event log records an id once (see the SQLite schema), and every
-- projection reads it in position order: a unique index here only
-- re-checked that, at the price of a random-key index insert per
-- completion.
ALTER TABLE {s}.lrn_completions DROP CONSTRAINT IF EXISTS lrn_completions_event_id_key;
"#,
    r#"
-- As in the SQLite store: a learner's trail is new exactly when its
-- `lrn_learner_trails` row is, so the key table repeated that table's
-- keys; and one learner's few completions are read by
-- `lrn_completions_by_user`, filtered or sorted by time, so an index per
-- learner and time was one more to write per completion.
DROP TABLE IF EXISTS {s}.lrn_m_trail_learners;
DROP INDEX IF EXISTS {s}.lrn_completions_by_user_time;
"#,
];

fn storage(e: impl std::fmt::Display) -> ReadStoreError {
    ReadStoreError::Storage(e.to_string())
}

/// A PostgreSQL error with what was being done, and the server's own
/// message when there is one (`ERROR: ...` and its detail): tokio-postgres
/// displays every server error as just "db error", its reason only in the
/// error's source.
fn pg(context: &'static str) -> impl Fn(tokio_postgres::Error) -> ReadStoreError {
    move |e| match e.as_db_error() {
        Some(db) => ReadStoreError::Storage(format!("{context}: {db}")),
        None => ReadStoreError::Storage(format!("{context}: {e}")),
    }
}

/// What SQLite keeps of a time (`sqlite::sql_time` has whole seconds), so
/// that LEAST/GREATEST pick the same rows and the snapshot renders the same.
fn pg_time(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(0)
}

/// The schema of a generation. Generation names are made here (`g<n>`), but
/// they are read back from the database and then spliced into SQL, so they
/// are checked.
fn schema_name(generation: &str) -> Result<String, ReadStoreError> {
    let ok = !generation.is_empty()
        && generation.len() <= 40
        && generation
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(format!("{SCHEMA_PREFIX}{generation}"))
    } else {
        Err(ReadStoreError::Schema(format!(
            "generation name {generation:?} is not a valid schema suffix"
        )))
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `UNNEST($1::bigint[], $2::text[], ...)` for element types `bigint, text, ...`.
fn unnest(types: &str) -> String {
    let args: Vec<String> = types
        .split(", ")
        .enumerate()
        .map(|(i, t)| format!("${}::{t}[]", i + 1))
        .collect();
    format!("UNNEST({})", args.join(", "))
}

/// The PostgreSQL read store. Cheap to clone; clones share the pool and the
/// generation this handle is on.
#[derive(Clone)]
pub struct PgReadStore {
    pool: Pool,
    generation: Arc<Mutex<String>>,
    /// A handle that follows the current pointer (live projector, queries);
    /// a rebuild's handle stays on its own generation.
    follows_current: bool,
    /// A generation being built: the indexes dropped at its creation,
    /// built at `seal` from the loaded rows instead of maintained row by row.
    deferred_indexes: Arc<tokio::sync::Mutex<Vec<DeferredIndex>>>,
}

impl std::fmt::Debug for PgReadStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the URL: it may hold a password.
        f.debug_struct("PgReadStore")
            .field("generation", &self.generation())
            .field("follows_current", &self.follows_current)
            .finish_non_exhaustive()
    }
}

impl PgReadStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`),
    /// migrates the control schema and the current generation (creating the
    /// first generation if there is none), and returns a handle that follows
    /// the current generation.
    pub async fn connect(url: &str) -> Result<Self, ReadStoreError> {
        Self::connect_with(url, DEFAULT_POOL_SIZE).await
    }

    /// [`Self::connect`] with at most `max_connections` connections.
    pub async fn connect_with(url: &str, max_connections: usize) -> Result<Self, ReadStoreError> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| storage(format!("read_store.url is not a PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("tracker");
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_connections.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT + Duration::from_secs(1)))
            .build()
            .map_err(|e| storage(format!("building the PostgreSQL pool: {e}")))?;

        let mut client = get(&pool).await?;
        let tx = client.transaction().await.map_err(pg("migrating"))?;
        lock_migrations(&tx).await?;
        tx.batch_execute(BOOTSTRAP)
            .await
            .map_err(pg("creating tracker_control"))?;
        migrate(&tx, "control", CONTROL_MIGRATIONS, CONTROL_SCHEMA).await?;
        let generation = match current_generation(&tx).await? {
            Some(g) => {
                migrate(&tx, &g, GENERATION_MIGRATIONS, &schema_name(&g)?).await?;
                g
            }
            None => {
                let g = register_generation(&tx).await?;
                tx.execute(
                    "INSERT INTO tracker_control.current_generation (id, name) VALUES (1, $1)
                     ON CONFLICT (id) DO UPDATE SET name = excluded.name",
                    &[&g],
                )
                .await
                .map_err(pg("setting the first generation"))?;
                g
            }
        };
        tx.commit().await.map_err(pg("migrating"))?;
        drop(client);

        let store = Self {
            pool,
            generation: Arc::new(Mutex::new(generation)),
            follows_current: true,
            deferred_indexes: Arc::default(),
        };
        // Leftovers of a switch that could not drop them.
        store.drop_obsolete_schemas().await;
        Ok(store)
    }

    /// The pool, for the query side (read the tables of [`Self::schema`]).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The schema of this handle's generation (`tracker_rm_g1`), safe to
    /// splice into SQL.
    pub fn schema(&self) -> String {
        format!("{SCHEMA_PREFIX}{}", self.generation())
    }

    /// Bulk loads bypass the checkpoint: only into a generation being
    /// built. Returns its schema.
    fn building(&self) -> Result<String, ReadStoreError> {
        if self.follows_current {
            return Err(storage(
                "bulk loads go only into a generation being built (create_generation)",
            ));
        }
        schema_name(&self.generation())
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, ReadStoreError> {
        get(&self.pool).await
    }

    fn set_generation(&self, generation: String) {
        *self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = generation;
    }

    /// Drops the schemas of generations no longer registered (dropped by a
    /// switch, or left by a rebuild that failed half-way through creating
    /// one). Best effort: a schema that readers keep busy longer than
    /// [`DROP_LOCK_TIMEOUT`] stays for next time.
    async fn drop_obsolete_schemas(&self) {
        if let Err(e) = self.try_drop_obsolete_schemas().await {
            tracing::warn!(error = %e, "could not drop obsolete read-model generations; will retry at the next switch");
        }
    }

    async fn try_drop_obsolete_schemas(&self) -> Result<(), ReadStoreError> {
        let mut client = self.client().await?;
        let names: Vec<String> = first_column(
            &client,
            "SELECT n.nspname::text FROM pg_namespace n
             WHERE starts_with(n.nspname::text, $1)
               AND NOT EXISTS (SELECT 1 FROM tracker_control.generations g
                               WHERE $1 || g.name = n.nspname::text)
             ORDER BY n.nspname",
            &[&SCHEMA_PREFIX],
            "listing obsolete generations",
        )
        .await?;
        for name in names {
            let tx = client
                .transaction()
                .await
                .map_err(pg("dropping a generation"))?;
            let dropped = tx
                .batch_execute(&format!(
                    "SET LOCAL lock_timeout = '{DROP_LOCK_TIMEOUT}';
                     DROP SCHEMA IF EXISTS {} CASCADE",
                    quote_ident(&name)
                ))
                .await;
            match dropped {
                Ok(()) => {
                    tx.commit().await.map_err(pg("dropping a generation"))?;
                    tracing::info!(schema = %name, "dropped obsolete read-model generation");
                }
                Err(e) => {
                    drop(tx);
                    tracing::warn!(schema = %name, error = %e, "could not drop obsolete read-model generation (in use?); leaving it for next time");
                }
            }
        }
        // Statements prepared on dropped schemas would only fail from now on.
        self.pool.manager().statement_caches.clear();
        Ok(())
    }
}

async fn get(pool: &Pool) -> Result<deadpool_postgres::Object, ReadStoreError> {
    pool.get()
        .await
        .map_err(|e| storage(format!("PostgreSQL connection: {e}")))
}

/// An index of a generation being built: dropped when the generation is
/// created, built at `seal` from the loaded rows (one sort) instead of
/// maintained row by row during the load.
#[derive(Debug, Clone)]
struct DeferredIndex {
    table: String,
    /// `CREATE [UNIQUE] INDEX IF NOT EXISTS ...`.
    build: String,
    /// For the index behind a primary key: the `ALTER TABLE` that makes it
    /// the key again once it is built.
    constraint: Option<String>,
}

/// Drops the indexes of schema `s`'s projection tables (secondary indexes
/// and primary keys; not those of its checkpoints, dead letters and leases,
/// which a build writes with upserts) and returns how to build them again.
/// A projection's bulk load writes each key once, from the fold's maps, and
/// `seal` checks it again when it builds the unique index.
async fn defer_indexes(
    tx: &Transaction<'_>,
    s: &str,
) -> Result<Vec<DeferredIndex>, ReadStoreError> {
    let rows = tx
        .query(
            "SELECT t.relname::text, i.relname::text, pg_get_indexdef(i.oid), c.conname::text
             FROM pg_index x
             JOIN pg_class i ON i.oid = x.indexrelid
             JOIN pg_class t ON t.oid = x.indrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             LEFT JOIN pg_constraint c ON c.conindid = i.oid AND c.contype = 'p'
             WHERE n.nspname = $1
               AND (t.relname LIKE 'inst\\_%' OR t.relname LIKE 'lrn\\_%')
               AND (c.oid IS NOT NULL
                    OR NOT EXISTS (SELECT 1 FROM pg_constraint o WHERE o.conindid = i.oid))
             ORDER BY t.relname, i.relname",
            &[&s],
        )
        .await
        .map_err(pg("listing the read indexes"))?;
    let mut deferred = Vec::with_capacity(rows.len());
    for row in rows {
        let get = |i| -> Result<Option<String>, ReadStoreError> {
            row.try_get(i).map_err(pg("listing the read indexes"))
        };
        let (Some(table), Some(index), Some(build)) = (get(0)?, get(1)?, get(2)?) else {
            return Err(storage("an index without a table, name or definition"));
        };
        let (table_q, index_q) = (quote_ident(&table), quote_ident(&index));
        let (drop, constraint) = match get(3)? {
            Some(key) => {
                let key = quote_ident(&key);
                (
                    format!("ALTER TABLE {s}.{table_q} DROP CONSTRAINT {key}"),
                    Some(format!(
                        "ALTER TABLE {s}.{table_q} ADD CONSTRAINT {key} PRIMARY KEY USING INDEX {index_q}"
                    )),
                )
            }
            None => (format!("DROP INDEX {s}.{index_q}"), None),
        };
        tx.batch_execute(&drop)
            .await
            .map_err(pg("deferring the read indexes"))?;
        deferred.push(DeferredIndex {
            table,
            // A retry after a failed build skips those already built.
            build: build.replacen(" INDEX ", " INDEX IF NOT EXISTS ", 1),
            constraint,
        });
    }
    Ok(deferred)
}

impl PgReadStore {
    /// Builds the indexes a generation being built was loaded without, and
    /// makes the primary keys' indexes keys again. Idempotent (a retry after
    /// a failure builds what is missing); the list empties only once all
    /// are built, and callers wait while another builds them.
    async fn build_deferred_indexes(&self) -> Result<(), ReadStoreError> {
        let mut deferred = self.deferred_indexes.lock().await;
        if deferred.is_empty() {
            return Ok(());
        }
        let s = schema_name(&self.generation())?;
        // Largest tables first, taken in turn by two connections, so that
        // two backends (two cores) sort at once and finish together. Each
        // build commits on its own: a build's lock on its table is then
        // never held while it waits for the other connection's.
        let sizes: HashMap<String, i64> = {
            let client = self.client().await?;
            client
                .query(
                    "SELECT c.relname::text, pg_relation_size(c.oid) FROM pg_class c
                     JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = $1 AND c.relkind = 'r'",
                    &[&s],
                )
                .await
                .map_err(pg("sizing the read tables"))?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<_, tokio_postgres::Error>>()
                .map_err(pg("sizing the read tables"))?
        };
        let mut order: Vec<&DeferredIndex> = deferred.iter().collect();
        order.sort_by_key(|d| std::cmp::Reverse(sizes.get(&d.table).copied().unwrap_or(0)));
        let queue = Mutex::new(order.into_iter());
        let build = || async {
            let mut client = None;
            loop {
                let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
                let Some(index) = next else {
                    return Ok::<(), ReadStoreError>(());
                };
                let client = match &mut client {
                    Some(client) => client,
                    None => client.insert(self.client().await?),
                };
                let tx = client
                    .transaction()
                    .await
                    .map_err(pg("building the read indexes"))?;
                relax_durability(&tx).await?;
                tx.batch_execute("SET LOCAL maintenance_work_mem = '256MB'")
                    .await
                    .map_err(pg("building the read indexes"))?;
                tx.batch_execute(&index.build)
                    .await
                    .map_err(pg("building the read indexes"))?;
                tx.commit().await.map_err(pg("building the read indexes"))?;
            }
        };
        futures::try_join!(build(), build())?;
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(pg("restoring the primary keys"))?;
        relax_durability(&tx).await?;
        let keys: HashSet<String> = first_column(
            &tx,
            "SELECT t.relname::text FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname = $1 AND c.contype = 'p'",
            &[&s],
            "restoring the primary keys",
        )
        .await?;
        for index in deferred.iter().filter(|d| !keys.contains(&d.table)) {
            if let Some(constraint) = &index.constraint {
                tx.batch_execute(constraint)
                    .await
                    .map_err(pg("restoring the primary keys"))?;
            }
        }
        tx.commit()
            .await
            .map_err(pg("restoring the primary keys"))?;
        deferred.clear();
        Ok(())
    }
}

/// A generation being built is abandoned after a crash, so its commits need
/// not wait for the disk; `seal` commits synchronously, which flushes the
/// WAL up to and including all of them.
async fn relax_durability(tx: &Transaction<'_>) -> Result<(), ReadStoreError> {
    tx.batch_execute("SET LOCAL synchronous_commit = off")
        .await
        .map_err(pg("relaxing durability of a build"))
}

async fn lock_migrations(tx: &Transaction<'_>) -> Result<(), ReadStoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg("waiting for the migration lock"))?;
    Ok(())
}

/// Applies the migrations `scope` has not had yet. Call under the migration
/// lock.
async fn migrate(
    tx: &Transaction<'_>,
    scope: &str,
    migrations: &[&str],
    schema: &str,
) -> Result<(), ReadStoreError> {
    let applied: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM tracker_control.schema_migrations WHERE scope = $1",
            &[&scope],
        )
        .await
        .map_err(pg("reading the schema version"))?
        .try_get(0)
        .map_err(pg("reading the schema version"))?;
    let applied = usize::try_from(applied).unwrap_or(0);
    if applied > migrations.len() {
        return Err(ReadStoreError::Schema(format!(
            "{scope} has schema version {applied}, newer than this build knows ({})",
            migrations.len()
        )));
    }
    for (i, sql) in migrations.iter().enumerate().skip(applied) {
        tx.batch_execute(&sql.replace("{s}", schema))
            .await
            .map_err(|e| storage(format!("migrating {scope} to version {}: {e}", i + 1)))?;
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO tracker_control.schema_migrations (scope, version) VALUES ($1, $2)",
            &[&scope, &version],
        )
        .await
        .map_err(pg("recording a migration"))?;
    }
    Ok(())
}

/// The first column of each row `sql` returns (catalog and control-table
/// lists), with `context` in the error.
async fn first_column<T, C>(
    client: &impl deadpool_postgres::GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    context: &'static str,
) -> Result<C, ReadStoreError>
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
    C: FromIterator<T>,
{
    client
        .query(sql, params)
        .await
        .map_err(pg(context))?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<C, _>>()
        .map_err(pg(context))
}

async fn current_generation(
    client: &impl deadpool_postgres::GenericClient,
) -> Result<Option<String>, ReadStoreError> {
    let row = client
        .query_opt(
            "SELECT name FROM tracker_control.current_generation WHERE id = 1",
            &[],
        )
        .await
        .map_err(pg("reading the current generation"))?;
    let name: Option<String> = row
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(pg("reading the current generation"))?;
    if let Some(name) = &name {
        schema_name(name)?;
    }
    Ok(name)
}

/// Registers the next generation (`g1`, `g2`, ...) and creates its schema,
/// empty. Call under the migration lock.
async fn register_generation(tx: &Transaction<'_>) -> Result<String, ReadStoreError> {
    let next: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(number), 0) + 1 FROM tracker_control.generations",
            &[],
        )
        .await
        .map_err(pg("numbering a new generation"))?
        .try_get(0)
        .map_err(pg("numbering a new generation"))?;
    let name = format!("g{next}");
    let schema = schema_name(&name)?;
    tx.execute(
        "INSERT INTO tracker_control.generations (name, number, created_at) VALUES ($1, $2, now())",
        &[&name, &next],
    )
    .await
    .map_err(pg("registering a new generation"))?;
    // A leftover of an abandoned rebuild with the same name would hold stale
    // rows: start empty.
    tx.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .map_err(pg("clearing a leftover generation"))?;
    tx.execute(
        "DELETE FROM tracker_control.schema_migrations WHERE scope = $1",
        &[&name],
    )
    .await
    .map_err(pg("clearing a leftover generation"))?;
    migrate(tx, &name, GENERATION_MIGRATIONS, &schema).await?;
    Ok(name)
}

/// Prepares (once per connection) and runs one statement.
async fn exec(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let stmt = tx.prepare_cached(sql).await?;
    tx.execute(&stmt, params).await
}

async fn query(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let stmt = tx.prepare_cached(sql).await?;
    tx.query(&stmt, params).await
}

/// `INSERT INTO {s}.{table} (cols) SELECT * FROM UNNEST(...) ON CONFLICT DO
/// NOTHING RETURNING cols`: the keys that were new.
fn insert_keys_sql(s: &str, table: &str, columns: &[(&str, &str)]) -> String {
    let names: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
    let types: Vec<&str> = columns.iter().map(|(_, t)| *t).collect();
    let names = names.join(", ");
    format!(
        "INSERT INTO {s}.{table} ({names}) SELECT * FROM {} ON CONFLICT DO NOTHING RETURNING {names}",
        unnest(&types.join(", "))
    )
}

async fn new_pairs(
    tx: &Transaction<'_>,
    sql: String,
    keys: &FxHashSet<(u64, u64)>,
) -> Result<FxHashSet<(u64, u64)>, ReadStoreError> {
    if keys.is_empty() {
        return Ok(FxHashSet::default());
    }
    // Sorted, so that concurrent writers lock rows in one order.
    let mut sorted: Vec<(u64, u64)> = keys.iter().copied().collect();
    sorted.sort_unstable();
    let a: Vec<i64> = sorted.iter().map(|k| sql_id(k.0)).collect();
    let b: Vec<i64> = sorted.iter().map(|k| sql_id(k.1)).collect();
    let rows = query(tx, &sql, &[&a, &b])
        .await
        .map_err(pg("recording membership keys"))?;
    rows.iter()
        .map(|r| Ok((from_sql_id(r.try_get(0)?), from_sql_id(r.try_get(1)?))))
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(pg("recording membership keys"))
}

async fn new_triples(
    tx: &Transaction<'_>,
    sql: String,
    keys: &FxHashSet<(u64, u64, u64)>,
) -> Result<FxHashSet<(u64, u64, u64)>, ReadStoreError> {
    if keys.is_empty() {
        return Ok(FxHashSet::default());
    }
    let mut sorted: Vec<(u64, u64, u64)> = keys.iter().copied().collect();
    sorted.sort_unstable();
    let a: Vec<i64> = sorted.iter().map(|k| sql_id(k.0)).collect();
    let b: Vec<i64> = sorted.iter().map(|k| sql_id(k.1)).collect();
    let c: Vec<i64> = sorted.iter().map(|k| sql_id(k.2)).collect();
    let rows = query(tx, &sql, &[&a, &b, &c])
        .await
        .map_err(pg("recording membership keys"))?;
    rows.iter()
        .map(|r| {
            Ok((
                from_sql_id(r.try_get(0)?),
                from_sql_id(r.try_get(1)?),
                from_sql_id(r.try_get(2)?),
            ))
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(pg("recording membership keys"))
}

async fn new_day_learners(
    tx: &Transaction<'_>,
    sql: String,
    keys: &FxHashSet<(u64, String, u64)>,
) -> Result<FxHashSet<(u64, String, u64)>, ReadStoreError> {
    if keys.is_empty() {
        return Ok(FxHashSet::default());
    }
    let mut sorted: Vec<&(u64, String, u64)> = keys.iter().collect();
    sorted.sort_unstable();
    let a: Vec<i64> = sorted.iter().map(|k| sql_id(k.0)).collect();
    let b: Vec<&str> = sorted.iter().map(|k| k.1.as_str()).collect();
    let c: Vec<i64> = sorted.iter().map(|k| sql_id(k.2)).collect();
    let rows = query(tx, &sql, &[&a, &b, &c])
        .await
        .map_err(pg("recording membership keys"))?;
    rows.iter()
        .map(|r| {
            Ok((
                from_sql_id(r.try_get(0)?),
                r.try_get::<_, String>(1)?,
                from_sql_id(r.try_get(2)?),
            ))
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(pg("recording membership keys"))
}

/// Inserts the keys, returning those that were not there before: one
/// statement per membership table, all pipelined.
async fn insert_new_keys(
    tx: &Transaction<'_>,
    s: &str,
    kind: ProjectionKind,
    keys: &MembershipKeys,
) -> Result<MembershipKeys, ReadStoreError> {
    const I: (&str, &str) = ("institution_id", "bigint");
    const U: (&str, &str) = ("user_id", "bigint");
    const T: (&str, &str) = ("trail_id", "bigint");
    const C: (&str, &str) = ("course_id", "bigint");
    const D: (&str, &str) = ("day", "text");
    let mut new = MembershipKeys::default();
    match kind {
        ProjectionKind::Institutions => {
            (
                new.institution_learners,
                new.institution_trails,
                new.institution_courses,
                new.trail_learners,
                new.course_learners,
                new.trail_courses,
                new.day_learners,
            ) = futures::try_join!(
                new_pairs(
                    tx,
                    insert_keys_sql(s, "inst_m_learners", &[I, U]),
                    &keys.institution_learners
                ),
                new_pairs(
                    tx,
                    insert_keys_sql(s, "inst_m_trails", &[I, T]),
                    &keys.institution_trails
                ),
                new_pairs(
                    tx,
                    insert_keys_sql(s, "inst_m_courses", &[I, C]),
                    &keys.institution_courses
                ),
                new_triples(
                    tx,
                    insert_keys_sql(s, "inst_m_trail_learners", &[I, T, U]),
                    &keys.trail_learners
                ),
                new_triples(
                    tx,
                    insert_keys_sql(s, "inst_m_course_learners", &[I, C, U]),
                    &keys.course_learners
                ),
                new_triples(
                    tx,
                    insert_keys_sql(s, "inst_trail_courses", &[I, T, C]),
                    &keys.trail_courses
                ),
                new_day_learners(
                    tx,
                    insert_keys_sql(s, "inst_m_day_learners", &[I, D, U]),
                    &keys.day_learners
                ),
            )?;
        }
        ProjectionKind::Learners => {
            // A learner's trail is new exactly when its `lrn_learner_trails`
            // row is. That row is written later in this transaction, and
            // the batch's lease makes this the only writer of its
            // institutions, so the keys without a row are the new ones.
            new.trail_learners = new_triples(
                tx,
                format!(
                    "SELECT k.i, k.t, k.u FROM {} AS k(i, t, u)
                     WHERE NOT EXISTS (SELECT 1 FROM {s}.lrn_learner_trails l
                       WHERE l.institution_id = k.i AND l.user_id = k.u AND l.trail_id = k.t)",
                    unnest("bigint, bigint, bigint")
                ),
                &keys.trail_learners,
            )
            .await?;
        }
    }
    Ok(new)
}

async fn write_summaries(
    tx: &Transaction<'_>,
    s: &str,
    rows: &FxHashMap<u64, SummaryDelta>,
) -> Result<(), ReadStoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let mut institution = Vec::with_capacity(n);
    let mut completions = Vec::with_capacity(n);
    let mut learners = Vec::with_capacity(n);
    let mut trails = Vec::with_capacity(n);
    let mut courses = Vec::with_capacity(n);
    let mut first = Vec::with_capacity(n);
    let mut last = Vec::with_capacity(n);
    let mut position = Vec::with_capacity(n);
    for (i, d) in sorted(rows) {
        institution.push(sql_id(*i));
        completions.push(d.completions as i64);
        learners.push(d.new_learners as i64);
        trails.push(d.new_trails as i64);
        courses.push(d.new_courses as i64);
        first.push(pg_time(d.span.first));
        last.push(pg_time(d.span.last));
        position.push(sql_position(d.last_position)?);
    }
    let sql = format!(
        "INSERT INTO {s}.inst_summary AS t (institution_id, completions, learners, trails,
           courses, first_completed_at, last_completed_at, last_position)
         SELECT * FROM {}
         ON CONFLICT (institution_id) DO UPDATE SET
           completions = t.completions + excluded.completions,
           learners = t.learners + excluded.learners,
           trails = t.trails + excluded.trails,
           courses = t.courses + excluded.courses,
           first_completed_at = LEAST(t.first_completed_at, excluded.first_completed_at),
           last_completed_at = GREATEST(t.last_completed_at, excluded.last_completed_at),
           last_position = GREATEST(t.last_position, excluded.last_position)",
        unnest("bigint, bigint, bigint, bigint, bigint, timestamptz, timestamptz, bigint")
    );
    exec(
        tx,
        &sql,
        &[
            &institution,
            &completions,
            &learners,
            &trails,
            &courses,
            &first,
            &last,
            &position,
        ],
    )
    .await
    .map_err(pg("writing inst_summary"))?;
    Ok(())
}

async fn write_trails(
    tx: &Transaction<'_>,
    s: &str,
    rows: &FxHashMap<(u64, u64), TrailDelta>,
) -> Result<(), ReadStoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let mut institution = Vec::with_capacity(n);
    let mut trail = Vec::with_capacity(n);
    let mut name = Vec::with_capacity(n);
    let mut name_position = Vec::with_capacity(n);
    let mut completions = Vec::with_capacity(n);
    let mut learners = Vec::with_capacity(n);
    let mut first = Vec::with_capacity(n);
    let mut last = Vec::with_capacity(n);
    for ((i, t), d) in sorted(rows) {
        institution.push(sql_id(*i));
        trail.push(sql_id(*t));
        name.push(d.name.value.as_str());
        name_position.push(sql_position(d.name.position)?);
        completions.push(d.completions as i64);
        learners.push(d.new_learners as i64);
        first.push(pg_time(d.span.first));
        last.push(pg_time(d.span.last));
    }
    let sql = format!(
        "INSERT INTO {s}.inst_trails AS t (institution_id, trail_id, name, name_position,
           completions, learners, first_completed_at, last_completed_at)
         SELECT * FROM {}
         ON CONFLICT (institution_id, trail_id) DO UPDATE SET
           name = CASE WHEN excluded.name_position > t.name_position THEN excluded.name ELSE t.name END,
           name_position = GREATEST(t.name_position, excluded.name_position),
           completions = t.completions + excluded.completions,
           learners = t.learners + excluded.learners,
           first_completed_at = LEAST(t.first_completed_at, excluded.first_completed_at),
           last_completed_at = GREATEST(t.last_completed_at, excluded.last_completed_at)",
        unnest("bigint, bigint, text, bigint, bigint, bigint, timestamptz, timestamptz")
    );
    exec(
        tx,
        &sql,
        &[
            &institution,
            &trail,
            &name,
            &name_position,
            &completions,
            &learners,
            &first,
            &last,
        ],
    )
    .await
    .map_err(pg("writing inst_trails"))?;
    Ok(())
}

async fn write_courses(
    tx: &Transaction<'_>,
    s: &str,
    rows: &FxHashMap<(u64, u64), CourseDelta>,
) -> Result<(), ReadStoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let mut institution = Vec::with_capacity(n);
    let mut course = Vec::with_capacity(n);
    let mut title = Vec::with_capacity(n);
    let mut title_position = Vec::with_capacity(n);
    let mut completions = Vec::with_capacity(n);
    let mut learners = Vec::with_capacity(n);
    for ((i, c), d) in sorted(rows) {
        institution.push(sql_id(*i));
        course.push(sql_id(*c));
        title.push(d.title.value.as_str());
        title_position.push(sql_position(d.title.position)?);
        completions.push(d.completions as i64);
        learners.push(d.new_learners as i64);
    }
    let sql = format!(
        "INSERT INTO {s}.inst_courses AS t (institution_id, course_id, title, title_position,
           completions, learners)
         SELECT * FROM {}
         ON CONFLICT (institution_id, course_id) DO UPDATE SET
           title = CASE WHEN excluded.title_position > t.title_position THEN excluded.title ELSE t.title END,
           title_position = GREATEST(t.title_position, excluded.title_position),
           completions = t.completions + excluded.completions,
           learners = t.learners + excluded.learners",
        unnest("bigint, bigint, text, bigint, bigint, bigint")
    );
    exec(
        tx,
        &sql,
        &[
            &institution,
            &course,
            &title,
            &title_position,
            &completions,
            &learners,
        ],
    )
    .await
    .map_err(pg("writing inst_courses"))?;
    Ok(())
}

async fn write_days(
    tx: &Transaction<'_>,
    s: &str,
    rows: &FxHashMap<(u64, String), DayDelta>,
) -> Result<(), ReadStoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let mut institution = Vec::with_capacity(n);
    let mut day = Vec::with_capacity(n);
    let mut completions = Vec::with_capacity(n);
    let mut learners = Vec::with_capacity(n);
    for ((i, d), delta) in sorted(rows) {
        institution.push(sql_id(*i));
        day.push(d.as_str());
        completions.push(delta.completions as i64);
        learners.push(delta.new_learners as i64);
    }
    let sql = format!(
        "INSERT INTO {s}.inst_daily AS t (institution_id, day, completions, learners)
         SELECT * FROM {}
         ON CONFLICT (institution_id, day) DO UPDATE SET
           completions = t.completions + excluded.completions,
           learners = t.learners + excluded.learners",
        unnest("bigint, text, bigint, bigint")
    );
    exec(tx, &sql, &[&institution, &day, &completions, &learners])
        .await
        .map_err(pg("writing inst_daily"))?;
    Ok(())
}

async fn write_learners(
    tx: &Transaction<'_>,
    s: &str,
    rows: &FxHashMap<(u64, u64), LearnerDelta>,
) -> Result<(), ReadStoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let mut institution = Vec::with_capacity(n);
    let mut user = Vec::with_capacity(n);
    let mut name = Vec::with_capacity(n);
    let mut email = Vec::with_capacity(n);
    let mut profile_position = Vec::with_capacity(n);
    let mut trails = Vec::with_capacity(n);
    let mut completions = Vec::with_capacity(n);
    let mut first = Vec::with_capacity(n);
    let mut last = Vec::with_capacity(n);
    for ((i, u), d) in sorted(rows) {
        institution.push(sql_id(*i));
        user.push(sql_id(*u));
        name.push(d.profile.value.0.as_str());
        email.push(d.profile.value.1.as_str());
        profile_position.push(sql_position(d.profile.position)?);
        trails.push(d.new_trails as i64);
        completions.push(d.completions as i64);
        first.push(pg_time(d.span.first));
        last.push(pg_time(d.span.last));
    }
    let sql = format!(
        "INSERT INTO {s}.lrn_learners AS t (institution_id, user_id, name, email,
           profile_position, trails, completions, first_completed_at, last_completed_at)
         SELECT * FROM {}
         ON CONFLICT (institution_id, user_id) DO UPDATE SET
           name = CASE WHEN excluded.profile_position > t.profile_position THEN excluded.name ELSE t.name END,
           email = CASE WHEN excluded.profile_position > t.profile_position THEN excluded.email ELSE t.email END,
           profile_position = GREATEST(t.profile_position, excluded.profile_position),
           trails = t.trails + excluded.trails,
           completions = t.completions + excluded.completions,
           first_completed_at = LEAST(t.first_completed_at, excluded.first_completed_at),
           last_completed_at = GREATEST(t.last_completed_at, excluded.last_completed_at)",
        unnest("bigint, bigint, text, text, bigint, bigint, bigint, timestamptz, timestamptz")
    );
    exec(
        tx,
        &sql,
        &[
            &institution,
            &user,
            &name,
            &email,
            &profile_position,
            &trails,
            &completions,
            &first,
            &last,
        ],
    )
    .await
    .map_err(pg("writing lrn_learners"))?;
    Ok(())
}

async fn write_learner_trails(
    tx: &Transaction<'_>,
    s: &str,
    rows: &FxHashMap<(u64, u64, u64), LearnerTrailDelta>,
) -> Result<(), ReadStoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let mut institution = Vec::with_capacity(n);
    let mut user = Vec::with_capacity(n);
    let mut trail = Vec::with_capacity(n);
    let mut completions = Vec::with_capacity(n);
    let mut first = Vec::with_capacity(n);
    let mut last = Vec::with_capacity(n);
    for ((i, u, t), d) in sorted(rows) {
        institution.push(sql_id(*i));
        user.push(sql_id(*u));
        trail.push(sql_id(*t));
        completions.push(d.completions as i64);
        first.push(pg_time(d.span.first));
        last.push(pg_time(d.span.last));
    }
    let sql = format!(
        "INSERT INTO {s}.lrn_learner_trails AS t (institution_id, user_id, trail_id,
           completions, first_completed_at, last_completed_at)
         SELECT * FROM {}
         ON CONFLICT (institution_id, user_id, trail_id) DO UPDATE SET
           completions = t.completions + excluded.completions,
           first_completed_at = LEAST(t.first_completed_at, excluded.first_completed_at),
           last_completed_at = GREATEST(t.last_completed_at, excluded.last_completed_at)",
        unnest("bigint, bigint, bigint, bigint, timestamptz, timestamptz")
    );
    exec(
        tx,
        &sql,
        &[&institution, &user, &trail, &completions, &first, &last],
    )
    .await
    .map_err(pg("writing lrn_learner_trails"))?;
    Ok(())
}

async fn write_completions(
    tx: &Transaction<'_>,
    s: &str,
    rows: &[Completion],
) -> Result<(), ReadStoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let mut position = Vec::with_capacity(n);
    let mut event_id = Vec::with_capacity(n);
    let mut institution = Vec::with_capacity(n);
    let mut user = Vec::with_capacity(n);
    let mut trail = Vec::with_capacity(n);
    let mut trail_name = Vec::with_capacity(n);
    let mut finished_at_raw = Vec::with_capacity(n);
    let mut finished_at = Vec::with_capacity(n);
    let mut day = Vec::with_capacity(n);
    let mut courses = Vec::with_capacity(n);
    for c in rows {
        position.push(sql_position(c.position)?);
        event_id.push(c.event_id);
        institution.push(sql_id(c.institution_id));
        user.push(sql_id(c.user_id));
        trail.push(sql_id(c.trail_id));
        trail_name.push(c.trail_name.as_str());
        finished_at_raw.push(c.finished_at_raw.as_str());
        finished_at.push(pg_time(c.finished_at));
        day.push(c.day.as_str());
        courses.push(courses_json(c));
    }
    let sql = format!(
        "INSERT INTO {s}.lrn_completions (position, event_id, institution_id, user_id, trail_id,
           trail_name, finished_at_raw, finished_at, day, courses)
         SELECT * FROM {}",
        unnest("bigint, uuid, bigint, bigint, bigint, text, text, timestamptz, text, text")
    );
    exec(
        tx,
        &sql,
        &[
            &position,
            &event_id,
            &institution,
            &user,
            &trail,
            &trail_name,
            &finished_at_raw,
            &finished_at,
            &day,
            &courses,
        ],
    )
    .await
    .map_err(pg("writing lrn_completions"))?;
    Ok(())
}

async fn write_dead_letters(
    tx: &Transaction<'_>,
    s: &str,
    rows: &[&DeadLetter],
) -> Result<(), ReadStoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let mut projection = Vec::with_capacity(n);
    let mut position = Vec::with_capacity(n);
    let mut event_id = Vec::with_capacity(n);
    let mut event_type = Vec::with_capacity(n);
    let mut error = Vec::with_capacity(n);
    let mut recorded_at = Vec::with_capacity(n);
    for d in rows {
        projection.push(d.projection.as_str());
        position.push(sql_position(d.position)?);
        event_id.push(d.event_id);
        event_type.push(d.event_type.as_str());
        error.push(d.error.as_str());
        recorded_at.push(pg_time(d.recorded_at));
    }
    let sql = format!(
        "INSERT INTO {s}.dead_letters (projection, position, event_id, event_type, error,
           recorded_at)
         SELECT * FROM {} ON CONFLICT DO NOTHING",
        unnest("text, bigint, uuid, text, text, timestamptz")
    );
    exec(
        tx,
        &sql,
        &[
            &projection,
            &position,
            &event_id,
            &event_type,
            &error,
            &recorded_at,
        ],
    )
    .await
    .map_err(pg("writing dead_letters"))?;
    Ok(())
}

async fn write_plan(tx: &Transaction<'_>, s: &str, p: &Plan) -> Result<(), ReadStoreError> {
    futures::try_join!(
        write_summaries(tx, s, &p.summaries),
        write_trails(tx, s, &p.trails),
        write_courses(tx, s, &p.courses),
        write_days(tx, s, &p.days),
        write_learners(tx, s, &p.learners),
        write_learner_trails(tx, s, &p.learner_trails),
        write_completions(tx, s, &p.completions),
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Bulk loads of a rebuild: `COPY ... FROM STDIN (FORMAT binary)`.

/// A binary COPY into `{s}.{table}` with these columns.
struct Copy {
    writer: std::pin::Pin<Box<BinaryCopyInWriter>>,
    context: &'static str,
}

impl Copy {
    async fn start(
        tx: &Transaction<'_>,
        s: &str,
        table: &str,
        columns: &[(&str, Type)],
        context: &'static str,
    ) -> Result<Self, ReadStoreError> {
        let names: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
        let types: Vec<Type> = columns.iter().map(|(_, t)| t.clone()).collect();
        let sink = tx
            .copy_in(&format!(
                "COPY {s}.{table} ({}) FROM STDIN (FORMAT binary)",
                names.join(", ")
            ))
            .await
            .map_err(pg(context))?;
        Ok(Self {
            writer: Box::pin(BinaryCopyInWriter::new(sink, &types)),
            context,
        })
    }

    async fn row(&mut self, values: &[&(dyn ToSql + Sync)]) -> Result<(), ReadStoreError> {
        self.writer
            .as_mut()
            .write(values)
            .await
            .map_err(pg(self.context))
    }

    async fn finish(mut self) -> Result<(), ReadStoreError> {
        self.writer
            .as_mut()
            .finish()
            .await
            .map_err(pg(self.context))?;
        Ok(())
    }
}

const COMPLETION_COLUMNS: [(&str, Type); 10] = [
    ("position", Type::INT8),
    ("event_id", Type::UUID),
    ("institution_id", Type::INT8),
    ("user_id", Type::INT8),
    ("trail_id", Type::INT8),
    ("trail_name", Type::TEXT),
    ("finished_at_raw", Type::TEXT),
    ("finished_at", Type::TIMESTAMPTZ),
    ("day", Type::TEXT),
    ("courses", Type::TEXT),
];

async fn copy_completions(
    tx: &Transaction<'_>,
    s: &str,
    rows: &[Completion],
) -> Result<(), ReadStoreError> {
    let mut copy = Copy::start(
        tx,
        s,
        "lrn_completions",
        &COMPLETION_COLUMNS,
        "loading lrn_completions",
    )
    .await?;
    for c in rows {
        copy.row(&[
            &sql_position(c.position)?,
            &c.event_id,
            &sql_id(c.institution_id),
            &sql_id(c.user_id),
            &sql_id(c.trail_id),
            &c.trail_name,
            &c.finished_at_raw,
            &pg_time(c.finished_at),
            &c.day,
            &courses_json(c),
        ])
        .await?;
    }
    copy.finish().await
}

const I8: Type = Type::INT8;

async fn copy_pairs(
    tx: &Transaction<'_>,
    s: &str,
    table: &str,
    columns: [&str; 2],
    keys: &[(u64, u64)],
) -> Result<(), ReadStoreError> {
    let [a, b] = columns;
    let mut copy =
        Copy::start(tx, s, table, &[(a, I8), (b, I8)], "loading membership keys").await?;
    for (x, y) in keys {
        copy.row(&[&sql_id(*x), &sql_id(*y)]).await?;
    }
    copy.finish().await
}

async fn copy_triples(
    tx: &Transaction<'_>,
    s: &str,
    table: &str,
    columns: [&str; 3],
    keys: &[(u64, u64, u64)],
) -> Result<(), ReadStoreError> {
    let [a, b, c] = columns;
    let mut copy = Copy::start(
        tx,
        s,
        table,
        &[(a, I8), (b, I8), (c, I8)],
        "loading membership keys",
    )
    .await?;
    for (x, y, z) in keys {
        copy.row(&[&sql_id(*x), &sql_id(*y), &sql_id(*z)]).await?;
    }
    copy.finish().await
}

/// Every membership table of `kind` but `inst_m_course_learners` (the
/// largest, one key per learner and course: loaded beside the rest on
/// another connection).
async fn copy_membership(
    tx: &Transaction<'_>,
    s: &str,
    kind: ProjectionKind,
    m: &Membership,
) -> Result<(), ReadStoreError> {
    const I: &str = "institution_id";
    const U: &str = "user_id";
    const T: &str = "trail_id";
    const C: &str = "course_id";
    match kind {
        ProjectionKind::Institutions => {
            copy_pairs(tx, s, "inst_m_learners", [I, U], &m.institution_learners).await?;
            copy_pairs(tx, s, "inst_m_trails", [I, T], &m.institution_trails).await?;
            copy_pairs(tx, s, "inst_m_courses", [I, C], &m.institution_courses).await?;
            copy_triples(tx, s, "inst_m_trail_learners", [I, T, U], &m.trail_learners).await?;
            copy_triples(tx, s, "inst_trail_courses", [I, T, C], &m.trail_courses).await?;
            let mut copy = Copy::start(
                tx,
                s,
                "inst_m_day_learners",
                &[(I, I8), ("day", Type::TEXT), (U, I8)],
                "loading membership keys",
            )
            .await?;
            for (i, d, u) in &m.day_learners {
                let day = m
                    .days
                    .get(*d as usize)
                    .ok_or_else(|| storage(format!("day index {d} out of range")))?;
                copy.row(&[&sql_id(*i), day, &sql_id(*u)]).await?;
            }
            copy.finish().await?;
        }
        // A learner's trails are the `lrn_learner_trails` rows.
        ProjectionKind::Learners => {}
    }
    Ok(())
}

async fn copy_plan(tx: &Transaction<'_>, s: &str, p: &Plan) -> Result<(), ReadStoreError> {
    const TS: Type = Type::TIMESTAMPTZ;
    const TEXT: Type = Type::TEXT;
    if !p.summaries.is_empty() {
        let mut copy = Copy::start(
            tx,
            s,
            "inst_summary",
            &[
                ("institution_id", I8),
                ("completions", I8),
                ("learners", I8),
                ("trails", I8),
                ("courses", I8),
                ("first_completed_at", TS),
                ("last_completed_at", TS),
                ("last_position", I8),
            ],
            "loading inst_summary",
        )
        .await?;
        for (i, d) in sorted(&p.summaries) {
            copy.row(&[
                &sql_id(*i),
                &(d.completions as i64),
                &(d.new_learners as i64),
                &(d.new_trails as i64),
                &(d.new_courses as i64),
                &pg_time(d.span.first),
                &pg_time(d.span.last),
                &sql_position(d.last_position)?,
            ])
            .await?;
        }
        copy.finish().await?;
    }
    if !p.trails.is_empty() {
        let mut copy = Copy::start(
            tx,
            s,
            "inst_trails",
            &[
                ("institution_id", I8),
                ("trail_id", I8),
                ("name", TEXT),
                ("name_position", I8),
                ("completions", I8),
                ("learners", I8),
                ("first_completed_at", TS),
                ("last_completed_at", TS),
            ],
            "loading inst_trails",
        )
        .await?;
        for ((i, t), d) in sorted(&p.trails) {
            copy.row(&[
                &sql_id(*i),
                &sql_id(*t),
                &d.name.value,
                &sql_position(d.name.position)?,
                &(d.completions as i64),
                &(d.new_learners as i64),
                &pg_time(d.span.first),
                &pg_time(d.span.last),
            ])
            .await?;
        }
        copy.finish().await?;
    }
    if !p.courses.is_empty() {
        let mut copy = Copy::start(
            tx,
            s,
            "inst_courses",
            &[
                ("institution_id", I8),
                ("course_id", I8),
                ("title", TEXT),
                ("title_position", I8),
                ("completions", I8),
                ("learners", I8),
            ],
            "loading inst_courses",
        )
        .await?;
        for ((i, c), d) in sorted(&p.courses) {
            copy.row(&[
                &sql_id(*i),
                &sql_id(*c),
                &d.title.value,
                &sql_position(d.title.position)?,
                &(d.completions as i64),
                &(d.new_learners as i64),
            ])
            .await?;
        }
        copy.finish().await?;
    }
    if !p.days.is_empty() {
        let mut copy = Copy::start(
            tx,
            s,
            "inst_daily",
            &[
                ("institution_id", I8),
                ("day", TEXT),
                ("completions", I8),
                ("learners", I8),
            ],
            "loading inst_daily",
        )
        .await?;
        for ((i, day), d) in sorted(&p.days) {
            copy.row(&[
                &sql_id(*i),
                day,
                &(d.completions as i64),
                &(d.new_learners as i64),
            ])
            .await?;
        }
        copy.finish().await?;
    }
    if !p.learners.is_empty() {
        let mut copy = Copy::start(
            tx,
            s,
            "lrn_learners",
            &[
                ("institution_id", I8),
                ("user_id", I8),
                ("name", TEXT),
                ("email", TEXT),
                ("profile_position", I8),
                ("trails", I8),
                ("completions", I8),
                ("first_completed_at", TS),
                ("last_completed_at", TS),
            ],
            "loading lrn_learners",
        )
        .await?;
        for ((i, u), d) in sorted(&p.learners) {
            copy.row(&[
                &sql_id(*i),
                &sql_id(*u),
                &d.profile.value.0,
                &d.profile.value.1,
                &sql_position(d.profile.position)?,
                &(d.new_trails as i64),
                &(d.completions as i64),
                &pg_time(d.span.first),
                &pg_time(d.span.last),
            ])
            .await?;
        }
        copy.finish().await?;
    }
    if !p.learner_trails.is_empty() {
        let mut copy = Copy::start(
            tx,
            s,
            "lrn_learner_trails",
            &[
                ("institution_id", I8),
                ("user_id", I8),
                ("trail_id", I8),
                ("completions", I8),
                ("first_completed_at", TS),
                ("last_completed_at", TS),
            ],
            "loading lrn_learner_trails",
        )
        .await?;
        for ((i, u, t), d) in sorted(&p.learner_trails) {
            copy.row(&[
                &sql_id(*i),
                &sql_id(*u),
                &sql_id(*t),
                &(d.completions as i64),
                &pg_time(d.span.first),
                &pg_time(d.span.last),
            ])
            .await?;
        }
        copy.finish().await?;
    }
    Ok(())
}

fn render(row: &Row, i: usize) -> Result<String, tokio_postgres::Error> {
    let ty = row.columns()[i].type_();
    let text = if *ty == Type::INT8 {
        row.try_get::<_, Option<i64>>(i)?.map(|v| v.to_string())
    } else if *ty == Type::INT4 {
        row.try_get::<_, Option<i32>>(i)?.map(|v| v.to_string())
    } else if *ty == Type::TIMESTAMPTZ {
        row.try_get::<_, Option<DateTime<Utc>>>(i)?.map(sql_time)
    } else if *ty == Type::UUID {
        row.try_get::<_, Option<Uuid>>(i)?.map(|v| v.to_string())
    } else {
        // TEXT, and anything a later migration adds that reads as text.
        row.try_get::<_, Option<String>>(i)?
    };
    Ok(text.unwrap_or_else(|| "null".to_owned()))
}

#[async_trait]
impl ReadStore for PgReadStore {
    fn generation(&self) -> String {
        self.generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn checkpoint(&self, key: CheckpointKey) -> Result<Position, ReadStoreError> {
        let s = self.schema();
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT COALESCE((SELECT position FROM {s}.checkpoints WHERE key = $1),
                                 (SELECT position FROM {s}.checkpoints WHERE key = $2))"
            ))
            .await
            .map_err(pg("reading a checkpoint"))?;
        // A partition with no checkpoint of its own starts where the whole
        // projection stands.
        let whole = CheckpointKey::whole(key.projection).to_string();
        let position: Option<i64> = client
            .query_one(&stmt, &[&key.to_string(), &whole])
            .await
            .map_err(pg("reading a checkpoint"))?
            .try_get(0)
            .map_err(pg("reading a checkpoint"))?;
        Ok(position.and_then(|p| u64::try_from(p).ok()).unwrap_or(0))
    }

    async fn apply(&self, batch: ApplyBatch) -> Result<(), ReadStoreError> {
        // Its upserts need the primary keys of a generation being built.
        self.build_deferred_indexes().await?;
        let generation = self.generation();
        let s = schema_name(&generation)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg("starting a batch"))?;

        if self.follows_current {
            // FOR SHARE: a switch waits for batches in flight, and a batch
            // after the switch sees the new pointer.
            let current = query(
                &tx,
                "SELECT name FROM tracker_control.current_generation WHERE id = 1 FOR SHARE",
                &[],
            )
            .await
            .map_err(pg("reading the current generation"))?;
            if let Some(row) = current.first() {
                let current: String = row
                    .try_get(0)
                    .map_err(pg("reading the current generation"))?;
                if current != generation {
                    return Err(ReadStoreError::GenerationChanged {
                        from: generation,
                        to: current,
                    });
                }
            }
        }

        let key = batch.key;
        let key_text = key.to_string();
        if let Some((holder, ttl)) = &batch.lease {
            let renewed = exec(
                &tx,
                &format!(
                    "UPDATE {s}.leases
                     SET expires_at = clock_timestamp() + $3::bigint * interval '1 millisecond'
                     WHERE name = $1 AND holder = $2 AND expires_at > clock_timestamp()"
                ),
                &[&key_text, &holder.0, &lease_ms(*ttl)],
            )
            .await
            .map_err(pg("renewing the lease"))?;
            if renewed != 1 {
                return Err(ReadStoreError::LeaseLost(key_text));
            }
        }

        // Reads the checkpoint and locks its row until commit, so that two
        // writers of one key (without leases) apply one after the other, the
        // second seeing the first's checkpoint. A partition without its own
        // row starts from the whole projection's, as `checkpoint` does.
        let whole = CheckpointKey::whole(key.projection).to_string();
        let rows = query(
            &tx,
            &format!(
                "INSERT INTO {s}.checkpoints AS c (key, position)
                 VALUES ($1, COALESCE((SELECT position FROM {s}.checkpoints WHERE key = $2), 0))
                 ON CONFLICT (key) DO UPDATE SET position = c.position
                 RETURNING position"
            ),
            &[&key_text, &whole],
        )
        .await
        .map_err(pg("reading the checkpoint"))?;
        let checkpoint: i64 = rows
            .first()
            .ok_or_else(|| storage("reading the checkpoint: no row"))?
            .try_get(0)
            .map_err(pg("reading the checkpoint"))?;
        let checkpoint = u64::try_from(checkpoint).unwrap_or(0);
        if batch.through <= checkpoint {
            // Redelivered: already applied, nothing to do but keep the
            // lease renewed above (the runner counts on every batch
            // renewing it).
            tx.commit().await.map_err(pg("ending a batch"))?;
            return Ok(());
        }
        if checkpoint < batch.after {
            tx.rollback().await.map_err(pg("ending a batch"))?;
            return Err(ReadStoreError::Gap {
                key: batch.key.to_string(),
                checkpoint,
                after: batch.after,
            });
        }

        let completions: Vec<Completion> = batch
            .completions
            .into_iter()
            .filter(|c| c.position > checkpoint)
            .collect();
        let keys = membership_keys(key.projection, &completions);
        let new = insert_new_keys(&tx, &s, key.projection, &keys).await?;
        let p = plan(key.projection, &completions, &new);
        let dead_letters: Vec<&DeadLetter> = batch
            .dead_letters
            .iter()
            .filter(|d| d.position > checkpoint)
            .collect();
        let through = sql_position(batch.through)?;
        let checkpoint_sql =
            format!("UPDATE {s}.checkpoints SET position = GREATEST(position, $2) WHERE key = $1");
        futures::try_join!(
            write_plan(&tx, &s, &p),
            write_dead_letters(&tx, &s, &dead_letters),
            async {
                exec(&tx, &checkpoint_sql, &[&key_text, &through])
                    .await
                    .map_err(pg("writing the checkpoint"))
            },
        )?;
        tx.commit().await.map_err(pg("committing a batch"))
    }

    async fn load_completions(&self, rows: Arc<[Completion]>) -> Result<(), ReadStoreError> {
        let s = self.building()?;
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(pg("loading completions"))?;
        relax_durability(&tx).await?;
        copy_completions(&tx, &s, &rows).await?;
        tx.commit().await.map_err(pg("loading completions"))
    }

    async fn load_final(&self, load: FinalLoad) -> Result<(), ReadStoreError> {
        let s = self.building()?;
        let s = s.as_str();
        let load = &load;
        // The largest table on a connection of its own, so that two
        // backends share the institutions projection's load. Not one
        // transaction with the rest: nothing reads a generation before seal,
        // and a failure abandons it.
        let course_learners = async {
            if load.projection != ProjectionKind::Institutions {
                return Ok(());
            }
            let mut client = self.client().await?;
            let tx = client
                .transaction()
                .await
                .map_err(pg("loading a rebuilt projection"))?;
            relax_durability(&tx).await?;
            copy_triples(
                &tx,
                s,
                "inst_m_course_learners",
                ["institution_id", "course_id", "user_id"],
                &load.membership.course_learners,
            )
            .await?;
            tx.commit()
                .await
                .map_err(pg("loading a rebuilt projection"))
        };
        let rest = async {
            let mut client = self.client().await?;
            let tx = client
                .transaction()
                .await
                .map_err(pg("loading a rebuilt projection"))?;
            relax_durability(&tx).await?;
            copy_plan(&tx, s, &load.plan).await?;
            copy_membership(&tx, s, load.projection, &load.membership).await?;
            let dead_letters: Vec<&DeadLetter> = load.dead_letters.iter().collect();
            write_dead_letters(&tx, s, &dead_letters).await?;
            tx.execute(
                &format!("INSERT INTO {s}.checkpoints (key, position) VALUES ($1, $2)"),
                &[
                    &CheckpointKey::whole(load.projection).to_string(),
                    &sql_position(load.through)?,
                ],
            )
            .await
            .map_err(pg("writing the checkpoint"))?;
            tx.commit()
                .await
                .map_err(pg("loading a rebuilt projection"))
        };
        futures::try_join!(course_learners, rest)?;
        Ok(())
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<bool, ReadStoreError> {
        let s = self.schema();
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "INSERT INTO {s}.leases AS l (name, holder, expires_at)
                 VALUES ($1, $2, clock_timestamp() + $3::bigint * interval '1 millisecond')
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
                 WHERE l.holder = excluded.holder OR l.expires_at <= clock_timestamp()"
            ))
            .await
            .map_err(pg("taking a lease"))?;
        let changed = client
            .execute(&stmt, &[&name, &holder.0, &lease_ms(ttl)])
            .await
            .map_err(pg("taking a lease"))?;
        Ok(changed == 1)
    }

    async fn release_lease(&self, name: &str, holder: &LeaseHolder) -> Result<(), ReadStoreError> {
        let s = self.schema();
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "UPDATE {s}.leases SET expires_at = '-infinity' WHERE name = $1 AND holder = $2"
            ))
            .await
            .map_err(pg("releasing a lease"))?;
        client
            .execute(&stmt, &[&name, &holder.0])
            .await
            .map_err(pg("releasing a lease"))?;
        Ok(())
    }

    async fn live_leases(&self) -> Result<Vec<String>, ReadStoreError> {
        let s = self.schema();
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT name FROM {s}.leases WHERE expires_at > clock_timestamp() ORDER BY name"
            ))
            .await
            .map_err(pg("listing leases"))?;
        let rows = client
            .query(&stmt, &[])
            .await
            .map_err(pg("listing leases"))?;
        rows.iter()
            .map(|r| r.try_get::<_, String>(0))
            .collect::<Result<_, _>>()
            .map_err(pg("listing leases"))
    }

    async fn checkpoints(&self) -> Result<Vec<(String, Position)>, ReadStoreError> {
        let s = self.schema();
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT key, position FROM {s}.checkpoints ORDER BY key"
            ))
            .await
            .map_err(pg("listing checkpoints"))?;
        client
            .query(&stmt, &[])
            .await
            .map_err(pg("listing checkpoints"))?
            .iter()
            .map(|r| {
                let key: String = r.try_get(0)?;
                let position: i64 = r.try_get(1)?;
                Ok((key, u64::try_from(position).unwrap_or(0)))
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(pg("listing checkpoints"))
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, ReadStoreError> {
        let s = self.schema();
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT projection, position, event_id, event_type, error, recorded_at
                 FROM {s}.dead_letters ORDER BY position, projection LIMIT $1"
            ))
            .await
            .map_err(pg("listing dead letters"))?;
        client
            .query(&stmt, &[&i64::try_from(limit).unwrap_or(i64::MAX)])
            .await
            .map_err(pg("listing dead letters"))?
            .iter()
            .map(|r| {
                let position: i64 = r.try_get(1)?;
                Ok(DeadLetter {
                    projection: r.try_get(0)?,
                    position: u64::try_from(position).unwrap_or(0),
                    event_id: r.try_get(2)?,
                    event_type: r.try_get(3)?,
                    error: r.try_get(4)?,
                    recorded_at: r.try_get(5)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(pg("listing dead letters"))
    }

    async fn dead_letter_count(&self) -> Result<u64, ReadStoreError> {
        let s = self.schema();
        let client = self.client().await?;
        let n: i64 = client
            .query_one(&format!("SELECT COUNT(*) FROM {s}.dead_letters"), &[])
            .await
            .map_err(pg("counting dead letters"))?
            .try_get(0)
            .map_err(pg("counting dead letters"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn snapshot(&self) -> Result<Snapshot, ReadStoreError> {
        let s = self.schema();
        let mut client = self.client().await?;
        // One snapshot of the database for every table.
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg("taking a snapshot"))?;
        let mut tables = Vec::with_capacity(SNAPSHOT_TABLES.len());
        for (table, order, _) in SNAPSHOT_TABLES {
            let rows = tx
                .query(&format!("SELECT * FROM {s}.{table} ORDER BY {order}"), &[])
                .await
                .map_err(pg("taking a snapshot"))?;
            let rows = rows
                .iter()
                .map(|row| (0..row.len()).map(|i| render(row, i)).collect())
                .collect::<Result<Vec<Vec<String>>, _>>()
                .map_err(pg("taking a snapshot"))?;
            tables.push(((*table).to_owned(), rows));
        }
        tx.commit().await.map_err(pg("taking a snapshot"))?;
        Ok(Snapshot { tables })
    }

    async fn follow_current(&self) -> Result<bool, ReadStoreError> {
        if !self.follows_current {
            return Ok(false);
        }
        let current = {
            let client = self.client().await?;
            current_generation(&client).await?
        };
        let Some(current) = current else {
            return Ok(false);
        };
        if current == self.generation() {
            return Ok(false);
        }
        // The generation may have been created by an older build.
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg("migrating"))?;
        lock_migrations(&tx).await?;
        migrate(
            &tx,
            &current,
            GENERATION_MIGRATIONS,
            &schema_name(&current)?,
        )
        .await?;
        tx.commit().await.map_err(pg("migrating"))?;
        self.set_generation(current);
        Ok(true)
    }

    async fn create_generation(&self) -> Result<Box<dyn ReadStore>, ReadStoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(pg("creating a generation"))?;
        lock_migrations(&tx).await?;
        let generation = register_generation(&tx).await?;
        let deferred = defer_indexes(&tx, &schema_name(&generation)?).await?;
        tx.commit().await.map_err(pg("creating a generation"))?;
        Ok(Box::new(PgReadStore {
            pool: self.pool.clone(),
            generation: Arc::new(Mutex::new(generation)),
            follows_current: false,
            deferred_indexes: Arc::new(tokio::sync::Mutex::new(deferred)),
        }))
    }

    async fn seal(&self) -> Result<(), ReadStoreError> {
        let s = schema_name(&self.generation())?;
        self.build_deferred_indexes().await?;
        // Statistics for the planner (autovacuum would get there later), and
        // a synchronous commit: it flushes the WAL of every relaxed commit
        // of the build before it.
        let tables: Vec<String> = SNAPSHOT_TABLES
            .iter()
            .map(|(t, _, _)| format!("{s}.{t}"))
            .collect();
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(pg("sealing a generation"))?;
        tx.batch_execute(&format!(
            "SET LOCAL synchronous_commit = on; ANALYZE {}",
            tables.join(", ")
        ))
        .await
        .map_err(pg("sealing a generation"))?;
        tx.commit().await.map_err(pg("sealing a generation"))
    }

    async fn switch_to(&self, generation: &str) -> Result<(), ReadStoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(pg("switching generations"))?;
        let number: i64 = tx
            .query_opt(
                "SELECT number FROM tracker_control.generations WHERE name = $1",
                &[&generation],
            )
            .await
            .map_err(pg("switching generations"))?
            .ok_or_else(|| storage(format!("no generation named {generation}")))?
            .try_get(0)
            .map_err(pg("switching generations"))?;
        // Locks the pointer: waits for batches in flight (they hold it FOR
        // SHARE) and makes concurrent switches take turns.
        let previous: Option<i64> = tx
            .query_opt(
                "SELECT g.number FROM tracker_control.current_generation c
                 JOIN tracker_control.generations g ON g.name = c.name
                 WHERE c.id = 1 FOR UPDATE OF c",
                &[],
            )
            .await
            .map_err(pg("switching generations"))?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(pg("switching generations"))?;
        tx.execute(
            "INSERT INTO tracker_control.current_generation (id, name) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name",
            &[&generation],
        )
        .await
        .map_err(pg("switching generations"))?;
        // Keep the generation just replaced (for a look back or a switch
        // back); drop the ones before it.
        let keep_from = previous.unwrap_or(number).min(number);
        let obsolete: Vec<String> = first_column(
            &tx,
            "DELETE FROM tracker_control.generations WHERE number < $1 RETURNING name",
            &[&keep_from],
            "switching generations",
        )
        .await?;
        tx.execute(
            "DELETE FROM tracker_control.schema_migrations WHERE scope = ANY($1)",
            &[&obsolete],
        )
        .await
        .map_err(pg("switching generations"))?;
        tx.commit().await.map_err(pg("switching generations"))?;
        drop(client);
        // After the commit, and never failing the switch: the schemas of
        // unregistered generations are dropped now or at the next chance.
        self.drop_obsolete_schemas().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_names_are_checked_before_they_reach_sql() {
        assert_eq!(schema_name("g12").ok().as_deref(), Some("tracker_rm_g12"));
        assert!(schema_name("").is_err());
        assert!(schema_name("g1; DROP TABLE x").is_err());
        assert!(schema_name("G1").is_err());
    }

    #[test]
    fn unnest_numbers_parameters_in_order() {
        assert_eq!(unnest("bigint, text"), "UNNEST($1::bigint[], $2::text[])");
    }

    #[test]
    fn times_keep_whole_seconds_like_sqlite() {
        let t = DateTime::parse_from_rfc3339("2024-01-01T10:00:00.999999999Z")
            .map(|t| t.with_timezone(&Utc))
            .ok();
        let t = t.map(pg_time).map(sql_time);
        assert_eq!(t.as_deref(), Some("2024-01-01T10:00:00Z"));
    }
}
