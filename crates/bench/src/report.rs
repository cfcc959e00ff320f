//! The report: every phase with the method that produced its numbers, the
//! targets of the benchmark issue, a printed table and a JSON file.

use std::fmt::Write as _;

use serde::Serialize;

use crate::child::Peak;
use crate::stats::Latency;

/// How a phase ended.
#[derive(Debug, Clone, Serialize)]
pub struct Phase<T> {
    /// `ok`, `skipped: <why>` or `failed: <error>`.
    pub status: String,
    /// How the numbers were obtained.
    pub method: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<T>,
    /// Peak resident memory of the measured tracker process during the
    /// phase, MiB (`tracker serve`, or `tracker replay` for replays).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_mib: Option<f64>,
    /// Of which the process's own memory (`RssAnon`, peak in the phase):
    /// the rest is mapped file pages, shared with the OS page cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_anon_mib: Option<f64>,
    /// CPU used during the phase, in % of one core (the machine has
    /// `machine.cores` x 100 %): the measured tracker process ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_pct: Option<f64>,
    /// ... and this bench process (load generator; in the ceiling phase,
    /// the ceiling server too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bench_cpu_pct: Option<f64>,
}

impl<T> Phase<T> {
    pub fn ok(method: impl Into<String>, result: T, peak: Option<Peak>) -> Self {
        Self {
            status: "ok".into(),
            method: method.into(),
            result: Some(result),
            peak_rss_mib: peak.map(|p| mib(p.rss)),
            peak_anon_mib: peak.map(|p| mib(p.anon)),
            server_cpu_pct: None,
            bench_cpu_pct: None,
        }
    }

    /// Adds CPU use over `wall` seconds.
    pub fn with_cpu(mut self, server_secs: Option<f64>, bench_secs: f64, wall: f64) -> Self {
        let pct = |s: f64| (s / wall.max(1e-9) * 1000.0).round() / 10.0;
        self.server_cpu_pct = server_secs.map(pct);
        self.bench_cpu_pct = Some(pct(bench_secs));
        self
    }

    pub fn skipped(method: impl Into<String>, why: impl std::fmt::Display) -> Self {
        Self {
            status: format!("skipped: {why}"),
            method: method.into(),
            result: None,
            peak_rss_mib: None,
            peak_anon_mib: None,
            server_cpu_pct: None,
            bench_cpu_pct: None,
        }
    }

    pub fn failed(method: impl Into<String>, error: impl std::fmt::Display) -> Self {
        Self {
            status: format!("failed: {error}"),
            method: method.into(),
            result: None,
            peak_rss_mib: None,
            peak_anon_mib: None,
            server_cpu_pct: None,
            bench_cpu_pct: None,
        }
    }

    pub fn is_ok(&self) -> bool {
        self.status == "ok"
    }
}

pub fn mib(bytes: u64) -> f64 {
    (bytes as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub memory_gib: f64,
    pub kernel: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Dataset {
    pub seed: u64,
    pub deliveries: usize,
    pub duplicate_deliveries: usize,
    pub institutions: usize,
    pub institutions_with_events: usize,
    pub largest_institution_deliveries: usize,
    pub learners: usize,
    pub recompletions: usize,
    pub mean_body_bytes: f64,
    pub generation_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub requests: u64,
    pub failures: crate::load::Failures,
    pub secs: f64,
    pub per_sec: f64,
    /// Closed-loop latency (each connection waits for its answer).
    pub latency: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ingest {
    #[serde(flatten)]
    pub run: Throughput,
    pub duplicates_answered: u64,
    /// Events in the log afterwards (deliveries less duplicates).
    pub log_head: u64,
    /// Ingest rate over the ceiling's rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling_ratio: Option<f64>,
    /// `(seconds since start, log head)` every 10 s: how the rate holds up
    /// as the log grows.
    pub log_timeline: Vec<(f64, u64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FixedRate {
    pub target_per_sec: f64,
    pub achieved_per_sec: f64,
    pub requests: u64,
    pub failures: crate::load::Failures,
    pub secs: f64,
    /// From the intended send time (coordinated-omission corrected).
    pub latency: Latency,
    /// From the actual send time (not corrected), for comparison.
    pub service_time: Latency,
    /// How late the generator itself sent when the connection was idle.
    pub generator_send_lag: Latency,
    /// Requests sent late because their connection still waited for an
    /// earlier answer (the server behind the rate), and their share of all.
    pub late_sends: u64,
    pub late_share: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag: Option<Lag>,
    /// How long after the last answer of the phase the projections reached
    /// the log head (a backlog the live projector had built up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catch_up_after_secs: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Lag {
    /// Acknowledged appends to visible in every read model.
    pub latency: Latency,
    /// Appends not visible by the end of the wait.
    pub never_visible: u64,
    /// Where the checkpoints were read.
    pub checkpoints_from: String,
    /// Events the slower projection covered per second while the load ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub projected_per_sec_under_load: Option<f64>,
    pub polls: u64,
    pub median_poll_interval_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Replay {
    pub events: u64,
    pub secs: f64,
    pub events_per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Query {
    pub name: String,
    pub example: String,
    #[serde(flatten)]
    pub run: Throughput,
}

/// The whole log as NDJSON (`GET /v1/events`), then the largest
/// institution's events.
#[derive(Debug, Clone, Serialize)]
pub struct Export {
    /// Lines received.
    pub events: u64,
    pub bytes: u64,
    pub secs: f64,
    pub events_per_sec: f64,
    pub mib_per_sec: f64,
    pub log_head: u64,
    /// Every event of the log came out within `export_secs`.
    pub complete: bool,
    pub rss_before_mib: f64,
    /// Peak VmRSS during the whole-log export less VmRSS before it.
    pub rss_growth_mib: f64,
    pub largest_institution: ExportOne,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportOne {
    pub institution: u64,
    pub events: u64,
    pub expected_events: u64,
    pub bytes: u64,
    pub secs: f64,
    pub events_per_sec: f64,
    /// The whole log's size over the time: what reading all of it to find
    /// one institution would have had to reach. Arithmetic, not a reading:
    /// the server reads only the institution's streams' key ranges.
    pub log_events_per_sec: f64,
    pub complete: bool,
    /// Peak VmRSS during this export less VmRSS before the phase.
    pub rss_growth_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Phases {
    pub ceiling: Phase<Throughput>,
    pub ingest: Phase<Ingest>,
    pub replay_sqlite: Phase<Replay>,
    pub replay_postgres: Phase<Replay>,
    pub fixed_rate: Phase<FixedRate>,
    pub queries: Phase<Vec<Query>>,
    pub export: Phase<Export>,
}

/// One line of the targets table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub measure: String,
    pub result: String,
    pub target: String,
    /// `yes`, `NO`, or `n/a` (not measured).
    pub met: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub command: String,
    pub started_at: String,
    pub machine: Machine,
    pub tracker: String,
    /// Whether the tracker served the query API (`GET /openapi.json`).
    pub api_available: bool,
    pub dataset: Dataset,
    pub phases: Phases,
    pub table: Vec<Row>,
    pub memory: Vec<Row>,
}

fn met(ok: Option<bool>) -> String {
    match ok {
        Some(true) => "yes".into(),
        Some(false) => "NO".into(),
        None => "n/a".into(),
    }
}

fn status_or<T>(phase: &Phase<T>, f: impl FnOnce(&T) -> String) -> String {
    match &phase.result {
        Some(r) => f(r),
        None => phase.status.clone(),
    }
}

/// The targets of issue 6, against what was measured.
pub fn table(p: &Phases) -> Vec<Row> {
    let mut rows = Vec::new();
    let ingest = p.ingest.result.as_ref();
    rows.push(Row {
        measure: "durable ingest (closed loop, peak)".into(),
        result: status_or(&p.ingest, |r| {
            format!(
                "{:.0} webhooks/s{}",
                r.run.per_sec,
                r.ceiling_ratio
                    .map(|c| format!(", {c:.2} of ceiling"))
                    .unwrap_or_default()
            )
        }),
        target: ">= 30,000/s and >= 0.5 of ceiling".into(),
        met: met(ingest.map(|r| r.run.per_sec >= 30_000.0 && r.ceiling_ratio.unwrap_or(0.0) >= 0.5)),
    });
    rows.push(Row {
        measure: "no-store ceiling (same generator)".into(),
        result: status_or(&p.ceiling, |r| format!("{:.0} req/s", r.per_sec)),
        target: "(baseline)".into(),
        met: "n/a".into(),
    });
    let fixed = p.fixed_rate.result.as_ref();
    rows.push(Row {
        measure: "ingest latency at half of peak (from intended send)".into(),
        result: status_or(&p.fixed_rate, |r| {
            // Past 1% the server did not hold the rate: its queue, and the
            // latency, grew with the phase's length.
            let behind = if r.late_share > 0.01 {
                format!(", {:.0}% sent late: behind the rate", r.late_share * 100.0)
            } else {
                String::new()
            };
            format!(
                "p50 {:.2} / p99 {:.2} / p99.9 {:.2} ms at {:.0}/s{behind}",
                r.latency.p50_ms, r.latency.p99_ms, r.latency.p999_ms, r.achieved_per_sec
            )
        }),
        target: "p99 <= 5 ms".into(),
        met: met(fixed.map(|r| r.latency.p99_ms <= 5.0 && r.failures.total() == 0)),
    });
    for (name, phase, goal) in [
        ("replay into SQLite", &p.replay_sqlite, 250_000.0),
        ("replay into PostgreSQL", &p.replay_postgres, 100_000.0),
    ] {
        rows.push(Row {
            measure: name.into(),
            result: status_or(phase, |r| format!("{:.0} events/s", r.events_per_sec)),
            target: format!(">= {goal:.0} events/s"),
            met: met(phase.result.as_ref().map(|r| r.events_per_sec >= goal)),
        });
    }
    let lag = fixed.and_then(|r| r.lag.as_ref());
    rows.push(Row {
        measure: "live projection lag (append ack to visible)".into(),
        result: match lag {
            Some(l) => format!(
                "p50 {:.1} / p99 {:.1} ms{}",
                l.latency.p50_ms,
                l.latency.p99_ms,
                if l.never_visible > 0 {
                    format!(", {} never visible", l.never_visible)
                } else {
                    String::new()
                }
            ),
            None => p.fixed_rate.status.clone(),
        },
        target: "p99 <= 50 ms".into(),
        met: met(lag.map(|l| l.latency.p99_ms <= 50.0 && l.never_visible == 0)),
    });
    match &p.queries.result {
        Some(queries) => {
            for q in queries {
                rows.push(Row {
                    measure: format!("query: {}", q.name),
                    result: format!(
                        "p50 {:.2} / p99 {:.2} ms, {:.0} req/s",
                        q.run.latency.p50_ms, q.run.latency.p99_ms, q.run.per_sec
                    ),
                    target: "p99 <= 2 ms, >= 20,000 req/s".into(),
                    met: met(Some(
                        q.run.latency.p99_ms <= 2.0
                            && q.run.per_sec >= 20_000.0
                            && q.run.failures.total() == 0,
                    )),
                });
            }
        }
        None => rows.push(Row {
            measure: "queries".into(),
            result: p.queries.status.clone(),
            target: "p99 <= 2 ms, >= 20,000 req/s".into(),
            met: "n/a".into(),
        }),
    }
    let export = p.export.result.as_ref();
    rows.push(Row {
        measure: "NDJSON export of the whole log (GET /v1/events)".into(),
        result: status_or(&p.export, |r| {
            format!(
                "{:.0} events/s ({} of {} events, {:.0} MiB/s), RSS +{:.1} MiB{}",
                r.events_per_sec,
                r.events,
                r.log_head,
                r.mib_per_sec,
                r.rss_growth_mib,
                if r.complete { "" } else { " (incomplete)" }
            )
        }),
        target: ">= 200,000 events/s, memory flat".into(),
        met: met(export
            .map(|r| r.events_per_sec >= 200_000.0 && r.rss_growth_mib <= FLAT_MIB && r.complete)),
    });
    rows.push(Row {
        measure: "NDJSON export, largest institution's history".into(),
        result: status_or(&p.export, |r| {
            let one = &r.largest_institution;
            format!(
                "{:.0} events/s ({} events), RSS +{:.1} MiB",
                one.events_per_sec, one.events, one.rss_growth_mib
            )
        }),
        target: ">= 200,000 events/s, memory flat".into(),
        met: met(export.map(|r| {
            let one = &r.largest_institution;
            one.events_per_sec >= 200_000.0 && one.rss_growth_mib <= FLAT_MIB && one.complete
        })),
    });
    rows
}

/// Export memory counts as flat when the server grows by at most this much
/// while streaming the whole log (holding a million events would take
/// hundreds of MiB).
pub const FLAT_MIB: f64 = 64.0;

/// Peak resident memory per phase.
pub fn memory(p: &Phases) -> Vec<Row> {
    fn row<T>(name: &str, process: &str, phase: &Phase<T>) -> Row {
        let cpu = |v: Option<f64>| v.map_or_else(|| "n/a".into(), |c| format!("{c:.0}%"));
        Row {
            measure: name.into(),
            result: match (phase.peak_rss_mib, phase.peak_anon_mib) {
                (Some(m), Some(a)) => format!("{m:.1} MiB (own {a:.1})"),
                (Some(m), None) => format!("{m:.1} MiB"),
                _ => "n/a".into(),
            },
            target: process.into(),
            met: format!(
                "CPU: tracker {}, bench {}",
                cpu(phase.server_cpu_pct),
                cpu(phase.bench_cpu_pct)
            ),
        }
    }
    vec![
        row("ceiling", "(no tracker: in-bench server)", &p.ceiling),
        row("ingest (peak)", "tracker serve --no-projector", &p.ingest),
        row("replay into SQLite", "tracker replay", &p.replay_sqlite),
        row(
            "replay into PostgreSQL",
            "tracker replay",
            &p.replay_postgres,
        ),
        row(
            "fixed-rate ingest + live projection",
            "tracker serve",
            &p.fixed_rate,
        ),
        row("queries", "tracker serve", &p.queries),
        row("NDJSON export", "tracker serve", &p.export),
    ]
}

/// The table as aligned text.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ntracker-bench: {} deliveries ({} duplicates), {} institutions, {} cores ({})",
        report.dataset.deliveries,
        report.dataset.duplicate_deliveries,
        report.dataset.institutions,
        report.machine.cores,
        report.machine.cpu
    );
    let w0 = report
        .table
        .iter()
        .map(|r| r.measure.chars().count())
        .max()
        .unwrap_or(10);
    let w1 = report
        .table
        .iter()
        .map(|r| r.result.chars().count())
        .max()
        .unwrap_or(10);
    let w2 = report
        .table
        .iter()
        .map(|r| r.target.chars().count())
        .max()
        .unwrap_or(10);
    let line = |out: &mut String, a: &str, b: &str, c: &str, d: &str| {
        let _ = writeln!(out, "| {a:<w0$} | {b:<w1$} | {c:<w2$} | {d:<3} |");
    };
    line(&mut out, "measure", "result", "target", "met");
    let _ = writeln!(
        out,
        "|{}|{}|{}|-----|",
        "-".repeat(w0 + 2),
        "-".repeat(w1 + 2),
        "-".repeat(w2 + 2)
    );
    for r in &report.table {
        line(&mut out, &r.measure, &r.result, &r.target, &r.met);
    }
    let _ = writeln!(
        out,
        "\npeak resident memory (own = RssAnon, the rest mapped file pages) and CPU (% of one core; {} cores = {}%):",
        report.machine.cores,
        report.machine.cores * 100
    );
    for r in &report.memory {
        let _ = writeln!(
            out,
            "  {:<38} {:>24}  {:<30} {}",
            r.measure, r.result, r.target, r.met
        );
    }
    out
}
