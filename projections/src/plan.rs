//! The pure core of the read models: what a batch of completions changes.
//!
//! A backend applies a batch in three steps inside one transaction:
//! 1. [`membership_keys`]: the keys whose first appearance moves a distinct
//!    count (a learner new to an institution, to a trail, to a course, to a
//!    day; a trail or course new to an institution). The backend inserts them
//!    and reports which were not there before.
//! 2. [`plan`]: from the batch and those new keys, the rows to upsert, every
//!    counter already coalesced per row (a batch of 10,000 completions of one
//!    institution is one summary upsert, not 10,000).
//! 3. The backend writes the plan, the dead letters and the checkpoint.
//!
//! Distinct counts only need how many keys are new per group, not which
//! event brought them, so the result does not depend on the order of events
//! inside a batch.

use chrono::{DateTime, Utc};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::model::Completion;

/// The read models, grouped by the projection that owns them. Each
/// projection has its own checkpoint and its own tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProjectionKind {
    /// Institution summary, trails, courses, daily activity.
    Institutions,
    /// Learners, their trails, and one row per completion.
    Learners,
}

impl ProjectionKind {
    pub const ALL: [ProjectionKind; 2] = [Self::Institutions, Self::Learners];

    /// The checkpoint key.
    pub fn name(self) -> &'static str {
        match self {
            Self::Institutions => "institutions",
            Self::Learners => "learners",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Membership keys of one batch, deduplicated. Ids are the source's.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MembershipKeys {
    /// (institution, user)
    pub institution_learners: FxHashSet<(u64, u64)>,
    /// (institution, trail)
    pub institution_trails: FxHashSet<(u64, u64)>,
    /// (institution, course)
    pub institution_courses: FxHashSet<(u64, u64)>,
    /// (institution, trail, user)
    pub trail_learners: FxHashSet<(u64, u64, u64)>,
    /// (institution, course, user)
    pub course_learners: FxHashSet<(u64, u64, u64)>,
    /// (institution, trail, course)
    pub trail_courses: FxHashSet<(u64, u64, u64)>,
    /// (institution, day, user)
    pub day_learners: FxHashSet<(u64, String, u64)>,
}

impl MembershipKeys {
    pub fn is_empty(&self) -> bool {
        self.institution_learners.is_empty()
            && self.institution_trails.is_empty()
            && self.institution_courses.is_empty()
            && self.trail_learners.is_empty()
            && self.course_learners.is_empty()
            && self.trail_courses.is_empty()
            && self.day_learners.is_empty()
    }
}

/// One membership key of a completion (see [`MembershipKeys`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'a> {
    InstitutionLearner(u64, u64),
    InstitutionTrail(u64, u64),
    InstitutionCourse(u64, u64),
    TrailLearner(u64, u64, u64),
    CourseLearner(u64, u64, u64),
    TrailCourse(u64, u64, u64),
    DayLearner(u64, &'a str, u64),
}

/// Calls `f` with every key of `batch` that matters to `kind`, repeats
/// included: the one definition of which keys a projection counts, for
/// [`membership_keys`] and for the rebuild's fold.
pub fn each_key<'a>(kind: ProjectionKind, batch: &'a [Completion], mut f: impl FnMut(Key<'a>)) {
    for c in batch {
        let (i, u, t) = (c.institution_id, c.user_id, c.trail_id);
        match kind {
            ProjectionKind::Institutions => {
                f(Key::InstitutionLearner(i, u));
                f(Key::InstitutionTrail(i, t));
                f(Key::TrailLearner(i, t, u));
                f(Key::DayLearner(i, &c.day, u));
                for course in &c.courses {
                    f(Key::InstitutionCourse(i, course.id));
                    f(Key::CourseLearner(i, course.id, u));
                    f(Key::TrailCourse(i, t, course.id));
                }
            }
            ProjectionKind::Learners => f(Key::TrailLearner(i, t, u)),
        }
    }
}

impl MembershipKeys {
    /// Every key.
    pub fn iter(&self) -> impl Iterator<Item = Key<'_>> {
        let pairs = |set: &FxHashSet<(u64, u64)>, f: fn(u64, u64) -> Key<'static>| {
            set.iter().map(move |&(a, b)| f(a, b)).collect::<Vec<_>>()
        };
        let triples = |set: &FxHashSet<(u64, u64, u64)>, f: fn(u64, u64, u64) -> Key<'static>| {
            set.iter()
                .map(move |&(a, b, c)| f(a, b, c))
                .collect::<Vec<_>>()
        };
        pairs(&self.institution_learners, Key::InstitutionLearner)
            .into_iter()
            .chain(pairs(&self.institution_trails, Key::InstitutionTrail))
            .chain(pairs(&self.institution_courses, Key::InstitutionCourse))
            .chain(triples(&self.trail_learners, Key::TrailLearner))
            .chain(triples(&self.course_learners, Key::CourseLearner))
            .chain(triples(&self.trail_courses, Key::TrailCourse))
            .chain(
                self.day_learners
                    .iter()
                    .map(|(i, day, u)| Key::DayLearner(*i, day, *u)),
            )
    }

    /// Adds `key` (owned).
    pub fn insert(&mut self, key: Key<'_>) {
        match key {
            Key::InstitutionLearner(i, u) => {
                self.institution_learners.insert((i, u));
            }
            Key::InstitutionTrail(i, t) => {
                self.institution_trails.insert((i, t));
            }
            Key::InstitutionCourse(i, c) => {
                self.institution_courses.insert((i, c));
            }
            Key::TrailLearner(i, t, u) => {
                self.trail_learners.insert((i, t, u));
            }
            Key::CourseLearner(i, c, u) => {
                self.course_learners.insert((i, c, u));
            }
            Key::TrailCourse(i, t, c) => {
                self.trail_courses.insert((i, t, c));
            }
            Key::DayLearner(i, day, u) => {
                self.day_learners.insert((i, day.to_owned(), u));
            }
        }
    }
}

/// The keys of `batch` that matter to `kind`.
pub fn membership_keys(kind: ProjectionKind, batch: &[Completion]) -> MembershipKeys {
    let mut keys = MembershipKeys::default();
    each_key(kind, batch, |k| keys.insert(k));
    keys
}

/// A value and the position that set it: the latest position wins, so
/// "name (latest seen)" is the same whatever the batching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latest<T> {
    pub value: T,
    pub position: u64,
}

impl<T> Latest<T> {
    fn offer(&mut self, value: T, position: u64) {
        if position > self.position {
            self.value = value;
            self.position = position;
        }
    }
}

impl Latest<String> {
    /// [`Latest::offer`] of a borrowed name: copied only when it wins and
    /// differs (names rarely change; positions always grow).
    fn offer_str(&mut self, value: &str, position: u64) {
        if position > self.position {
            if self.value != value {
                value.clone_into(&mut self.value);
            }
            self.position = position;
        }
    }
}

impl Latest<(String, String)> {
    fn offer_pair(&mut self, a: &str, b: &str, position: u64) {
        if position > self.position {
            if self.value.0 != a {
                a.clone_into(&mut self.value.0);
            }
            if self.value.1 != b {
                b.clone_into(&mut self.value.1);
            }
            self.position = position;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub first: DateTime<Utc>,
    pub last: DateTime<Utc>,
}

impl Span {
    fn at(t: DateTime<Utc>) -> Self {
        Self { first: t, last: t }
    }

    fn widen(&mut self, t: DateTime<Utc>) {
        self.first = self.first.min(t);
        self.last = self.last.max(t);
    }

    fn merge(&mut self, other: Span) {
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryDelta {
    pub completions: u64,
    pub new_learners: u64,
    pub new_trails: u64,
    pub new_courses: u64,
    pub span: Span,
    pub last_position: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailDelta {
    pub name: Latest<String>,
    pub completions: u64,
    pub new_learners: u64,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CourseDelta {
    pub title: Latest<String>,
    pub completions: u64,
    pub new_learners: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayDelta {
    pub completions: u64,
    pub new_learners: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnerDelta {
    /// (name, email)
    pub profile: Latest<(String, String)>,
    pub completions: u64,
    pub new_trails: u64,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnerTrailDelta {
    pub completions: u64,
    pub span: Span,
}

/// Everything one batch writes, keyed. The maps are hashed, since a
/// rebuild folds a whole log into one plan (a lookup per event and table);
/// writers take each table's rows in key order ([`sorted`]), so that writes
/// are deterministic and lock rows in one order on PostgreSQL.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub summaries: FxHashMap<u64, SummaryDelta>,
    pub trails: FxHashMap<(u64, u64), TrailDelta>,
    pub courses: FxHashMap<(u64, u64), CourseDelta>,
    pub days: FxHashMap<(u64, String), DayDelta>,
    /// New (institution, trail, course) links.
    pub trail_courses: Vec<(u64, u64, u64)>,
    pub learners: FxHashMap<(u64, u64), LearnerDelta>,
    pub learner_trails: FxHashMap<(u64, u64, u64), LearnerTrailDelta>,
    /// Learners projection: one row per completion.
    pub completions: Vec<Completion>,
}

impl Plan {
    /// Adds `later` (the plan of the batch after this plan's events) to this
    /// plan, so that one plan covers both batches: counters add, spans
    /// widen, the latest name wins by position, new links and completion
    /// rows are appended. The result is what [`plan`] gives for the two
    /// batches as one, provided `later`'s new keys were new after this plan's.
    pub fn merge(&mut self, later: Plan) {
        use std::collections::hash_map::Entry;
        fn each<K: Eq + std::hash::Hash, V>(
            into: &mut FxHashMap<K, V>,
            from: FxHashMap<K, V>,
            add: impl Fn(&mut V, V),
        ) {
            for (k, v) in from {
                match into.entry(k) {
                    Entry::Vacant(e) => {
                        e.insert(v);
                    }
                    Entry::Occupied(mut e) => add(e.get_mut(), v),
                }
            }
        }
        each(&mut self.summaries, later.summaries, |s, d| {
            s.completions += d.completions;
            s.new_learners += d.new_learners;
            s.new_trails += d.new_trails;
            s.new_courses += d.new_courses;
            s.span.merge(d.span);
            s.last_position = s.last_position.max(d.last_position);
        });
        each(&mut self.trails, later.trails, |t, d| {
            t.name.offer(d.name.value, d.name.position);
            t.completions += d.completions;
            t.new_learners += d.new_learners;
            t.span.merge(d.span);
        });
        each(&mut self.courses, later.courses, |c, d| {
            c.title.offer(d.title.value, d.title.position);
            c.completions += d.completions;
            c.new_learners += d.new_learners;
        });
        each(&mut self.days, later.days, |day, d| {
            day.completions += d.completions;
            day.new_learners += d.new_learners;
        });
        each(&mut self.learners, later.learners, |l, d| {
            l.profile.offer(d.profile.value, d.profile.position);
            l.completions += d.completions;
            l.new_trails += d.new_trails;
            l.span.merge(d.span);
        });
        each(&mut self.learner_trails, later.learner_trails, |lt, d| {
            lt.completions += d.completions;
            lt.span.merge(d.span);
        });
        self.trail_courses.extend(later.trail_courses);
        self.completions.extend(later.completions);
    }
}

/// A plan's rows of one table, in key order.
pub(crate) fn sorted<K: Ord, V>(rows: &FxHashMap<K, V>) -> Vec<(&K, &V)> {
    let mut rows: Vec<_> = rows.iter().collect();
    rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
    rows
}

/// What `batch` changes for `kind`, given which membership keys are new.
/// `new` must be the subset of `membership_keys(kind, batch)` that was not
/// recorded before this batch.
pub fn plan(kind: ProjectionKind, batch: &[Completion], new: &MembershipKeys) -> Plan {
    let mut p = Plan::default();
    plan_into(&mut p, kind, batch, new, true);
    p
}

/// [`plan`] added into `p` (which must cover events before `batch`, as for
/// [`Plan::merge`]), with completion rows only if `rows` (a rebuild writes
/// them straight from the batch). Folding into one plan spares a rebuild a
/// plan per batch and its merge.
pub(crate) fn plan_into(
    p: &mut Plan,
    kind: ProjectionKind,
    batch: &[Completion],
    new: &MembershipKeys,
    rows: bool,
) {
    match kind {
        ProjectionKind::Institutions => plan_institutions(batch, new, p),
        ProjectionKind::Learners => plan_learners(batch, new, p, rows),
    }
}

fn plan_institutions(batch: &[Completion], new: &MembershipKeys, p: &mut Plan) {
    let mut days: FxHashMap<(u64, &str), DayDelta> = FxHashMap::default();
    for c in batch {
        let (i, t, at) = (c.institution_id, c.trail_id, c.finished_at);
        let s = p.summaries.entry(i).or_insert_with(|| SummaryDelta {
            completions: 0,
            new_learners: 0,
            new_trails: 0,
            new_courses: 0,
            span: Span::at(at),
            last_position: 0,
        });
        s.completions += 1;
        s.span.widen(at);
        s.last_position = s.last_position.max(c.position);

        let trail = p.trails.entry((i, t)).or_insert_with(|| TrailDelta {
            name: Latest {
                value: c.trail_name.clone(),
                position: c.position,
            },
            completions: 0,
            new_learners: 0,
            span: Span::at(at),
        });
        trail.name.offer_str(&c.trail_name, c.position);
        trail.completions += 1;
        trail.span.widen(at);

        // Borrowed keys while counting; owned once per row at the end.
        days.entry((i, c.day.as_str()))
            .or_insert(DayDelta {
                completions: 0,
                new_learners: 0,
            })
            .completions += 1;

        // A course listed twice in one trail counts once for this completion
        // (a trail lists a handful: a scan beats a set).
        for (k, course) in c.courses.iter().enumerate() {
            if c.courses[..k].iter().any(|earlier| earlier.id == course.id) {
                continue;
            }
            let d = p
                .courses
                .entry((i, course.id))
                .or_insert_with(|| CourseDelta {
                    title: Latest {
                        value: course.title.clone(),
                        position: c.position,
                    },
                    completions: 0,
                    new_learners: 0,
                });
            d.title.offer_str(&course.title, c.position);
            d.completions += 1;
        }
    }
    for ((i, day), d) in days {
        let row = p.days.entry((i, day.to_owned())).or_insert(DayDelta {
            completions: 0,
            new_learners: 0,
        });
        row.completions += d.completions;
        row.new_learners += d.new_learners;
    }
    let mut counter = NewMembers::default();
    for key in new.iter() {
        counter.count(p, ProjectionKind::Institutions, key);
    }
    p.trail_courses.sort_unstable();
}

/// What a new membership key adds to a plan: one to the distinct count it
/// moves (a new link for `inst_trail_courses`). The plan must have the
/// row of the key's group (it does when the key comes from its batch).
#[derive(Debug, Default)]
pub(crate) struct NewMembers {
    /// Reused for day lookups (days are owned keys in the plan).
    day: String,
}

impl NewMembers {
    pub(crate) fn count(&mut self, p: &mut Plan, kind: ProjectionKind, key: Key<'_>) {
        use ProjectionKind::{Institutions, Learners};
        match (kind, key) {
            (Institutions, Key::InstitutionLearner(i, _)) => {
                if let Some(s) = p.summaries.get_mut(&i) {
                    s.new_learners += 1;
                }
            }
            (Institutions, Key::InstitutionTrail(i, _)) => {
                if let Some(s) = p.summaries.get_mut(&i) {
                    s.new_trails += 1;
                }
            }
            (Institutions, Key::InstitutionCourse(i, _)) => {
                if let Some(s) = p.summaries.get_mut(&i) {
                    s.new_courses += 1;
                }
            }
            (Institutions, Key::TrailLearner(i, t, _)) => {
                if let Some(d) = p.trails.get_mut(&(i, t)) {
                    d.new_learners += 1;
                }
            }
            (Institutions, Key::CourseLearner(i, c, _)) => {
                if let Some(d) = p.courses.get_mut(&(i, c)) {
                    d.new_learners += 1;
                }
            }
            (Institutions, Key::TrailCourse(i, t, c)) => p.trail_courses.push((i, t, c)),
            (Institutions, Key::DayLearner(i, day, _)) => {
                day.clone_into(&mut self.day);
                let key = (i, std::mem::take(&mut self.day));
                if let Some(d) = p.days.get_mut(&key) {
                    d.new_learners += 1;
                }
                self.day = key.1;
            }
            (Learners, Key::TrailLearner(i, _, u)) => {
                if let Some(l) = p.learners.get_mut(&(i, u)) {
                    l.new_trails += 1;
                }
            }
            (Learners, _) => {}
        }
    }
}

fn plan_learners(batch: &[Completion], new: &MembershipKeys, p: &mut Plan, rows: bool) {
    for c in batch {
        let (i, u, t, at) = (c.institution_id, c.user_id, c.trail_id, c.finished_at);
        let l = p.learners.entry((i, u)).or_insert_with(|| LearnerDelta {
            profile: Latest {
                value: (c.user_name.clone(), c.user_email.clone()),
                position: c.position,
            },
            completions: 0,
            new_trails: 0,
            span: Span::at(at),
        });
        l.profile
            .offer_pair(&c.user_name, &c.user_email, c.position);
        l.completions += 1;
        l.span.widen(at);

        let lt = p
            .learner_trails
            .entry((i, u, t))
            .or_insert_with(|| LearnerTrailDelta {
                completions: 0,
                span: Span::at(at),
            });
        lt.completions += 1;
        lt.span.widen(at);
        if rows {
            p.completions.push(c.clone());
        }
    }
    let mut counter = NewMembers::default();
    for key in new.iter() {
        counter.count(p, ProjectionKind::Learners, key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::completion;

    fn all_new(kind: ProjectionKind, batch: &[Completion]) -> MembershipKeys {
        membership_keys(kind, batch)
    }

    /// Writers take a plan's rows in key order whatever order the batch
    /// brought them in: deterministic writes, one lock order on PostgreSQL.
    #[test]
    fn rows_come_in_key_order() {
        let batch: Vec<_> = (0..200u64)
            .map(|n| {
                completion(
                    n + 1,
                    20 - n % 7,
                    1000 - n,
                    5 + n % 3,
                    "2024-01-01 10:00:00",
                    &[7],
                )
            })
            .collect();
        let learners = plan(
            ProjectionKind::Learners,
            &batch,
            &all_new(ProjectionKind::Learners, &batch),
        );
        let keys: Vec<_> = sorted(&learners.learner_trails)
            .into_iter()
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(keys.len(), 200);
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
        let institutions = plan(
            ProjectionKind::Institutions,
            &batch,
            &all_new(ProjectionKind::Institutions, &batch),
        );
        let keys: Vec<_> = sorted(&institutions.trails)
            .into_iter()
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(keys.len(), 21);
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
    }

    #[test]
    fn recompletion_adds_a_completion_not_a_learner_or_trail() {
        let batch = vec![
            completion(1, 10, 100, 5, "2024-01-01 10:00:00", &[7, 8]),
            completion(2, 10, 100, 5, "2024-02-01 10:00:00", &[7, 8]),
        ];
        let p = plan(
            ProjectionKind::Institutions,
            &batch,
            &all_new(ProjectionKind::Institutions, &batch),
        );
        let s = &p.summaries[&10];
        assert_eq!(
            (s.completions, s.new_learners, s.new_trails, s.new_courses),
            (2, 1, 1, 2)
        );
        let t = &p.trails[&(10, 5)];
        assert_eq!((t.completions, t.new_learners), (2, 1));
        assert_eq!(p.courses[&(10, 7)].completions, 2);
        assert_eq!(p.courses[&(10, 7)].new_learners, 1);
        assert_eq!(p.days.len(), 2);

        let p = plan(
            ProjectionKind::Learners,
            &batch,
            &all_new(ProjectionKind::Learners, &batch),
        );
        let l = &p.learners[&(10, 100)];
        assert_eq!((l.completions, l.new_trails), (2, 1));
        assert_eq!(p.completions.len(), 2);
    }

    #[test]
    fn latest_name_wins_by_position_not_by_batch_order() {
        let mut a = completion(5, 1, 1, 1, "2024-01-01 10:00:00", &[]);
        a.trail_name = "new name".into();
        let mut b = completion(3, 1, 2, 1, "2024-01-02 10:00:00", &[]);
        b.trail_name = "old name".into();
        let batch = vec![a, b];
        let p = plan(
            ProjectionKind::Institutions,
            &batch,
            &MembershipKeys::default(),
        );
        assert_eq!(p.trails[&(1, 1)].name.value, "new name");
        assert_eq!(p.trails[&(1, 1)].name.position, 5);
    }

    #[test]
    fn known_members_do_not_count_again() {
        let batch = vec![completion(9, 1, 1, 1, "2024-01-01 10:00:00", &[3])];
        let p = plan(
            ProjectionKind::Institutions,
            &batch,
            &MembershipKeys::default(),
        );
        let s = &p.summaries[&1];
        assert_eq!(
            (s.completions, s.new_learners, s.new_trails, s.new_courses),
            (1, 0, 0, 0)
        );
        assert!(p.trail_courses.is_empty());
    }

    #[test]
    fn a_course_listed_twice_counts_once() {
        let batch = vec![completion(1, 1, 1, 1, "2024-01-01 10:00:00", &[3, 3])];
        let p = plan(
            ProjectionKind::Institutions,
            &batch,
            &all_new(ProjectionKind::Institutions, &batch),
        );
        assert_eq!(p.courses[&(1, 3)].completions, 1);
    }
}
