//! Queries over the PostgreSQL read store: a pool of its own (queries never
//! wait behind projection batches for a connection), tables qualified by the
//! current generation's schema.
//!
//! Each answer is one `REPEATABLE READ READ ONLY` transaction, so the
//! checkpoint and the rows come from one snapshot; its statements are
//! pipelined. The transaction also reads the current-generation pointer: when
//! a rebuild moved it, the next answer reads the new schema. A schema dropped
//! under an answer (two switches since it was looked at) makes that answer
//! start over once on the current one.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Transaction};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, NoTls, Row};
use tracker_store::Position;
use uuid::Uuid;

use super::*;
use crate::plan::ProjectionKind;

const SCHEMA_PREFIX: &str = "tracker_rm_";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The PostgreSQL read models, for queries. Cheap to clone.
#[derive(Clone)]
pub struct PgQueries {
    pool: Pool,
    /// The generation answers read, as last seen in the pointer.
    generation: Arc<Mutex<String>>,
}

impl fmt::Debug for PgQueries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the URL: it may hold a password.
        f.debug_struct("PgQueries")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

type TxFuture<'t, T> = Pin<Box<dyn Future<Output = Result<T, QueryError>> + Send + 't>>;

/// A database error, kept apart when it means "the schema is gone".
enum Failure {
    SchemaGone,
    Other(QueryError),
}

fn pg(context: &'static str) -> impl Fn(tokio_postgres::Error) -> QueryError {
    move |e| storage(format!("{context}: {e}"))
}

fn schema_of(generation: &str) -> Result<String, QueryError> {
    let ok = !generation.is_empty()
        && generation.len() <= 40
        && generation
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(format!("{SCHEMA_PREFIX}{generation}"))
    } else {
        Err(storage(format!(
            "generation name {generation:?} is not a valid schema suffix"
        )))
    }
}

impl PgQueries {
    /// Connects to the read store at `url` (which a
    /// [`crate::postgres::PgReadStore`] has set up) with at most
    /// `max_connections` connections.
    pub async fn connect(url: &str, max_connections: usize) -> Result<Self, QueryError> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| storage(format!("not a PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("tracker-queries");
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
        let queries = Self {
            pool,
            generation: Arc::new(Mutex::new(String::new())),
        };
        // A standby (`read_store.query_url`) may not have replayed the
        // primary's schema yet: then the first query looks again.
        if !queries.refresh_generation().await? {
            tracing::warn!("the read store has no current generation yet; queries will look again");
        }
        Ok(queries)
    }

    fn generation(&self) -> String {
        self.generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_generation(&self, name: &str) {
        let mut g = self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *g != name {
            name.clone_into(&mut g);
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, QueryError> {
        self.pool
            .get()
            .await
            .map_err(|e| storage(format!("PostgreSQL connection: {e}")))
    }

    /// Reads which generation is current; false when there is none yet
    /// (no control schema, or no row in it).
    async fn refresh_generation(&self) -> Result<bool, QueryError> {
        let client = self.client().await?;
        let row = match client
            .query_opt(
                "SELECT name FROM tracker_control.current_generation WHERE id = 1",
                &[],
            )
            .await
        {
            Ok(row) => row,
            Err(e)
                if e.code().is_some_and(|c| {
                    *c == SqlState::UNDEFINED_TABLE || *c == SqlState::INVALID_SCHEMA_NAME
                }) =>
            {
                None
            }
            Err(e) => return Err(pg("reading the current generation")(e)),
        };
        let Some(row) = row else {
            return Ok(false);
        };
        let name: String = row
            .try_get(0)
            .map_err(pg("reading the current generation"))?;
        schema_of(&name)?;
        self.set_generation(&name);
        Ok(true)
    }

    /// The current generation is known, or an error saying there is none.
    async fn know_generation(&self) -> Result<(), QueryError> {
        if self.generation().is_empty() && !self.refresh_generation().await? {
            return Err(storage("the read store has no current generation yet"));
        }
        Ok(())
    }

    /// Runs `f` in one read-only snapshot of the current generation's schema,
    /// starting over once if that schema was dropped meanwhile.
    async fn run<T, F>(&self, f: F) -> Result<T, QueryError>
    where
        T: Send,
        F: for<'t, 'c> Fn(&'t Transaction<'c>, &'t str) -> TxFuture<'t, T> + Send + Sync,
    {
        self.know_generation().await?;
        match self.attempt(&f).await {
            Ok(v) => Ok(v),
            Err(Failure::Other(e)) => Err(e),
            Err(Failure::SchemaGone) => {
                if !self.refresh_generation().await? {
                    return Err(storage("the read store has no current generation any more"));
                }
                match self.attempt(&f).await {
                    Ok(v) => Ok(v),
                    Err(Failure::Other(e)) => Err(e),
                    Err(Failure::SchemaGone) => {
                        Err(storage("the read-model schema disappeared twice"))
                    }
                }
            }
        }
    }

    async fn attempt<T, F>(&self, f: &F) -> Result<T, Failure>
    where
        F: for<'t, 'c> Fn(&'t Transaction<'c>, &'t str) -> TxFuture<'t, T>,
    {
        let schema = schema_of(&self.generation()).map_err(Failure::Other)?;
        let mut client = self.client().await.map_err(Failure::Other)?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| Failure::Other(pg("starting a read")(e)))?;
        let pointer = async {
            let stmt = tx
                .prepare_cached("SELECT name FROM tracker_control.current_generation WHERE id = 1")
                .await
                .map_err(pg("reading the current generation"))?;
            tx.query_opt(&stmt, &[])
                .await
                .map_err(pg("reading the current generation"))?
                .map(|r| r.try_get::<_, String>(0))
                .transpose()
                .map_err(pg("reading the current generation"))
        };
        let (current, value) = futures::join!(pointer, f(&tx, &schema));
        if let Ok(Some(current)) = &current
            && schema_of(current).is_ok()
        {
            // The rows read are still one consistent snapshot of the old
            // generation; the next answer reads the new one.
            self.set_generation(current);
        }
        let value = match value {
            Ok(v) => v,
            Err(QueryError::Storage(message)) if schema_gone(&message) => {
                return Err(Failure::SchemaGone);
            }
            Err(e) => return Err(Failure::Other(e)),
        };
        tx.commit()
            .await
            .map_err(|e| Failure::Other(pg("ending a read")(e)))?;
        Ok(value)
    }
}

/// Whether an error says the schema or a table of it does not exist.
fn schema_gone(message: &str) -> bool {
    let codes = [SqlState::UNDEFINED_TABLE, SqlState::INVALID_SCHEMA_NAME];
    codes
        .iter()
        .any(|c| message.contains(&format!("[{}]", c.code())))
}

/// Errors with their SQLSTATE in the text, for [`schema_gone`].
fn db(context: &'static str) -> impl Fn(tokio_postgres::Error) -> QueryError {
    move |e| {
        let code = e.code().map(|c| c.code().to_owned()).unwrap_or_default();
        storage(format!("{context} [{code}]: {e}"))
    }
}

impl RowRead for Row {
    fn int(&self, i: usize) -> Result<i64, QueryError> {
        self.try_get(i).map_err(pg("reading a column"))
    }
    fn text(&self, i: usize) -> Result<String, QueryError> {
        self.try_get(i).map_err(pg("reading a column"))
    }
    fn str(&self, i: usize) -> Result<&str, QueryError> {
        self.try_get(i).map_err(pg("reading a column"))
    }
    fn time(&self, i: usize) -> Result<DateTime<Utc>, QueryError> {
        self.try_get(i).map_err(pg("reading a column"))
    }
    fn uuid(&self, i: usize) -> Result<Uuid, QueryError> {
        self.try_get(i).map_err(pg("reading a column"))
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, QueryError> {
        self.try_get(i).map_err(pg("reading a column"))
    }
}

type Bound = Box<dyn ToSql + Sync + Send>;

fn bound(params: Vec<Param>) -> Vec<Bound> {
    params
        .into_iter()
        .map(|p| -> Bound {
            match p {
                Param::Int(v) => Box::new(v),
                Param::Text(v) => Box::new(v),
                Param::Time(t) => Box::new(t),
            }
        })
        .collect()
}

async fn rows<T>(
    tx: &Transaction<'_>,
    schema: &str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    decode: impl Fn(&Row) -> Result<T, QueryError>,
) -> Result<Vec<T>, QueryError> {
    let sql = render(sql, Dialect::Postgres, schema);
    let stmt = tx.prepare_cached(&sql).await.map_err(db("preparing"))?;
    tx.query(&stmt, params)
        .await
        .map_err(db("querying"))?
        .iter()
        .map(decode)
        .collect()
}

async fn checkpoint(
    tx: &Transaction<'_>,
    s: &str,
    institution: u64,
    projection: ProjectionKind,
) -> Result<Position, QueryError> {
    let all = rows(tx, s, CHECKPOINTS_SQL, &[], decode_checkpoint).await?;
    Ok(consistent_through(&all, institution, projection))
}

async fn exists(
    tx: &Transaction<'_>,
    s: &str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<bool, QueryError> {
    Ok(!rows(tx, s, sql, params, |_| Ok(())).await?.is_empty())
}

async fn summary(
    tx: &Transaction<'_>,
    s: &str,
    institution: u64,
) -> Result<Option<Summary>, QueryError> {
    let inst = sql_id(institution);
    let one: [&(dyn ToSql + Sync); 1] = [&inst];
    let found = rows(tx, s, SUMMARY_SQL, &one, decode_summary).await?;
    Ok(found.into_iter().next())
}

async fn list<T: Keyed>(
    tx: &Transaction<'_>,
    s: &str,
    kind: ListKind,
    fixed: &[i64],
    page: &PageRequest<ListSort, SortKey>,
    decode: impl Fn(&Row) -> Result<T, QueryError>,
) -> Result<Page<T, SortKey>, QueryError> {
    let (sql, params) = list_sql(kind, page)?;
    let params = bound(params);
    let mut all: Vec<&(dyn ToSql + Sync)> =
        fixed.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    all.extend(params.iter().map(|v| &**v as &(dyn ToSql + Sync)));
    let found = rows(tx, s, &sql, &all, decode).await?;
    Ok(into_page(found, page.limit, |r| r.key(page.sort)))
}

fn read<T>(value: T, consistent_through: Position) -> Read<T> {
    Read {
        value,
        consistent_through,
    }
}

#[async_trait]
impl ReadModelQueries for PgQueries {
    async fn consistent_through(
        &self,
        institution: u64,
        projection: ProjectionKind,
    ) -> Result<Position, QueryError> {
        self.run(move |tx, s| Box::pin(checkpoint(tx, s, institution, projection)))
            .await
    }

    async fn summary(&self, institution: u64) -> Result<Read<Option<Summary>>, QueryError> {
        self.run(move |tx, s| {
            Box::pin(async move {
                let (cp, found) = futures::try_join!(
                    checkpoint(tx, s, institution, ProjectionKind::Institutions),
                    summary(tx, s, institution),
                )?;
                Ok(read(found, cp))
            })
        })
        .await
    }

    async fn trails(
        &self,
        institution: u64,
        page: PageRequest<ListSort, SortKey>,
    ) -> Result<Read<Lookup<Page<Trail, SortKey>>>, QueryError> {
        check_list_page(&page)?;
        self.run(move |tx, s| {
            let page = page.clone();
            Box::pin(async move {
                let fixed = [sql_id(institution)];
                let (cp, known, p) = futures::try_join!(
                    checkpoint(tx, s, institution, ProjectionKind::Institutions),
                    summary(tx, s, institution),
                    list(tx, s, ListKind::Trails, &fixed, &page, decode_trail),
                )?;
                let lookup = match known {
                    Some(_) => Lookup::Found(p),
                    None => Lookup::UnknownInstitution,
                };
                Ok(read(lookup, cp))
            })
        })
        .await
    }

    async fn trail(
        &self,
        institution: u64,
        trail: u64,
    ) -> Result<Read<Lookup<TrailDetail>>, QueryError> {
        self.run(move |tx, s| {
            Box::pin(async move {
                let (inst, t) = (sql_id(institution), sql_id(trail));
                let keys: [&(dyn ToSql + Sync); 2] = [&inst, &t];
                let (cp, known, found, courses) = futures::try_join!(
                    checkpoint(tx, s, institution, ProjectionKind::Institutions),
                    summary(tx, s, institution),
                    rows(tx, s, TRAIL_SQL, &keys, decode_trail),
                    rows(tx, s, TRAIL_COURSES_SQL, &keys, decode_course_ref),
                )?;
                let lookup = match (known, found.into_iter().next()) {
                    (None, _) => Lookup::UnknownInstitution,
                    (Some(_), None) => Lookup::UnknownEntity,
                    (Some(_), Some(trail)) => Lookup::Found(TrailDetail { trail, courses }),
                };
                Ok(read(lookup, cp))
            })
        })
        .await
    }

    async fn trail_learners(
        &self,
        institution: u64,
        trail: u64,
        page: PageRequest<ListSort, SortKey>,
    ) -> Result<Read<Lookup<Page<TrailLearner, SortKey>>>, QueryError> {
        check_list_page(&page)?;
        self.run(move |tx, s| {
            let page = page.clone();
            Box::pin(async move {
                let (inst, t) = (sql_id(institution), sql_id(trail));
                let one: [&(dyn ToSql + Sync); 1] = [&inst];
                let keys: [&(dyn ToSql + Sync); 2] = [&inst, &t];
                let fixed = [inst, t];
                let (cp, known, trail_known, p) = futures::try_join!(
                    checkpoint(tx, s, institution, ProjectionKind::Learners),
                    exists(tx, s, LEARNERS_KNOWN_SQL, &one),
                    exists(tx, s, TRAIL_KNOWN_TO_LEARNERS_SQL, &keys),
                    list(
                        tx,
                        s,
                        ListKind::TrailLearners,
                        &fixed,
                        &page,
                        decode_trail_learner
                    ),
                )?;
                let lookup = match (known, trail_known) {
                    (false, _) => Lookup::UnknownInstitution,
                    (true, false) => Lookup::UnknownEntity,
                    (true, true) => Lookup::Found(p),
                };
                Ok(read(lookup, cp))
            })
        })
        .await
    }

    async fn courses(
        &self,
        institution: u64,
        page: PageRequest<ListSort, SortKey>,
    ) -> Result<Read<Lookup<Page<Course, SortKey>>>, QueryError> {
        check_list_page(&page)?;
        self.run(move |tx, s| {
            let page = page.clone();
            Box::pin(async move {
                let fixed = [sql_id(institution)];
                let (cp, known, p) = futures::try_join!(
                    checkpoint(tx, s, institution, ProjectionKind::Institutions),
                    summary(tx, s, institution),
                    list(tx, s, ListKind::Courses, &fixed, &page, decode_course),
                )?;
                let lookup = match known {
                    Some(_) => Lookup::Found(p),
                    None => Lookup::UnknownInstitution,
                };
                Ok(read(lookup, cp))
            })
        })
        .await
    }

    async fn learners(
        &self,
        institution: u64,
        page: PageRequest<ListSort, SortKey>,
    ) -> Result<Read<Lookup<Page<Learner, SortKey>>>, QueryError> {
        check_list_page(&page)?;
        self.run(move |tx, s| {
            let page = page.clone();
            Box::pin(async move {
                let inst = sql_id(institution);
                let one: [&(dyn ToSql + Sync); 1] = [&inst];
                let fixed = [inst];
                let (cp, known, p) = futures::try_join!(
                    checkpoint(tx, s, institution, ProjectionKind::Learners),
                    exists(tx, s, LEARNERS_KNOWN_SQL, &one),
                    list(tx, s, ListKind::Learners, &fixed, &page, decode_learner),
                )?;
                let lookup = if known {
                    Lookup::Found(p)
                } else {
                    Lookup::UnknownInstitution
                };
                Ok(read(lookup, cp))
            })
        })
        .await
    }

    async fn learner(
        &self,
        institution: u64,
        user: u64,
    ) -> Result<Read<Lookup<LearnerDetail>>, QueryError> {
        self.run(move |tx, s| {
            Box::pin(async move {
                let (inst, u) = (sql_id(institution), sql_id(user));
                let completions_sql = learner_completions_sql();
                let one: [&(dyn ToSql + Sync); 1] = [&inst];
                let keys: [&(dyn ToSql + Sync); 2] = [&inst, &u];
                let (cp, known, learner, trails, completions) = futures::try_join!(
                    checkpoint(tx, s, institution, ProjectionKind::Learners),
                    exists(tx, s, LEARNERS_KNOWN_SQL, &one),
                    rows(tx, s, LEARNER_SQL, &keys, decode_learner),
                    rows(tx, s, LEARNER_TRAILS_SQL, &keys, decode_learner_trail),
                    rows(tx, s, &completions_sql, &keys, decode_completion),
                )?;
                let lookup = match (known, learner.into_iter().next()) {
                    (false, _) => Lookup::UnknownInstitution,
                    (true, None) => Lookup::UnknownEntity,
                    (true, Some(learner)) => Lookup::Found(LearnerDetail {
                        learner,
                        trails,
                        completions,
                    }),
                };
                Ok(read(lookup, cp))
            })
        })
        .await
    }

    async fn completions(
        &self,
        institution: u64,
        filter: CompletionFilter,
        page: PageRequest<CompletionSort, CompletionKey>,
    ) -> Result<Read<Lookup<Page<CompletionRow, CompletionKey>>>, QueryError> {
        check_completion_page(&page)?;
        let (sql, params) = completions_sql(institution, &filter, &page)?;
        self.run(move |tx, s| {
            let (sql, params, page) = (sql.clone(), params.clone(), page.clone());
            Box::pin(async move {
                let params = bound(params);
                let refs: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
                let inst = sql_id(institution);
                let one: [&(dyn ToSql + Sync); 1] = [&inst];
                let (cp, known, found) = futures::try_join!(
                    checkpoint(tx, s, institution, ProjectionKind::Learners),
                    exists(tx, s, LEARNERS_KNOWN_SQL, &one),
                    rows(tx, s, &sql, &refs, decode_completion),
                )?;
                let lookup = if known {
                    Lookup::Found(into_page(found, page.limit, |r| {
                        completion_key(page.sort, r)
                    }))
                } else {
                    Lookup::UnknownInstitution
                };
                Ok(read(lookup, cp))
            })
        })
        .await
    }

    async fn activity(
        &self,
        institution: u64,
        request: ActivityRequest,
    ) -> Result<Read<Lookup<Activity>>, QueryError> {
        self.run(move |tx, s| {
            Box::pin(async move {
                let inst = sql_id(institution);
                let one: [&(dyn ToSql + Sync); 1] = [&inst];
                let (cp, known, bounds) = futures::try_join!(
                    checkpoint(tx, s, institution, ProjectionKind::Institutions),
                    summary(tx, s, institution),
                    rows(tx, s, ACTIVITY_BOUNDS_SQL, &one, |r| {
                        Ok((r.opt_text(0)?, r.opt_text(1)?))
                    }),
                )?;
                if known.is_none() {
                    return Ok(read(Lookup::UnknownInstitution, cp));
                }
                let (min, max) = bounds.into_iter().next().unwrap_or((None, None));
                let today = Utc::now().date_naive();
                let first = match request.from {
                    Some(d) => d,
                    None => min.as_deref().map(parse_day).transpose()?.unwrap_or(today),
                };
                let last = match request.to {
                    Some(d) => d,
                    None => max.as_deref().map(parse_day).transpose()?.unwrap_or(today),
                };
                activity_plan(request.bucket, first, last)?;
                let (start, end, _) = snap(request.bucket, first, last);
                let (from_text, to_text) = (day_text(start), day_text(end));
                let range: [&(dyn ToSql + Sync); 3] = [&inst, &from_text, &to_text];
                let days = async {
                    rows(tx, s, ACTIVITY_DAYS_SQL, &range, |r| {
                        Ok((parse_day(&r.text(0)?)?, count(r, 1)?, count(r, 2)?))
                    })
                    .await
                };
                let pairs = async {
                    if request.bucket == Bucket::Day {
                        return Ok(Vec::new());
                    }
                    rows(tx, s, ACTIVITY_DAY_LEARNERS_SQL, &range, |r| {
                        Ok((parse_day(&r.text(0)?)?, from_sql_id(r.int(1)?)))
                    })
                    .await
                };
                let (days, pairs) = futures::try_join!(days, pairs)?;
                Ok(read(
                    Lookup::Found(Activity {
                        bucket: request.bucket,
                        from: start,
                        to: end,
                        buckets: bucketize(request.bucket, start, end, &days, &pairs),
                    }),
                    cp,
                ))
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::PgReadStore;

    fn admin_url() -> String {
        std::env::var("TRACKER_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
    }

    async fn admin() -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&admin_url(), NoTls)
            .await
            .expect("PostgreSQL must be reachable (TRACKER_TEST_POSTGRES_URL)");
        tokio::spawn(connection);
        client
    }

    /// Every statement reads index ranges in index order: no sequential
    /// scan (when the planner is told to avoid them) and no sort, except a
    /// learner's completions in time order: a sort of that learner's rows
    /// alone, read by both keys of their log-order index (as in SQLite).
    #[tokio::test]
    async fn every_query_is_an_index_range() {
        let name = format!("tracker_test_{}_{}", unix_now(), Uuid::new_v4().simple());
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create database");
        let admin_url = admin_url();
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        let result = async {
            let _store = PgReadStore::connect(&url).await.expect("connect");
            let queries = PgQueries::connect(&url, 1).await.expect("queries");
            let schema = schema_of(&queries.generation()).expect("schema");
            let client = queries.client().await.expect("client");
            // Plans depend on statistics: rows spread over 20 institutions,
            // as a loaded store would hold them, then ANALYZE.
            let fill = FILL.replace("{s}", &schema);
            client.batch_execute(&fill).await.expect("fill");
            // Small matches may rightly be fetched by bitmap and sorted; what
            // matters is that an index gives every statement its order.
            client
                .batch_execute("SET enable_seqscan = off; SET enable_bitmapscan = off")
                .await
                .expect("set");
            for (sql, params) in plan_samples() {
                let sql = render(&sql, Dialect::Postgres, &schema);
                let params = bound(params);
                let refs: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
                let plan: Vec<String> = client
                    .query(&format!("EXPLAIN {sql}"), &refs)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect();
                let text = plan.join("\n");
                assert!(!text.contains("Seq Scan"), "{sql}\nscans a table:\n{text}");
                let one_learner = plan.iter().any(|l| {
                    l.contains("Index Scan using lrn_completions_by_user on lrn_completions")
                }) && plan.iter().any(|l| {
                    l.trim_start()
                        .starts_with("Index Cond: ((institution_id = ")
                        && l.contains("AND (user_id = ")
                });
                assert!(
                    one_learner
                        || !plan.iter().any(|l| l
                            .trim_start()
                            .trim_start_matches("->  ")
                            .starts_with("Sort")),
                    "{sql}\nsorts:\n{text}"
                );
            }
        }
        .await;
        let _ = admin()
            .await
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await;
        result
    }

    const FILL: &str = r#"
INSERT INTO {s}.inst_summary SELECT g, 1, 1, 1, 1, now(), now(), g FROM generate_series(1, 20) g;
INSERT INTO {s}.inst_trails SELECT g % 20, g, 'T' || g, g, g % 97, g % 13, now(), now()
    FROM generate_series(1, 40000) g;
INSERT INTO {s}.inst_courses SELECT g % 20, g, 'C' || g, g, g % 97, g % 13
    FROM generate_series(1, 40000) g;
INSERT INTO {s}.inst_trail_courses SELECT g % 20, g, g + 1 FROM generate_series(1, 40000) g;
INSERT INTO {s}.inst_daily SELECT g % 20, to_char(date '2000-01-01' + g, 'YYYY-MM-DD'), g, g
    FROM generate_series(1, 40000) g;
INSERT INTO {s}.inst_m_day_learners SELECT g % 20, to_char(date '2000-01-01' + g / 7, 'YYYY-MM-DD'), g
    FROM generate_series(1, 40000) g;
INSERT INTO {s}.lrn_learners SELECT g % 20, g, 'L' || g, 'l' || g || '@x', g, 1, g % 31, now(), now()
    FROM generate_series(1, 40000) g;
INSERT INTO {s}.lrn_learner_trails SELECT g % 20, g, g % 50, 1, now(), now()
    FROM generate_series(1, 40000) g;
INSERT INTO {s}.lrn_completions SELECT g, gen_random_uuid(), g % 20, g % 4000, g % 50, 'T',
    '2024-01-01 00:00:00', timestamptz '2024-01-01' + g * interval '1 minute', '2024-01-01', '[]'
    FROM generate_series(1, 80000) g;
INSERT INTO {s}.checkpoints VALUES ('institutions', 80000), ('learners', 80000);
ANALYZE;
"#;

    fn unix_now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}
