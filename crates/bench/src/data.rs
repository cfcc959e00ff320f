//! Realistic deliveries, generated deterministically from a seed.
//!
//! Institutions follow a Zipf law (rank `r` gets a share proportional to
//! `1 / r^s`), so a few are large and most are small. Each institution has a
//! catalogue of trails (1 to 10 courses each, courses shared between its
//! trails) and a pool of learners sized so that a learner completes about
//! four trails; picking a learner and a trail at random makes re-completions
//! (same learner and trail, a later `finished_at`) happen naturally. Names are
//! Portuguese, with accents. About `duplicate_rate` of the deliveries are
//! redeliveries of a recent one (half with the same `send_at`, half stamped
//! anew), which the tracker must answer as duplicates.
//!
//! Bodies are rendered once into one contiguous buffer; a request body is a
//! `Bytes` slice of it (a reference count, no copy).

use std::collections::VecDeque;
use std::fmt::Write as _;

use bytes::Bytes;
use chrono::{DateTime, NaiveDateTime};

/// SplitMix64: tiny, fast, and its sequence never changes with a crate
/// upgrade, so a seed means the same data forever.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n.max(1))) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

const FIRST_NAMES: &[&str] = &[
    "João",
    "José",
    "Antônio",
    "Francisco",
    "Carlos",
    "Paulo",
    "Pedro",
    "Lucas",
    "Luís",
    "Marcos",
    "Gabriel",
    "Rafael",
    "Sebastião",
    "Estêvão",
    "Otávio",
    "Vinícius",
    "Maria",
    "Ana",
    "Francisca",
    "Antônia",
    "Adriana",
    "Juliana",
    "Márcia",
    "Fernanda",
    "Patrícia",
    "Letícia",
    "Lúcia",
    "Cecília",
    "Inês",
    "Tânia",
    "Flávia",
    "Thaís",
    "Bárbara",
    "Mônica",
    "Débora",
    "Jéssica",
];

const SURNAMES: &[&str] = &[
    "Silva",
    "Santos",
    "Oliveira",
    "Souza",
    "Rodrigues",
    "Ferreira",
    "Alves",
    "Pereira",
    "Lima",
    "Gomes",
    "Ribeiro",
    "Carvalho",
    "Araújo",
    "Gonçalves",
    "Conceição",
    "Simões",
    "Magalhães",
    "Brandão",
    "Falcão",
    "Damião",
    "Assunção",
    "Guimarães",
    "Nóbrega",
    "Sá",
    "Cortês",
    "Patrício",
];

const TOPICS: &[&str] = &[
    "Ciência de Dados",
    "Gestão Pública",
    "Educação Financeira",
    "Programação Web",
    "Liderança",
    "Saúde Mental no Trabalho",
    "Língua Portuguesa",
    "Matemática Básica",
    "Logística e Operações",
    "Atendimento ao Cidadão",
    "Segurança do Trabalho",
    "Inovação e Empreendedorismo",
    "Comunicação Não Violenta",
    "Formação Pedagógica",
];

const COURSE_PREFIXES: &[&str] = &[
    "Introdução à",
    "Fundamentos de",
    "Prática de",
    "Tópicos Avançados em",
    "Oficina de",
    "Módulo de",
];

const COURSE_SUBJECTS: &[&str] = &[
    "Estatística",
    "Programação",
    "Comunicação",
    "Gestão de Projetos",
    "Ética Profissional",
    "Análise de Dados",
    "Redação Técnica",
    "Negociação",
    "Segurança da Informação",
    "Finanças Pessoais",
    "Didática",
    "Acessibilidade",
    "Legislação Trabalhista",
    "Higiene Ocupacional",
];

/// Where one delivery points, for choosing query targets and checking
/// exports.
#[derive(Debug, Clone, Copy)]
pub struct EventMeta {
    pub institution: u64,
    pub user: u64,
    pub trail: u64,
    /// `finished_at` as wall-clock seconds since the Unix epoch (no zone).
    pub finished_at: i64,
    /// A redelivery of an earlier delivery of this data set.
    pub duplicate: bool,
}

/// A batch of rendered deliveries.
#[derive(Debug, Clone)]
pub struct Deliveries {
    buf: Bytes,
    ranges: Vec<(usize, usize)>,
    pub meta: Vec<EventMeta>,
}

impl Deliveries {
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The body of delivery `i` (a view of the shared buffer).
    pub fn body(&self, i: usize) -> Bytes {
        let (start, end) = self.ranges[i];
        self.buf.slice(start..end)
    }

    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    pub fn duplicates(&self) -> usize {
        self.meta.iter().filter(|m| m.duplicate).count()
    }
}

#[derive(Debug, Clone)]
struct Trail {
    id: u64,
    name: String,
    courses: Vec<(u64, String)>,
}

#[derive(Debug, Clone)]
pub struct Institution {
    pub id: u64,
    /// Learner ids are `user_base + 1 ..= user_base + learners`.
    user_base: u64,
    learners: u64,
    trails: Vec<Trail>,
}

/// One completion, kept for a while so it can be redelivered.
#[derive(Debug, Clone, Copy)]
struct Sent {
    institution: usize,
    user: u64,
    trail: usize,
    finished_at: i64,
    send_at: i64,
}

/// The generator: same seed and sizes, same deliveries, in the same order.
#[derive(Debug, Clone)]
pub struct Generator {
    rng: Rng,
    institutions: Vec<Institution>,
    /// Cumulative Zipf weights over `institutions`.
    cdf: Vec<f64>,
    clock: i64,
    step: i64,
    duplicate_rate: f64,
    recent: VecDeque<Sent>,
}

/// A learner completes about this many trails over the data set.
const COMPLETIONS_PER_LEARNER: f64 = 4.0;
/// The data set spans about two years of completions.
const SPAN_SECS: i64 = 2 * 365 * 86_400;
/// 2023-01-01 00:00:00.
const START: i64 = 1_672_531_200;
/// How far back a redelivery reaches.
const RECENT: usize = 2_000;

impl Generator {
    /// A generator for about `expected_events` deliveries over
    /// `institutions` institutions with Zipf exponent `zipf_s`.
    pub fn new(
        seed: u64,
        institutions: usize,
        zipf_s: f64,
        expected_events: usize,
        duplicate_rate: f64,
    ) -> Self {
        let mut rng = Rng::new(seed);
        let count = institutions.max(1);
        let weights: Vec<f64> = (1..=count).map(|r| 1.0 / (r as f64).powf(zipf_s)).collect();
        let total: f64 = weights.iter().sum();
        let mut cdf = Vec::with_capacity(count);
        let mut acc = 0.0;
        for w in &weights {
            acc += w / total;
            cdf.push(acc);
        }
        let mut user_base = 100_000u64;
        let mut trail_id = 500_000u64;
        let mut course_id = 900_000u64;
        let mut list = Vec::with_capacity(count);
        for (rank, w) in weights.iter().enumerate() {
            let share = w / total;
            let expected = share * expected_events as f64;
            let learners = (expected / COMPLETIONS_PER_LEARNER).ceil().max(1.0) as u64;
            // Large institutions offer more trails; every one offers a few.
            let trail_count = (3.0 + expected.sqrt() / 4.0).min(80.0) as usize;
            let catalogue_size = (trail_count * 3).max(10);
            let catalogue: Vec<(u64, String)> = (0..catalogue_size)
                .map(|_| {
                    course_id += 1 + rng.below(3);
                    let title = format!(
                        "{} {}",
                        rng.pick(COURSE_PREFIXES),
                        rng.pick(COURSE_SUBJECTS)
                    );
                    (course_id, title)
                })
                .collect();
            let trails = (0..trail_count)
                .map(|n| {
                    trail_id += 1 + rng.below(5);
                    let size = 1 + rng.below(10) as usize;
                    let mut courses: Vec<(u64, String)> = Vec::with_capacity(size);
                    while courses.len() < size {
                        let c = rng.pick(&catalogue).clone();
                        if !courses.iter().any(|(id, _)| *id == c.0) {
                            courses.push(c);
                        }
                    }
                    Trail {
                        id: trail_id,
                        name: format!("Formação em {} — Módulo {}", rng.pick(TOPICS), n + 1),
                        courses,
                    }
                })
                .collect();
            list.push(Institution {
                // Ids unrelated to size, as on a real platform.
                id: 1_000 + (rank as u64 * 7_919) % 1_000_003,
                user_base,
                learners,
                trails,
            });
            user_base += learners + 1 + rng.below(100);
        }
        let step = (SPAN_SECS / expected_events.max(1) as i64).max(1);
        Self {
            rng,
            institutions: list,
            cdf,
            clock: START,
            step,
            duplicate_rate,
            recent: VecDeque::with_capacity(RECENT),
        }
    }

    pub fn institutions(&self) -> &[Institution] {
        &self.institutions
    }

    /// Renders the next `n` deliveries.
    pub fn generate(&mut self, n: usize) -> Deliveries {
        let mut buf = String::with_capacity(n * 900);
        let mut ranges = Vec::with_capacity(n);
        let mut meta = Vec::with_capacity(n);
        for _ in 0..n {
            let (sent, duplicate) =
                if !self.recent.is_empty() && self.rng.unit() < self.duplicate_rate {
                    let i = self.rng.below(self.recent.len() as u64) as usize;
                    let mut again = self.recent[i];
                    if self.rng.below(2) == 0 {
                        // A redelivery may be stamped anew; the id ignores send_at.
                        again.send_at = self.clock + self.rng.below(600) as i64;
                    }
                    (again, true)
                } else {
                    let sent = self.next_completion();
                    if self.recent.len() == RECENT {
                        self.recent.pop_front();
                    }
                    self.recent.push_back(sent);
                    (sent, false)
                };
            let start = buf.len();
            self.render(&mut buf, &sent);
            ranges.push((start, buf.len()));
            let inst = &self.institutions[sent.institution];
            meta.push(EventMeta {
                institution: inst.id,
                user: sent.user,
                trail: inst.trails[sent.trail].id,
                finished_at: sent.finished_at,
                duplicate,
            });
        }
        Deliveries {
            buf: Bytes::from(buf.into_bytes()),
            ranges,
            meta,
        }
    }

    fn next_completion(&mut self) -> Sent {
        let u = self.rng.unit();
        let institution = self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1);
        let inst = &self.institutions[institution];
        let user = inst.user_base + 1 + self.rng.below(inst.learners);
        // Earlier trails of the catalogue are the popular ones.
        let t = self.rng.unit();
        let trail = ((t * t) * inst.trails.len() as f64) as usize;
        self.clock += 1 + self.rng.below(2 * self.step as u64) as i64;
        let finished_at = self.clock;
        let send_at = finished_at + self.rng.below(30) as i64;
        Sent {
            institution,
            user,
            trail: trail.min(inst.trails.len() - 1),
            finished_at,
            send_at,
        }
    }

    fn render(&self, out: &mut String, sent: &Sent) {
        let inst = &self.institutions[sent.institution];
        let trail = &inst.trails[sent.trail];
        let (name, email) = learner_name(sent.user);
        // Infallible: writing to a String.
        let _ = write!(
            out,
            r#"{{"event":{{"name":"Atividades - Trilha concluída","slug":"activities.trail.completed","send_at":"{}"}},"data":{{"institution":{{"id":{}}},"user":{{"id":{},"name":"{}","email":"{}"}},"trail":{{"id":{},"name":"{}","finished_at":"{}","courses":["#,
            wall(sent.send_at),
            inst.id,
            sent.user,
            name,
            email,
            trail.id,
            trail.name,
            wall(sent.finished_at),
        );
        for (i, (id, title)) in trail.courses.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, r#"{{"id":{id},"title":"{title}"}}"#);
        }
        out.push_str("]}}}");
    }
}

/// A learner's name and e-mail, a pure function of the id (so every
/// delivery of a learner names them the same way).
pub fn learner_name(user: u64) -> (String, String) {
    let mut rng = Rng::new(user.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let first = rng.pick(FIRST_NAMES);
    let middle = rng.pick(SURNAMES);
    let last = rng.pick(SURNAMES);
    let name = format!("{first} {middle} {last}");
    let email = format!(
        "{}.{}{}@example.edu.br",
        ascii_fold(first),
        ascii_fold(last),
        user % 1000
    );
    (name, email)
}

fn ascii_fold(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            'á' | 'à' | 'â' | 'ã' | 'Á' | 'Â' | 'Ã' => 'a',
            'é' | 'ê' | 'É' | 'Ê' => 'e',
            'í' | 'Í' => 'i',
            'ó' | 'ô' | 'õ' | 'Ó' | 'Ô' => 'o',
            'ú' | 'Ú' => 'u',
            'ç' | 'Ç' => 'c',
            other => other.to_ascii_lowercase(),
        })
        .collect()
}

/// `yyyy-MM-dd HH:mm:ss` of wall-clock seconds.
pub fn wall(secs: i64) -> String {
    DateTime::from_timestamp(secs, 0)
        .map(|t| t.naive_utc())
        .unwrap_or(NaiveDateTime::MIN)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bodies_and_bodies_are_json() {
        let mut a = Generator::new(7, 50, 1.0, 2_000, 0.01);
        let mut b = Generator::new(7, 50, 1.0, 2_000, 0.01);
        let da = a.generate(2_000);
        let db = b.generate(2_000);
        for i in 0..da.len() {
            assert_eq!(da.body(i), db.body(i));
            let v: serde_json::Value =
                serde_json::from_slice(&da.body(i)).unwrap_or(serde_json::Value::Null);
            let courses = v["data"]["trail"]["courses"].as_array().map_or(0, Vec::len);
            assert!((1..=10).contains(&courses), "{v}");
        }
        let dups = da.duplicates();
        assert!((5..=50).contains(&dups), "about 1% duplicates, got {dups}");
    }

    #[test]
    fn a_few_institutions_are_large_and_learners_recomplete() {
        let mut g = Generator::new(1, 1_000, 1.0, 20_000, 0.0);
        let d = g.generate(20_000);
        let mut per_inst = std::collections::HashMap::<u64, usize>::new();
        let mut pairs = std::collections::HashSet::new();
        let mut recompletions = 0;
        for m in &d.meta {
            *per_inst.entry(m.institution).or_default() += 1;
            if !pairs.insert((m.institution, m.user, m.trail)) {
                recompletions += 1;
            }
        }
        let largest = per_inst.values().copied().max().unwrap_or(0);
        assert!(largest > 1_000, "the largest institution has {largest}");
        assert!(per_inst.len() > 300, "{} institutions seen", per_inst.len());
        assert!(recompletions > 100, "{recompletions} re-completions");
    }

    #[test]
    fn names_carry_accents() {
        let accented = (1..200u64)
            .map(|u| learner_name(u).0)
            .filter(|n| !n.is_ascii())
            .count();
        assert!(accented > 50);
        assert!(learner_name(5).1.is_ascii());
    }
}
