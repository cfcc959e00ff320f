//! Queries over the embedded read store: read-only connections to the
//! current generation's institutions file with its learners file attached
//! (as `learners`; the tables' names differ, so a statement names a table
//! the same whichever file holds it), used on blocking threads. They never
//! take the projectors' connections, so a query never waits for a
//! projection batch (WAL: readers see the last commit and do not block the
//! writer).
//!
//! Each answer runs in one read transaction: the checkpoint and the rows come
//! from the same snapshot of the projection's file. The current-generation
//! pointer is read before each answer (one indexed row of `control.sqlite`);
//! when a rebuild moved it, the idle connections of the old generation are
//! dropped and new ones opened on the new files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, ToSql};
use tracker_store::{Position, in_read_transaction};
use uuid::Uuid;

use super::*;
use crate::plan::ProjectionKind;
use crate::sqlite::projection_path;

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Whether the learners file has the positions per day (an older build's
/// writer may not have migrated it yet; its windows are then sorted).
const COMPLETION_DAYS_KNOWN_SQL: &str = "SELECT 1 FROM learners.sqlite_master \
     WHERE type = 'table' AND name = 'lrn_completion_days'";
const MAX_IDLE: usize = 8;

struct Generation {
    name: String,
    institutions: PathBuf,
    learners: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

/// The embedded read models, for queries. Cheap to clone.
#[derive(Clone)]
pub struct SqliteQueries {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    control: Mutex<Option<Connection>>,
    current: Mutex<Option<Arc<Generation>>>,
}

impl fmt::Debug for SqliteQueries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteQueries")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

fn open_read_only(path: &Path) -> Result<Connection, QueryError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| storage(format!("opening {} for reading: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(storage)?;
    conn.set_prepared_statement_cache_capacity(64);
    // Without the query planner stability guarantee SQLite re-plans a cached
    // statement whenever its bound values change, which profiled at about a
    // quarter of a one-learner query; the plans here do not depend on values.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )
    .map_err(storage)?;
    Ok(conn)
}

impl SqliteQueries {
    /// Queries over the read store in `dir` (the directory a
    /// [`crate::sqlite::SqliteReadStore`] was opened on, which creates it).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, QueryError> {
        let queries = Self {
            inner: Arc::new(Inner {
                dir: dir.as_ref().to_path_buf(),
                control: Mutex::new(None),
                current: Mutex::new(None),
            }),
        };
        queries.inner.generation()?;
        Ok(queries)
    }

    /// Runs `f` in one read transaction on the current generation.
    async fn read<T, F>(&self, f: F) -> Result<T, QueryError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, QueryError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let generation = inner.generation()?;
            let conn = generation.checkout()?;
            let result = in_read_transaction(&conn, f);
            generation.checkin(conn);
            result
        })
        .await
        .map_err(|e| storage(format!("query task failed: {e}")))?
    }
}

impl Inner {
    /// The current generation, re-read from the pointer.
    fn generation(&self) -> Result<Arc<Generation>, QueryError> {
        let name = {
            let mut control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
            if control.is_none() {
                *control = Some(open_read_only(&self.dir.join("control.sqlite"))?);
            }
            let conn = control
                .as_ref()
                .ok_or_else(|| storage("control connection missing"))?;
            let name: Option<String> = conn
                .prepare_cached("SELECT name FROM current_generation WHERE id = 1")
                .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
                .map_err(storage)?;
            name.ok_or_else(|| storage("the read store has no current generation yet"))?
        };
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(g) = current.as_ref().filter(|g| g.name == name) {
            return Ok(Arc::clone(g));
        }
        let generation = Arc::new(Generation {
            institutions: projection_path(&self.dir, &name, ProjectionKind::Institutions),
            learners: projection_path(&self.dir, &name, ProjectionKind::Learners),
            name,
            idle: Mutex::new(Vec::new()),
        });
        *current = Some(Arc::clone(&generation));
        Ok(generation)
    }
}

impl Generation {
    fn checkout(&self) -> Result<Connection, QueryError> {
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match pooled {
            Some(conn) => Ok(conn),
            None => {
                let conn = open_read_only(&self.institutions)?;
                let path = self.learners.to_str().ok_or_else(|| {
                    storage(format!("{} is not valid UTF-8", self.learners.display()))
                })?;
                conn.execute("ATTACH DATABASE ?1 AS learners", [path])
                    .map_err(|e| {
                        storage(format!(
                            "attaching {} for reading: {e}",
                            self.learners.display()
                        ))
                    })?;
                Ok(conn)
            }
        }
    }

    fn checkin(&self, conn: Connection) {
        if !conn.is_autocommit() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }
}

struct SqlRow<'a, 'b>(&'a Row<'b>);

impl RowRead for SqlRow<'_, '_> {
    fn int(&self, i: usize) -> Result<i64, QueryError> {
        self.0.get(i).map_err(storage)
    }
    fn text(&self, i: usize) -> Result<String, QueryError> {
        self.0.get(i).map_err(storage)
    }
    fn str(&self, i: usize) -> Result<&str, QueryError> {
        self.0
            .get_ref(i)
            .and_then(|v| Ok(v.as_str()?))
            .map_err(storage)
    }
    fn time(&self, i: usize) -> Result<DateTime<Utc>, QueryError> {
        parse_time(self.str(i)?)
    }
    fn uuid(&self, i: usize) -> Result<Uuid, QueryError> {
        self.text(i)?
            .parse()
            .map_err(|e| storage(format!("stored event id: {e}")))
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, QueryError> {
        self.0.get(i).map_err(storage)
    }
}

enum Bound {
    Int(i64),
    Text(String),
}

impl ToSql for Bound {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Self::Int(v) => v.to_sql(),
            Self::Text(v) => v.to_sql(),
        }
    }
}

fn bound(params: Vec<Param>) -> Vec<Bound> {
    params
        .into_iter()
        .map(|p| match p {
            Param::Int(v) => Bound::Int(v),
            Param::Text(v) => Bound::Text(v),
            Param::Time(t) => Bound::Text(time_text(t)),
        })
        .collect()
}

fn rows<T>(
    conn: &Connection,
    sql: &str,
    params: &[&dyn ToSql],
    decode: impl Fn(&SqlRow<'_, '_>) -> Result<T, QueryError>,
) -> Result<Vec<T>, QueryError> {
    let sql = render(sql, Dialect::Sqlite, "");
    let mut stmt = conn.prepare_cached(&sql).map_err(storage)?;
    let mut rows = stmt.query(params).map_err(storage)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(storage)? {
        out.push(decode(&SqlRow(row))?);
    }
    Ok(out)
}

fn checkpoint(
    conn: &Connection,
    institution: u64,
    projection: ProjectionKind,
) -> Result<Position, QueryError> {
    // From the file the answer's rows come from: the same snapshot.
    let sql = match projection {
        ProjectionKind::Institutions => "SELECT key, position FROM main.checkpoints",
        ProjectionKind::Learners => "SELECT key, position FROM learners.checkpoints",
    };
    let all = rows(conn, sql, &[], |r| decode_checkpoint(r))?;
    Ok(consistent_through(&all, institution, projection))
}

fn exists(conn: &Connection, sql: &str, params: &[&dyn ToSql]) -> Result<bool, QueryError> {
    Ok(!rows(conn, sql, params, |_| Ok(()))?.is_empty())
}

fn summary(conn: &Connection, institution: u64) -> Result<Option<Summary>, QueryError> {
    Ok(rows(conn, SUMMARY_SQL, &[&sql_id(institution)], |r| {
        decode_summary(r)
    })?
    .into_iter()
    .next())
}

fn list<T: Keyed>(
    conn: &Connection,
    kind: ListKind,
    fixed: &[i64],
    page: &PageRequest<ListSort, SortKey>,
    decode: impl Fn(&SqlRow<'_, '_>) -> Result<T, QueryError>,
) -> Result<Page<T, SortKey>, QueryError> {
    let (sql, params) = list_sql(kind, page)?;
    let params = bound(params);
    let mut all: Vec<&dyn ToSql> = fixed.iter().map(|v| v as &dyn ToSql).collect();
    all.extend(params.iter().map(|v| v as &dyn ToSql));
    let found = rows(conn, &sql, &all, decode)?;
    Ok(into_page(found, page.limit, |r| r.key(page.sort)))
}

fn read<T>(value: T, consistent_through: Position) -> Read<T> {
    Read {
        value,
        consistent_through,
    }
}

#[async_trait]
impl ReadModelQueries for SqliteQueries {
    async fn consistent_through(
        &self,
        institution: u64,
        projection: ProjectionKind,
    ) -> Result<Position, QueryError> {
        self.read(move |conn| checkpoint(conn, institution, projection))
            .await
    }

    async fn summary(&self, institution: u64) -> Result<Read<Option<Summary>>, QueryError> {
        self.read(move |conn| {
            let cp = checkpoint(conn, institution, ProjectionKind::Institutions)?;
            Ok(read(summary(conn, institution)?, cp))
        })
        .await
    }

    async fn trails(
        &self,
        institution: u64,
        page: PageRequest<ListSort, SortKey>,
    ) -> Result<Read<Lookup<Page<Trail, SortKey>>>, QueryError> {
        check_list_page(&page)?;
        self.read(move |conn| {
            let cp = checkpoint(conn, institution, ProjectionKind::Institutions)?;
            if summary(conn, institution)?.is_none() {
                return Ok(read(Lookup::UnknownInstitution, cp));
            }
            let p = list(conn, ListKind::Trails, &[sql_id(institution)], &page, |r| {
                decode_trail(r)
            })?;
            Ok(read(Lookup::Found(p), cp))
        })
        .await
    }

    async fn trail(
        &self,
        institution: u64,
        trail: u64,
    ) -> Result<Read<Lookup<TrailDetail>>, QueryError> {
        self.read(move |conn| {
            let cp = checkpoint(conn, institution, ProjectionKind::Institutions)?;
            if summary(conn, institution)?.is_none() {
                return Ok(read(Lookup::UnknownInstitution, cp));
            }
            let keys: [&dyn ToSql; 2] = [&sql_id(institution), &sql_id(trail)];
            let Some(found) = rows(conn, TRAIL_SQL, &keys, |r| decode_trail(r))?
                .into_iter()
                .next()
            else {
                return Ok(read(Lookup::UnknownEntity, cp));
            };
            let courses = rows(conn, TRAIL_COURSES_SQL, &keys, |r| decode_course_ref(r))?;
            Ok(read(
                Lookup::Found(TrailDetail {
                    trail: found,
                    courses,
                }),
                cp,
            ))
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
        self.read(move |conn| {
            let cp = checkpoint(conn, institution, ProjectionKind::Learners)?;
            let inst = sql_id(institution);
            let p = list(
                conn,
                ListKind::TrailLearners,
                &[inst, sql_id(trail)],
                &page,
                |r| decode_trail_learner(r),
            )?;
            // A row shows that both are known; only an empty page asks.
            if p.items.is_empty() {
                if !exists(conn, LEARNERS_KNOWN_SQL, &[&inst])? {
                    return Ok(read(Lookup::UnknownInstitution, cp));
                }
                if !exists(conn, TRAIL_KNOWN_TO_LEARNERS_SQL, &[&inst, &sql_id(trail)])? {
                    return Ok(read(Lookup::UnknownEntity, cp));
                }
            }
            Ok(read(Lookup::Found(p), cp))
        })
        .await
    }

    async fn courses(
        &self,
        institution: u64,
        page: PageRequest<ListSort, SortKey>,
    ) -> Result<Read<Lookup<Page<Course, SortKey>>>, QueryError> {
        check_list_page(&page)?;
        self.read(move |conn| {
            let cp = checkpoint(conn, institution, ProjectionKind::Institutions)?;
            if summary(conn, institution)?.is_none() {
                return Ok(read(Lookup::UnknownInstitution, cp));
            }
            let p = list(
                conn,
                ListKind::Courses,
                &[sql_id(institution)],
                &page,
                |r| decode_course(r),
            )?;
            Ok(read(Lookup::Found(p), cp))
        })
        .await
    }

    async fn learners(
        &self,
        institution: u64,
        page: PageRequest<ListSort, SortKey>,
    ) -> Result<Read<Lookup<Page<Learner, SortKey>>>, QueryError> {
        check_list_page(&page)?;
        self.read(move |conn| {
            let cp = checkpoint(conn, institution, ProjectionKind::Learners)?;
            let inst = sql_id(institution);
            let p = list(conn, ListKind::Learners, &[inst], &page, |r| {
                decode_learner(r)
            })?;
            if p.items.is_empty() && !exists(conn, LEARNERS_KNOWN_SQL, &[&inst])? {
                return Ok(read(Lookup::UnknownInstitution, cp));
            }
            Ok(read(Lookup::Found(p), cp))
        })
        .await
    }

    async fn learner(
        &self,
        institution: u64,
        user: u64,
    ) -> Result<Read<Lookup<LearnerDetail>>, QueryError> {
        self.read(move |conn| {
            let cp = checkpoint(conn, institution, ProjectionKind::Learners)?;
            let inst = sql_id(institution);
            let keys: [&dyn ToSql; 2] = [&inst, &sql_id(user)];
            let Some(learner) = rows(conn, LEARNER_SQL, &keys, |r| decode_learner(r))?
                .into_iter()
                .next()
            else {
                let known = exists(conn, LEARNERS_KNOWN_SQL, &[&inst])?;
                let lookup = if known {
                    Lookup::UnknownEntity
                } else {
                    Lookup::UnknownInstitution
                };
                return Ok(read(lookup, cp));
            };
            let trails = rows(conn, LEARNER_TRAILS_SQL, &keys, |r| decode_learner_trail(r))?;
            let completions = rows(conn, &learner_completions_sql(), &keys, |r| {
                decode_completion(r)
            })?;
            Ok(read(
                Lookup::Found(LearnerDetail {
                    learner,
                    trails,
                    completions,
                }),
                cp,
            ))
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
        self.read(move |conn| {
            let cp = checkpoint(conn, institution, ProjectionKind::Learners)?;
            let (sql, params) = match window_in_day_range_sql(institution, &filter, &page) {
                Some(statement) if exists(conn, COMPLETION_DAYS_KNOWN_SQL, &[])? => statement?,
                _ => completions_sql(institution, &filter, &page)?,
            };
            let params = bound(params);
            let refs: Vec<&dyn ToSql> = params.iter().map(|p| p as &dyn ToSql).collect();
            let found = rows(conn, &sql, &refs, |r| decode_completion(r))?;
            if found.is_empty() && !exists(conn, LEARNERS_KNOWN_SQL, &[&sql_id(institution)])? {
                return Ok(read(Lookup::UnknownInstitution, cp));
            }
            let p = into_page(found, page.limit, |r| completion_key(page.sort, r));
            Ok(read(Lookup::Found(p), cp))
        })
        .await
    }

    async fn activity(
        &self,
        institution: u64,
        request: ActivityRequest,
    ) -> Result<Read<Lookup<Activity>>, QueryError> {
        self.read(move |conn| {
            let cp = checkpoint(conn, institution, ProjectionKind::Institutions)?;
            let inst = sql_id(institution);
            if summary(conn, institution)?.is_none() {
                return Ok(read(Lookup::UnknownInstitution, cp));
            }
            let (first, last) = match (request.from, request.to) {
                (Some(from), Some(to)) => (from, to),
                (from, to) => {
                    let bounds = rows(conn, ACTIVITY_BOUNDS_SQL, &[&inst], |r| {
                        Ok((r.opt_text(0)?, r.opt_text(1)?))
                    })?;
                    let (min, max) = bounds.into_iter().next().unwrap_or((None, None));
                    let min = min.as_deref().map(parse_day).transpose()?;
                    let max = max.as_deref().map(parse_day).transpose()?;
                    let today = Utc::now().date_naive();
                    (from.or(min).unwrap_or(today), to.or(max).unwrap_or(today))
                }
            };
            activity_plan(request.bucket, first, last)?;
            let (start, end, _) = snap(request.bucket, first, last);
            let range: [&dyn ToSql; 3] = [&inst, &day_text(start), &day_text(end)];
            let days = rows(conn, ACTIVITY_DAYS_SQL, &range, |r| {
                Ok((parse_day(&r.text(0)?)?, count(r, 1)?, count(r, 2)?))
            })?;
            let pairs = if request.bucket == Bucket::Day {
                Vec::new()
            } else {
                rows(conn, ACTIVITY_DAY_LEARNERS_SQL, &range, |r| {
                    Ok((parse_day(&r.text(0)?)?, from_sql_id(r.int(1)?)))
                })?
            };
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
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::SqliteReadStore;

    /// A read connection to a new, empty read store (and the directory
    /// that holds it).
    fn empty_store() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let _store = SqliteReadStore::open(dir.path()).unwrap();
        let queries = SqliteQueries::open(dir.path()).unwrap();
        let conn = queries.inner.generation().unwrap().checkout().unwrap();
        (dir, conn)
    }

    /// An answer that fails ends its read transaction, and a connection
    /// still inside one is never handed to the next answer.
    #[test]
    fn failed_answers_end_their_transaction_and_are_not_pooled_inside_one() {
        let dir = tempfile::tempdir().unwrap();
        let _store = SqliteReadStore::open(dir.path()).unwrap();
        let queries = SqliteQueries::open(dir.path()).unwrap();
        let generation = queries.inner.generation().unwrap();
        let conn = generation.checkout().unwrap();
        let failed: Result<(), _> = in_read_transaction(&conn, |c| {
            assert!(!c.is_autocommit(), "not in a transaction");
            Err(storage("boom"))
        });
        assert!(failed.is_err());
        assert!(
            conn.is_autocommit(),
            "the failed answer left its transaction open"
        );
        let ok = in_read_transaction(&conn, |c| checkpoint(c, 1, ProjectionKind::Learners));
        assert_eq!(ok.unwrap(), 0);
        assert!(conn.is_autocommit());

        conn.execute_batch("BEGIN").unwrap();
        generation.checkin(conn);
        assert!(
            generation.idle.lock().unwrap().is_empty(),
            "pooled inside a transaction"
        );
        let conn = generation.checkout().unwrap();
        assert!(conn.is_autocommit());
        generation.checkin(conn);
        assert_eq!(generation.idle.lock().unwrap().len(), 1);
    }

    /// SQLite's plan of a statement, one line per step.
    fn plan_of(conn: &Connection, sql: &str, params: Vec<Param>) -> Vec<String> {
        let sql = render(sql, Dialect::Sqlite, "");
        let params = bound(params);
        let refs: Vec<&dyn ToSql> = params.iter().map(|p| p as &dyn ToSql).collect();
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        stmt.query_map(refs.as_slice(), |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Every statement reads an index range (`SEARCH`), never a whole table
    /// or a sort of its rows, except the checkpoints (a handful of rows)
    /// and a learner's completions in time order: a sort of that learner's
    /// rows alone, read by both keys of their log-order index.
    #[test]
    fn every_query_is_an_index_range() {
        let (_dir, conn) = empty_store();
        for (sql, params) in plan_samples() {
            let plan = plan_of(&conn, &sql, params);
            let one_learner = plan.first().is_some_and(|l| {
                l.starts_with(
                    "SEARCH lrn_completions USING INDEX lrn_completions_by_user \
                     (institution_id=? AND user_id=?",
                )
            });
            for line in &plan {
                assert!(
                    line.starts_with("SEARCH ")
                        || line.starts_with("SCALAR SUBQUERY")
                        || line == "SCAN CONSTANT ROW"
                        || (one_learner && line == "USE TEMP B-TREE FOR ORDER BY"),
                    "{sql}\nis not index-backed: {plan:?}"
                );
            }
            if !one_learner {
                assert!(
                    !plan.iter().any(|l| l.contains("TEMP B-TREE")),
                    "{sql}\nsorts: {plan:?}"
                );
            }
        }
    }

    /// A time window in position order, institution-wide or for a trail,
    /// is a range of the log-order index between the window's days' first
    /// and last positions: no sort, and the page's end stops the scan.
    #[test]
    fn a_time_window_in_position_order_scans_its_days_position_range() {
        let (_dir, conn) = empty_store();
        let t = chrono::DateTime::parse_from_rfc3339("2024-01-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let windows = [
            (Some(t), Some(t), None),
            (Some(t), None, Some(4)),
            (None, Some(t), None),
        ];
        for (from, to, trail_id) in windows {
            for after in [None, Some(CompletionKey::Position(9))] {
                let filter = CompletionFilter {
                    from,
                    to,
                    trail_id,
                    user_id: None,
                };
                let page = PageRequest {
                    sort: CompletionSort::Position,
                    after,
                    limit: 50,
                };
                let (sql, params) = window_in_day_range_sql(7, &filter, &page)
                    .expect("a window in position order")
                    .unwrap();
                let plan = plan_of(&conn, &sql, params);
                let index = if trail_id.is_some() {
                    "lrn_completions_by_trail (institution_id=? AND trail_id=? AND position>? AND position<?)"
                } else {
                    "lrn_completions_by_institution (institution_id=? AND position>? AND position<?)"
                };
                assert_eq!(
                    plan[0],
                    format!("SEARCH lrn_completions USING INDEX {index}"),
                    "{sql}\n{plan:?}"
                );
                assert!(
                    plan.iter().any(|l| l.contains(
                        "SEARCH lrn_completion_days USING PRIMARY KEY (institution_id=?"
                    )),
                    "{plan:?}"
                );
                assert!(!plan.iter().any(|l| l.contains("TEMP B-TREE")), "{plan:?}");
            }
        }
        // A learner's completions are few and read from their own index;
        // time order is an index range; neither is this statement.
        let page = |sort| PageRequest {
            sort,
            after: None,
            limit: 50,
        };
        let learner = CompletionFilter {
            from: Some(t),
            user_id: Some(3),
            ..Default::default()
        };
        assert!(window_in_day_range_sql(7, &learner, &page(CompletionSort::Position)).is_none());
        let window = CompletionFilter {
            from: Some(t),
            ..Default::default()
        };
        assert!(window_in_day_range_sql(7, &window, &page(CompletionSort::FinishedAt)).is_none());
        assert!(
            window_in_day_range_sql(
                7,
                &CompletionFilter::default(),
                &page(CompletionSort::Position)
            )
            .is_none()
        );
    }

    /// A learner's completions, in any order and any time window, are read
    /// from the learner's log-order index by both its keys (the learner's
    /// rows only, never the institution's time index filtered); in log
    /// order without a sort.
    #[test]
    fn a_learners_completions_are_read_from_their_own_index() {
        let (_dir, conn) = empty_store();
        let t = chrono::DateTime::parse_from_rfc3339("2024-01-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut statements = vec![(
            learner_completions_sql(),
            vec![Param::Int(7), Param::Int(3)],
            true,
        )];
        for (from, to) in [
            (None, None),
            (Some(t), None),
            (None, Some(t)),
            (Some(t), Some(t)),
        ] {
            let filter = CompletionFilter {
                from,
                to,
                user_id: Some(3),
                trail_id: None,
            };
            for page in completion_pages(t) {
                let (sql, params) = completions_sql(7, &filter, &page).unwrap();
                statements.push((sql, params, page.sort == CompletionSort::Position));
            }
        }
        for (sql, params, in_log_order) in statements {
            let plan = plan_of(&conn, &sql, params);
            assert!(
                plan[0].starts_with(
                    "SEARCH lrn_completions USING INDEX lrn_completions_by_user \
                     (institution_id=? AND user_id=?"
                ),
                "{sql}\n{plan:?}"
            );
            assert_eq!(
                plan.iter().filter(|l| l.starts_with("SEARCH ")).count(),
                1,
                "{sql}\n{plan:?}"
            );
            assert_eq!(
                plan.iter().any(|l| l.contains("TEMP B-TREE")),
                !in_log_order,
                "{sql}\n{plan:?}"
            );
        }
    }
}
