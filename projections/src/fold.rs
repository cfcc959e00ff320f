//! A rebuild's read models, folded in memory.
//!
//! A rebuild starts from an empty generation, so which membership keys are
//! new needs no database: the fold keeps every key seen so far in memory and
//! asks [`plan`] with exactly the keys the read store would have reported
//! as new. The plans of all batches are merged into one ([`Plan::merge`]),
//! so each read-model row is written once, at the end, in key order, instead
//! of being upserted by every batch that touches it.
//!
//! Completion rows (one per event, most of the volume) are not kept: the
//! caller writes them from the batches as it goes ([`Fold::writes_rows`]).

use rustc_hash::{FxHashMap, FxHashSet};

use crate::model::Completion;
use crate::plan::{Key, MembershipKeys, NewMembers, Plan, ProjectionKind, each_key, plan_into};

/// Every membership key of a fold, sorted in the tables' primary-key order
/// (text in byte order, as SQLite's `BINARY` and PostgreSQL's `"C"`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Membership {
    /// (institution, user)
    pub institution_learners: Vec<(u64, u64)>,
    /// (institution, trail)
    pub institution_trails: Vec<(u64, u64)>,
    /// (institution, course)
    pub institution_courses: Vec<(u64, u64)>,
    /// (institution, trail, user)
    pub trail_learners: Vec<(u64, u64, u64)>,
    /// (institution, course, user)
    pub course_learners: Vec<(u64, u64, u64)>,
    /// (institution, trail, course): also the `inst_trail_courses` rows,
    /// which are [`Plan::trail_courses`] too.
    pub trail_courses: Vec<(u64, u64, u64)>,
    /// (institution, index into `days`, user); `days` is sorted, so the
    /// order of the indexes is the order of the days.
    pub day_learners: Vec<(u64, u32, u64)>,
    pub days: Vec<String>,
}

impl Membership {
    /// Every key, table by table, each in order.
    pub fn keys(&self) -> impl Iterator<Item = Key<'_>> {
        let il = self.institution_learners.iter();
        let it = self.institution_trails.iter();
        let ic = self.institution_courses.iter();
        il.map(|&(i, u)| Key::InstitutionLearner(i, u))
            .chain(it.map(|&(i, t)| Key::InstitutionTrail(i, t)))
            .chain(ic.map(|&(i, c)| Key::InstitutionCourse(i, c)))
            .chain(
                self.trail_learners
                    .iter()
                    .map(|&(i, t, u)| Key::TrailLearner(i, t, u)),
            )
            .chain(
                self.course_learners
                    .iter()
                    .map(|&(i, c, u)| Key::CourseLearner(i, c, u)),
            )
            .chain(
                self.trail_courses
                    .iter()
                    .map(|&(i, t, c)| Key::TrailCourse(i, t, c)),
            )
            .chain(self.day_learners.iter().filter_map(|&(i, d, u)| {
                self.days
                    .get(d as usize)
                    .map(|day| Key::DayLearner(i, day, u))
            }))
    }

    /// The same keys as [`MembershipKeys`] (for tests and comparisons).
    pub fn to_keys(&self) -> MembershipKeys {
        MembershipKeys {
            institution_learners: self.institution_learners.iter().copied().collect(),
            institution_trails: self.institution_trails.iter().copied().collect(),
            institution_courses: self.institution_courses.iter().copied().collect(),
            trail_learners: self.trail_learners.iter().copied().collect(),
            course_learners: self.course_learners.iter().copied().collect(),
            trail_courses: self.trail_courses.iter().copied().collect(),
            day_learners: self
                .day_learners
                .iter()
                .map(|&(i, d, u)| (i, self.days[d as usize].clone(), u))
                .collect(),
        }
    }
}

/// Keys that recur a lot (one per completion or per course of one): kept
/// as they come and sorted and deduplicated now and then, which costs far
/// less than a hash-set probe per key into millions of entries.
#[derive(Debug, Default)]
struct Heap<K> {
    keys: Vec<K>,
    /// Length after the last dedup: the next one when it has doubled.
    distinct: usize,
}

impl<K: Ord + Copy> Heap<K> {
    fn push(&mut self, key: K) {
        self.keys.push(key);
    }

    fn compact_if_doubled(&mut self) {
        if self.keys.len() > 2 * self.distinct + 1_000_000 {
            self.compact();
        }
    }

    fn compact(&mut self) {
        self.keys.sort_unstable();
        self.keys.dedup();
        self.distinct = self.keys.len();
    }

    fn into_sorted(mut self) -> Vec<K> {
        self.compact();
        self.keys
    }
}

fn sorted<K: Ord>(set: FxHashSet<K>) -> Vec<K> {
    let mut v: Vec<K> = set.into_iter().collect();
    v.sort_unstable();
    v
}

/// The keys seen so far. Days are interned (a few thousand distinct days
/// against millions of (institution, day, learner) keys). Keys bounded by
/// the catalogue (an institution's trails and courses) stay few: hash sets.
#[derive(Debug, Default)]
struct Seen {
    institution_learners: Heap<(u64, u64)>,
    institution_trails: FxHashSet<(u64, u64)>,
    institution_courses: FxHashSet<(u64, u64)>,
    trail_learners: Heap<(u64, u64, u64)>,
    course_learners: Heap<(u64, u64, u64)>,
    trail_courses: FxHashSet<(u64, u64, u64)>,
    day_learners: Heap<(u64, u32, u64)>,
    day_index: FxHashMap<String, u32>,
}

impl Seen {
    fn record(&mut self, kind: ProjectionKind, batch: &[Completion]) {
        each_key(kind, batch, |key| self.insert(key));
        self.institution_learners.compact_if_doubled();
        self.trail_learners.compact_if_doubled();
        self.course_learners.compact_if_doubled();
        self.day_learners.compact_if_doubled();
    }

    fn insert(&mut self, key: Key<'_>) {
        match key {
            Key::InstitutionLearner(i, u) => self.institution_learners.push((i, u)),
            Key::InstitutionTrail(i, t) => {
                self.institution_trails.insert((i, t));
            }
            Key::InstitutionCourse(i, c) => {
                self.institution_courses.insert((i, c));
            }
            Key::TrailLearner(i, t, u) => self.trail_learners.push((i, t, u)),
            Key::CourseLearner(i, c, u) => self.course_learners.push((i, c, u)),
            Key::TrailCourse(i, t, c) => {
                self.trail_courses.insert((i, t, c));
            }
            Key::DayLearner(i, day, u) => {
                let d = match self.day_index.get(day) {
                    Some(d) => *d,
                    None => {
                        let d = u32::try_from(self.day_index.len()).unwrap_or(u32::MAX);
                        self.day_index.insert(day.to_owned(), d);
                        d
                    }
                };
                self.day_learners.push((i, d, u));
            }
        }
    }

    fn into_sorted(self) -> Membership {
        // Renumber days in sorted order, so that index order is day order.
        let mut days: Vec<(String, u32)> = self.day_index.into_iter().collect();
        days.sort_unstable();
        let mut renumber = vec![0u32; days.len()];
        for (new, (_, old)) in days.iter().enumerate() {
            if let Some(slot) = renumber.get_mut(*old as usize) {
                *slot = u32::try_from(new).unwrap_or(u32::MAX);
            }
        }
        let mut day_learners = self.day_learners;
        for key in &mut day_learners.keys {
            key.1 = renumber.get(key.1 as usize).copied().unwrap_or(key.1);
        }
        Membership {
            institution_learners: self.institution_learners.into_sorted(),
            institution_trails: sorted(self.institution_trails),
            institution_courses: sorted(self.institution_courses),
            trail_learners: self.trail_learners.into_sorted(),
            course_learners: self.course_learners.into_sorted(),
            trail_courses: sorted(self.trail_courses),
            day_learners: day_learners.into_sorted(),
            days: days.into_iter().map(|(d, _)| d).collect(),
        }
    }
}

/// One projection's rebuild, batch by batch.
#[derive(Debug)]
pub struct Fold {
    kind: ProjectionKind,
    seen: Seen,
    plan: Plan,
}

impl Fold {
    pub fn new(kind: ProjectionKind) -> Self {
        Self {
            kind,
            seen: Seen::default(),
            plan: Plan::default(),
        }
    }

    pub fn kind(&self) -> ProjectionKind {
        self.kind
    }

    /// Whether this projection has one row per completion (the learners
    /// projection), which the fold does not keep: the caller writes each
    /// batch's completions as they are, in position order.
    pub fn writes_rows(&self) -> bool {
        self.kind == ProjectionKind::Learners
    }

    /// Folds the next batch (every position above the previous batch's):
    /// its counts now, with no key new; the distinct counts at `finish`,
    /// from every key at once.
    pub fn add(&mut self, batch: &[Completion]) {
        self.seen.record(self.kind, batch);
        plan_into(
            &mut self.plan,
            self.kind,
            batch,
            &MembershipKeys::default(),
            false,
        );
    }

    /// The merged plan (without completion rows) and every membership key,
    /// both in key order. Every key is new to the empty generation: each
    /// adds to its distinct count, as in [`crate::plan::plan`].
    pub fn finish(self) -> (Plan, Membership) {
        let mut plan = self.plan;
        let membership = self.seen.into_sorted();
        let mut counter = NewMembers::default();
        for key in membership.keys() {
            counter.count(&mut plan, self.kind, key);
        }
        plan.trail_courses.sort_unstable();
        (plan, membership)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use proptest::prelude::*;

    use super::*;
    use crate::model::tests::completion;
    use crate::plan::{membership_keys, plan};

    fn batch_strategy() -> impl Strategy<Value = Vec<Completion>> {
        proptest::collection::vec(
            (
                1u64..4,
                1u64..6,
                1u64..5,
                0u32..40,
                proptest::collection::vec(1u64..8, 0..4),
                0u8..3,
            ),
            0..60,
        )
        .prop_map(|rows| {
            rows.into_iter()
                .enumerate()
                .map(|(k, (inst, user, trail, minute, courses, name))| {
                    let raw = format!("2024-05-{:02} 10:{:02}:00", 1 + minute % 12, minute);
                    let mut c = completion(k as u64 + 1, inst, user, trail, &raw, &courses);
                    c.trail_name = format!("trail {trail} v{name}");
                    c.user_name = format!("user {user} v{name}");
                    for course in &mut c.courses {
                        course.title = format!("c{} v{name}", course.id);
                    }
                    c
                })
                .collect()
        })
    }

    fn fold_rows(kind: ProjectionKind) -> bool {
        Fold::new(kind).writes_rows()
    }

    proptest! {
        /// Folding the batches one by one gives the plan of all of them as
        /// one batch into an empty store (every key new), but for the
        /// completion rows, and exactly its keys.
        #[test]
        fn folding_any_split_equals_one_plan(events in batch_strategy(), cuts in proptest::collection::vec(0usize..60, 0..6)) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(events.len())).collect();
            cuts.push(0);
            cuts.push(events.len());
            cuts.sort_unstable();
            for kind in ProjectionKind::ALL {
                let mut fold = Fold::new(kind);
                for w in cuts.windows(2) {
                    fold.add(&events[w[0]..w[1]]);
                }
                prop_assert_eq!(fold.writes_rows(), kind == ProjectionKind::Learners);
                let (folded, members) = fold.finish();
                let all = membership_keys(kind, &events);
                let mut whole = plan(kind, &events, &all);
                prop_assert_eq!(whole.completions.len(), if fold_rows(kind) { events.len() } else { 0 });
                whole.completions.clear();
                prop_assert_eq!(&folded, &whole);
                prop_assert_eq!(members.to_keys(), all.clone());

                // Plan::merge: the plans of the parts, each with the keys
                // new after the parts before it, merge into the whole plan.
                let mut merged = Plan::default();
                let mut known = MembershipKeys::default();
                for w in cuts.windows(2) {
                    let part = &events[w[0]..w[1]];
                    let mut new = MembershipKeys::default();
                    each_key(kind, part, |k| {
                        let mut one = MembershipKeys::default();
                        one.insert(k);
                        if one.iter().all(|k| !known.iter().any(|seen| seen == k)) {
                            new.insert(k);
                        }
                    });
                    for k in new.iter() {
                        known.insert(k);
                    }
                    merged.merge(plan(kind, part, &new));
                }
                merged.trail_courses.sort_unstable();
                let whole_with_rows = plan(kind, &events, &all);
                prop_assert_eq!(merged, whole_with_rows);
            }
        }
    }

    #[test]
    fn membership_comes_out_in_key_order() {
        let events = [
            completion(1, 2, 9, 1, "2024-05-03 10:00:00", &[4, 1]),
            completion(2, 1, 7, 3, "2024-05-01 10:00:00", &[2]),
            completion(3, 1, 5, 3, "2024-05-02 10:00:00", &[2]),
            completion(4, 1, 5, 3, "2024-04-30 10:00:00", &[2]),
        ];
        let mut fold = Fold::new(ProjectionKind::Institutions);
        fold.add(&events[..2]);
        fold.add(&events[2..]);
        let (p, m) = fold.finish();
        assert_eq!(m.institution_learners, vec![(1, 5), (1, 7), (2, 9)]);
        assert_eq!(
            m.course_learners,
            vec![(1, 2, 5), (1, 2, 7), (2, 1, 9), (2, 4, 9)]
        );
        assert_eq!(
            m.days,
            vec!["2024-04-30", "2024-05-01", "2024-05-02", "2024-05-03"]
        );
        // (institution, day, user) in day order, whatever order days came in.
        assert_eq!(
            m.day_learners,
            vec![(1, 0, 5), (1, 1, 7), (1, 2, 5), (2, 3, 9)]
        );
        assert_eq!(p.trail_courses, vec![(1, 3, 2), (2, 1, 1), (2, 1, 4)]);
        assert_eq!(p.summaries[&1].new_learners, 2);
        assert_eq!(p.summaries[&1].completions, 3);
    }
}
