//! `tracker-bench`: starts the real `tracker` binary on loopback with a fresh
//! data directory, drives it over HTTP with generated deliveries, and reports
//! ingest, projection, query and export numbers beside the machine's own
//! no-store ceiling, measured in the same run.
//!
//! Phases, in order (each names its method in the report):
//! 1. ceiling: a minimal actix-web server in this process, closed loop;
//! 2. ingest: `tracker serve --no-projector`, closed loop, every delivery;
//! 3. replay: `tracker replay` into SQLite, then into a fresh PostgreSQL
//!    database;
//! 4. fixed rate: `tracker serve` (projector on), open loop at half the
//!    ingest peak, latency from intended send times, projection lag from
//!    checkpoints polled on `/metrics`;
//! 5. queries and 6. NDJSON export (the whole log, then the largest
//!    institution), over the query API, when it exists.
#![forbid(unsafe_code)]

pub mod ceiling;
pub mod child;
pub mod data;
pub mod load;
pub mod pg;
pub mod report;
pub mod stats;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use hyper::Uri;

use crate::child::{Launcher, Serve};
use crate::data::{Deliveries, Generator};
use crate::load::{LoadError, Target, Work};
use crate::report::{
    Dataset, Export, ExportOne, FixedRate, Ingest, Lag, Machine, Phase, Phases, Query, Replay,
    Report, Throughput,
};
use crate::stats::Latency;

/// Command-line options (also what the CI test passes).
#[derive(Debug, Clone, clap::Parser, serde::Serialize)]
#[command(
    name = "tracker-bench",
    version,
    about = "Benchmark the real tracker: ingest, projection, queries, export"
)]
pub struct Options {
    /// Deliveries sent in the ingest phase (and so events replayed,
    /// completions queried and exported).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Institutions (Zipf-distributed sizes).
    #[arg(long, default_value_t = 2_000)]
    pub institutions: usize,
    /// Zipf exponent of institution sizes.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Share of deliveries that are redeliveries.
    #[arg(long, default_value_t = 0.01)]
    pub duplicate_rate: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Keep-alive connections of the ingest, ceiling and fixed-rate phases.
    #[arg(long, default_value_t = 128)]
    pub connections: usize,
    /// Threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    /// Duration of the ceiling phase.
    #[arg(long, default_value_t = 10.0)]
    pub ceiling_secs: f64,
    /// Duration of the fixed-rate phase.
    #[arg(long, default_value_t = 30.0)]
    pub fixed_secs: f64,
    /// Arrival rate of the fixed-rate phase; default half the ingest peak.
    #[arg(long)]
    pub fixed_rate: Option<f64>,
    /// Run the fixed-rate phase without the projector (a diagnostic: the
    /// latency of the receiver alone; no lag is measured, and the query
    /// phase then waits for nothing).
    #[arg(long)]
    pub no_fixed_projector: bool,
    /// How often the projection checkpoints are polled during the
    /// fixed-rate phase.
    #[arg(long, default_value_t = 5)]
    pub lag_poll_ms: u64,
    /// Duration of each query measurement.
    #[arg(long, default_value_t = 10.0)]
    pub query_secs: f64,
    /// Longest time the whole-log export may take (cut short after that,
    /// reported incomplete with the rate so far).
    #[arg(long, default_value_t = 120.0)]
    pub export_secs: f64,
    /// Connections of the query phase.
    #[arg(long, default_value_t = 16)]
    pub query_connections: usize,
    /// The `tracker` binary; default: `tracker` next to this executable.
    #[arg(long)]
    pub tracker: Option<PathBuf>,
    /// Data directory for the tracker (kept); default: a fresh temporary one.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL server for the replay phase (a URL of an existing
    /// database; the bench creates and drops its own beside it).
    #[arg(
        long,
        env = "TRACKER_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub postgres_url: String,
    /// Skip the PostgreSQL replay.
    #[arg(long)]
    pub no_postgres: bool,
    /// `TRACKER_LOG` of the tracker processes (the shipped default is info:
    /// one line per delivery).
    #[arg(long, default_value = "info")]
    pub server_log: String,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn say(msg: impl std::fmt::Display) {
    eprintln!("bench: {msg}");
}

/// The `tracker` binary to drive.
pub fn locate_tracker(opts: &Options) -> Result<PathBuf, BenchError> {
    if let Some(p) = &opts.tracker {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe()?;
    let beside = exe.with_file_name(format!("tracker{}", std::env::consts::EXE_SUFFIX));
    if beside.is_file() {
        Ok(beside)
    } else {
        Err(BenchError::Setup(format!(
            "no tracker binary at {} (build it: cargo build --release -p tracker -p tracker-bench, or pass --tracker)",
            beside.display()
        )))
    }
}

/// Runs every phase and builds the report. Phases that fail are reported as
/// failed and the run goes on where it can.
pub async fn run(opts: &Options) -> Result<Report, BenchError> {
    let tracker = locate_tracker(opts)?;
    let temp = tempfile::Builder::new()
        .prefix("tracker-bench-")
        .tempdir()?;
    let data_dir = opts
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().join("data"));
    std::fs::create_dir_all(&data_dir)?;
    let launcher = Launcher {
        tracker: tracker.clone(),
        data_dir: data_dir.clone(),
        log: temp.path().join("tracker.log"),
        log_level: opts.server_log.clone(),
    };
    say(format!(
        "tracker {}, data in {}, its log in {}",
        tracker.display(),
        data_dir.display(),
        launcher.log.display()
    ));

    let started_at = chrono::Utc::now().to_rfc3339();
    let t = Instant::now();
    let mut generator = Generator::new(
        opts.seed,
        opts.institutions,
        opts.zipf,
        opts.events,
        opts.duplicate_rate,
    );
    let load = Arc::new(generator.generate(opts.events));
    let dataset = describe(opts, &generator, &load, t.elapsed());
    say(format!(
        "generated {} deliveries ({:.0} MB) in {:.1}s",
        load.len(),
        load.bytes() as f64 / 1e6,
        dataset.generation_secs
    ));
    let uri: Uri = format!("/webhooks/toolzz/{}", child::TOKEN)
        .parse()
        .map_err(|e| BenchError::Setup(format!("webhook URI: {e}")))?;

    // 1. The machine's ceiling.
    let ceiling = ceiling_phase(opts, &uri, &load).await;
    let ceiling_rate = ceiling.result.as_ref().map(|r| r.per_sec);

    // 2. Durable ingest at peak (also loads the log for the later phases).
    let mut api_available = false;
    let mut ingest = ingest_phase(opts, &launcher, &uri, &load, &mut api_available).await;
    if let (Some(r), Some(c)) = (ingest.result.as_mut(), ceiling_rate)
        && c > 0.0
    {
        r.ceiling_ratio = Some(r.run.per_sec / c);
    }
    let head = ingest.result.as_ref().map_or(0, |r| r.log_head);

    // 3. Catch-up replays.
    let replay_sqlite = replay_phase(&launcher, head, None).await;
    let replay_postgres = if opts.no_postgres {
        Phase::skipped(REPLAY_PG_METHOD, "--no-postgres")
    } else if ingest.is_ok() {
        replay_phase(&launcher, head, Some(&opts.postgres_url)).await
    } else {
        Phase::skipped(REPLAY_PG_METHOD, "ingest failed")
    };

    // 4. Fixed-rate ingest with live projection, then 5. queries and 6. export on the same server.
    let rate = opts
        .fixed_rate
        .or_else(|| ingest.result.as_ref().map(|r| r.run.per_sec / 2.0))
        .unwrap_or(0.0);
    let (fixed_rate, queries, export) = if rate > 0.0 {
        let extra_n = ((rate * opts.fixed_secs).ceil() as usize).max(1);
        let extra = Arc::new(generator.generate(extra_n));
        live_phases(
            opts,
            &launcher,
            &uri,
            &load,
            &extra,
            rate,
            &mut api_available,
        )
        .await
    } else {
        (
            Phase::skipped(FIXED_METHOD, "no ingest peak to halve"),
            Phase::skipped(QUERY_METHOD, "ingest failed"),
            Phase::skipped(EXPORT_METHOD, "ingest failed"),
        )
    };

    let phases = Phases {
        ceiling,
        ingest,
        replay_sqlite,
        replay_postgres,
        fixed_rate,
        queries,
        export,
    };
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_at,
        machine: machine(),
        tracker: tracker.display().to_string(),
        api_available,
        dataset,
        table: report::table(&phases),
        memory: report::memory(&phases),
        phases,
    };
    drop(temp);
    Ok(report)
}

fn describe(opts: &Options, g: &Generator, load: &Deliveries, took: Duration) -> Dataset {
    let mut per_inst: HashMap<u64, usize> = HashMap::new();
    let mut learners = HashSet::new();
    let mut pairs = HashSet::new();
    let mut recompletions = 0;
    for m in load.meta.iter().filter(|m| !m.duplicate) {
        *per_inst.entry(m.institution).or_default() += 1;
        learners.insert(m.user);
        if !pairs.insert((m.user, m.trail)) {
            recompletions += 1;
        }
    }
    Dataset {
        seed: opts.seed,
        deliveries: load.len(),
        duplicate_deliveries: load.duplicates(),
        institutions: g.institutions().len(),
        institutions_with_events: per_inst.len(),
        largest_institution_deliveries: per_inst.values().copied().max().unwrap_or(0),
        learners: learners.len(),
        recompletions,
        mean_body_bytes: load.bytes() as f64 / load.len().max(1) as f64,
        generation_secs: took.as_secs_f64(),
    }
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kb: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu,
        memory_gib: (kb / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
    }
}

/// CPU used by the tracker and by this process over a phase.
struct CpuWindow {
    server: Option<f64>,
    bench: f64,
    started: Instant,
}

impl CpuWindow {
    fn start(serve: Option<&Serve>) -> Self {
        Self {
            server: serve.map(Serve::cpu_secs),
            bench: child::own_cpu_secs(),
            started: Instant::now(),
        }
    }

    fn finish<T>(self, serve: Option<&Serve>, phase: Phase<T>) -> Phase<T> {
        let server = match (serve, self.server) {
            (Some(s), Some(before)) => Some(s.cpu_secs() - before),
            _ => None,
        };
        phase.with_cpu(
            server,
            child::own_cpu_secs() - self.bench,
            self.started.elapsed().as_secs_f64(),
        )
    }
}

fn throughput(run: load::ClosedRun) -> Throughput {
    let secs = run.elapsed.as_secs_f64();
    Throughput {
        requests: run.ok,
        per_sec: run.ok as f64 / secs.max(1e-9),
        secs,
        failures: run.failures,
        latency: Latency::from_micros(run.latencies_us),
    }
}

const CEILING_METHOD: &str = "closed loop for a fixed time: a minimal actix-web server inside the bench (one worker per core, like the tracker) parses each delivery into a typed struct with serde_json and answers 200 with a tracker-shaped body, storing nothing; same hyper client, connections and bodies as the ingest phase";

async fn ceiling_phase(opts: &Options, uri: &Uri, load: &Arc<Deliveries>) -> Phase<Throughput> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let server = match ceiling::Ceiling::start(workers) {
        Ok(s) => s,
        Err(e) => return Phase::failed(CEILING_METHOD, e),
    };
    say(format!(
        "ceiling: closed loop, {} connections, {:.0}s",
        opts.connections, opts.ceiling_secs
    ));
    let target = Target::new(server.addr);
    let cpu = CpuWindow::start(None);
    let run = load::closed_loop(
        &target,
        Work::DeliveriesFor {
            uri: uri.clone(),
            bodies: Arc::clone(load),
            duration: Duration::from_secs_f64(opts.ceiling_secs),
        },
        opts.connections,
    )
    .await;
    let cpu = cpu.finish(None, Phase::ok(CEILING_METHOD, (), None));
    server.stop().await;
    match run {
        Ok(run) => {
            let t = throughput(run);
            say(format!("ceiling: {:.0} req/s", t.per_sec));
            if t.failures.total() > 0 {
                return Phase::failed(CEILING_METHOD, format!("{:?}", t.failures));
            }
            Phase {
                bench_cpu_pct: cpu.bench_cpu_pct,
                ..Phase::ok(CEILING_METHOD, t, None)
            }
        }
        Err(e) => Phase::failed(CEILING_METHOD, e),
    }
}

const INGEST_METHOD: &str = "closed loop: `tracker serve --no-projector` (embedded SQLite event store, synchronous=FULL, group commit) on 127.0.0.1; every generated delivery POSTed once over keep-alive hyper HTTP/1.1 connections, each sending its next delivery when the previous 200 (sent only once durable) arrived; rate = 2xx answers / wall time from first send to last answer";

async fn start_serve(launcher: &Launcher, projector: bool) -> Result<Serve, String> {
    let l = launcher.clone();
    tokio::task::spawn_blocking(move || l.serve(projector))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

async fn stop_serve(serve: Serve) {
    match tokio::task::spawn_blocking(move || serve.stop()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => say(format!("tracker serve exited with {status}")),
        Ok(Err(e)) => say(format!("stopping tracker serve: {e}")),
        Err(e) => say(format!("stopping tracker serve: {e}")),
    }
}

/// Whether the server has the query API (its OpenAPI document).
async fn has_api(target: &Target) -> bool {
    let Ok(uri) = "/openapi.json".parse::<Uri>() else {
        return false;
    };
    match target.get(&uri, None) {
        Ok(req) => matches!(target.fetch(req).await, Ok((200, _))),
        Err(_) => false,
    }
}

async fn ingest_phase(
    opts: &Options,
    launcher: &Launcher,
    uri: &Uri,
    load: &Arc<Deliveries>,
    api_available: &mut bool,
) -> Phase<Ingest> {
    let serve = match start_serve(launcher, false).await {
        Ok(s) => s,
        Err(e) => return Phase::failed(INGEST_METHOD, e),
    };
    let target = Target::new(serve.addr);
    *api_available = serve.api_keys && has_api(&target).await;
    say(format!(
        "ingest: {} deliveries, closed loop, {} connections (query API {})",
        load.len(),
        opts.connections,
        if *api_available {
            "found"
        } else {
            "not available"
        }
    ));
    serve.memory.take_peak();
    let cpu = CpuWindow::start(Some(&serve));
    let (progress, timeline) = progress_printer(&serve);
    let run = load::closed_loop(
        &target,
        Work::Deliveries {
            uri: uri.clone(),
            bodies: Arc::clone(load),
        },
        opts.connections,
    )
    .await;
    progress.store(true, Ordering::Relaxed);
    let timeline = timeline.await.unwrap_or_default();
    let rss = serve.memory.take_peak();
    let cpu = cpu.finish(Some(&serve), Phase::ok(INGEST_METHOD, (), None));
    let head = metrics(&target).await.map(|m| m.head);
    stop_serve(serve).await;
    let run = match run {
        Ok(r) => r,
        Err(e) => return Phase::failed(INGEST_METHOD, e),
    };
    let duplicates = run.duplicates;
    let t = throughput(run);
    say(format!(
        "ingest: {:.0} webhooks/s, closed-loop p99 {:.1} ms, {} failures",
        t.per_sec,
        t.latency.p99_ms,
        t.failures.total()
    ));
    if t.failures.total() > 0 {
        return Phase::failed(INGEST_METHOD, format!("{:?}", t.failures));
    }
    let head = match head {
        Ok(h) => h,
        Err(e) => return Phase::failed(INGEST_METHOD, format!("reading /metrics: {e}")),
    };
    Phase {
        server_cpu_pct: cpu.server_cpu_pct,
        bench_cpu_pct: cpu.bench_cpu_pct,
        ..Phase::ok(
            INGEST_METHOD,
            Ingest {
                run: t,
                duplicates_answered: duplicates,
                log_head: head,
                ceiling_ratio: None,
                log_timeline: timeline,
            },
            Some(rss),
        )
    }
}

/// Prints the log head every 10 s while a long phase runs, and keeps the
/// samples (seconds, head) for the report; set the flag to stop it.
fn progress_printer(serve: &Serve) -> (Arc<AtomicBool>, tokio::task::JoinHandle<Vec<(f64, u64)>>) {
    let done = Arc::new(AtomicBool::new(false));
    let target = Target::new(serve.addr);
    let flag = Arc::clone(&done);
    let task = tokio::spawn(async move {
        let started = Instant::now();
        let mut samples = Vec::new();
        loop {
            for _ in 0..100 {
                if flag.load(Ordering::Relaxed) {
                    return samples;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if let Ok(m) = metrics(&target).await {
                let at = started.elapsed().as_secs_f64();
                say(format!("  … {} events in the log after {at:.0}s", m.head));
                samples.push(((at * 10.0).round() / 10.0, m.head));
            }
        }
    });
    (done, task)
}

const REPLAY_SQLITE_METHOD: &str = "`tracker replay` on the stopped ingest data directory: rebuilds both projections from position 0 into a new SQLite generation and switches to it; events/s = log head / wall time of the process (start-up included); then `tracker status` must show both projections at the log's head, or the phase fails";
const REPLAY_PG_METHOD: &str = "`tracker replay` on the same data directory with TRACKER_READ_STORE_URL pointing at a fresh PostgreSQL database on the given server (created before and dropped after by the bench); events/s = log head / wall time of the process; then `tracker status` must show both projections at the log's head, or the phase fails";

async fn replay_phase(launcher: &Launcher, head: u64, postgres: Option<&str>) -> Phase<Replay> {
    let method = if postgres.is_some() {
        REPLAY_PG_METHOD
    } else {
        REPLAY_SQLITE_METHOD
    };
    if head == 0 {
        return Phase::skipped(method, "the ingest phase loaded nothing");
    }
    let db = match postgres {
        Some(url) => match pg::TempDatabase::create(url).await {
            Ok(db) => Some(db),
            Err(e) => return Phase::failed(method, e),
        },
        None => None,
    };
    let env: Vec<(&str, String)> = db
        .iter()
        .map(|d| ("TRACKER_READ_STORE_URL", d.url.clone()))
        .collect();
    say(format!(
        "replay into {}: {head} events",
        if postgres.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        }
    ));
    let l = launcher.clone();
    let bench_cpu = child::own_cpu_secs();
    let outcome = tokio::task::spawn_blocking(move || {
        let replayed = l.replay(&env)?;
        Ok::<_, child::ChildError>((replayed, l.status(&env)?))
    })
    .await;
    let bench_cpu = child::own_cpu_secs() - bench_cpu;
    if let Some(db) = db
        && let Err(e) = db.drop_database().await
    {
        say(e);
    }
    match outcome {
        // The rebuilt read models must hold the whole log: a replay that
        // exits 0 having projected less is a failed phase, not a rate.
        Ok(Ok((_, checkpoints)))
            if checkpoints.len() < 2 || checkpoints.iter().any(|(_, c)| *c != head) =>
        {
            Phase::failed(
                method,
                format!(
                    "after the replay the projections stand at {checkpoints:?}, not at the log's head {head}"
                ),
            )
        }
        Ok(Ok(((elapsed, rss, cpu), _))) => {
            let secs = elapsed.as_secs_f64();
            let r = Replay {
                events: head,
                secs,
                events_per_sec: head as f64 / secs.max(1e-9),
            };
            say(format!("  {:.0} events/s", r.events_per_sec));
            Phase::ok(method, r, Some(rss)).with_cpu(Some(cpu), bench_cpu, secs)
        }
        Ok(Err(e)) => Phase::failed(method, e),
        Err(e) => Phase::failed(method, e),
    }
}

const FIXED_METHOD: &str = "open loop: `tracker serve` with its projector (SQLite read models, caught up by the replay), new deliveries intended at start + i/rate (rate = half the ingest peak) over the same number of connections (connection k sends requests k, k+C, ...; a connection still busy at an intended time sends late, counted in late_sends, and past 1% of the requests the table says the server fell behind the rate); latency from the intended send time to the whole answer (coordinated-omission corrected; timer granularity of the generator included, shown as generator_send_lag); service_time is from the actual send";
const LAG_METHOD: &str = "every accepted append (position, time its 200 arrived) against the checkpoints of both projections, polled every lag_poll_ms on a separate connection (X-Consistent-Through of one cheap query per projection when the query API exists, else GET /metrics; see checkpoints_from): visible when the slower projection's checkpoint reaches the position (rows and checkpoint are one transaction), at the arrival of that poll's answer; an upper bound with a resolution of one poll (see median_poll_interval_ms)";
const QUERY_METHOD: &str = "closed loop for a fixed time per endpoint over keep-alive connections with an operator API key, on the server of the fixed-rate phase (log = ingest + fixed-rate deliveries); institutions and learners drawn from the generated deliveries (so large institutions are asked about more), every answer must be 200";
const EXPORT_METHOD: &str = "GET /v1/events (the whole log, operator key) with Accept: application/x-ndjson on one keep-alive connection, body streamed and its lines counted (never held), at most export_secs; events/s = lines / wall time from sending the request to the last byte; complete = lines == log head; then GET /v1/institutions/{id}/events of the largest institution the same way; memory = peak VmRSS of tracker serve during each export less VmRSS before the phase";

async fn live_phases(
    opts: &Options,
    launcher: &Launcher,
    uri: &Uri,
    load: &Arc<Deliveries>,
    extra: &Arc<Deliveries>,
    rate: f64,
    api_available: &mut bool,
) -> (Phase<FixedRate>, Phase<Vec<Query>>, Phase<Export>) {
    let serve = match start_serve(launcher, !opts.no_fixed_projector).await {
        Ok(s) => s,
        Err(e) => {
            return (
                Phase::failed(FIXED_METHOD, &e),
                Phase::skipped(QUERY_METHOD, "tracker serve did not start"),
                Phase::skipped(EXPORT_METHOD, "tracker serve did not start"),
            );
        }
    };
    let plain = Target::new(serve.addr);
    *api_available = serve.api_keys && has_api(&plain).await;
    // The lag poller reads checkpoints through the query API when there is
    // one (its own read connections), on the largest institution.
    let largest = largest_institution(&load.meta);
    let checkpoints = if *api_available { largest } else { None };
    let mut fixed = fixed_phase(opts, &serve, uri, extra, rate, checkpoints).await;
    // Queries measure reads, not reads racing a projection backlog.
    if !opts.no_fixed_projector {
        let t = Instant::now();
        match caught_up(&plain, Duration::from_secs(1800)).await {
            Ok(_) => {
                let secs = t.elapsed().as_secs_f64();
                say(format!(
                    "projector caught up {secs:.1}s after the fixed-rate phase"
                ));
                if let Some(r) = fixed.result.as_mut() {
                    r.catch_up_after_secs = Some(secs);
                }
            }
            Err(e) => say(format!("projector did not catch up: {e}")),
        }
    }

    let api = Target::new(serve.addr).with_bearer(child::API_KEY);
    let (queries, export) = if *api_available {
        let mut all_meta = load.meta.clone();
        all_meta.extend_from_slice(&extra.meta);
        let queries = query_phase(opts, &serve, &api, &all_meta).await;
        let export = export_phase(opts, &serve, &api, &all_meta).await;
        (queries, export)
    } else {
        (
            Phase::skipped(QUERY_METHOD, "API not available (no GET /openapi.json)"),
            Phase::skipped(EXPORT_METHOD, "API not available (no GET /openapi.json)"),
        )
    };
    stop_serve(serve).await;
    (fixed, queries, export)
}

fn largest_institution(meta: &[data::EventMeta]) -> Option<u64> {
    let mut per_inst: HashMap<u64, u64> = HashMap::new();
    for m in meta {
        *per_inst.entry(m.institution).or_default() += 1;
    }
    per_inst
        .into_iter()
        .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))
        .map(|(i, _)| i)
}

/// What `/metrics` says about the log and the projections.
struct Metrics {
    head: u64,
    /// The smallest checkpoint over all projections (0 when none).
    min_checkpoint: u64,
}

async fn metrics(target: &Target) -> Result<Metrics, LoadError> {
    let uri: Uri = "/metrics"
        .parse()
        .map_err(|e| LoadError::Other(format!("{e}")))?;
    let req = target.get(&uri, None)?;
    let (status, body) = target.fetch(req).await?;
    parse_metrics(status, &body)
}

fn parse_metrics(status: u16, body: &[u8]) -> Result<Metrics, LoadError> {
    if status != 200 {
        return Err(LoadError::Other(format!("/metrics answered {status}")));
    }
    let text = String::from_utf8_lossy(body);
    let mut head = 0;
    let mut min_checkpoint: Option<u64> = None;
    for line in text.lines() {
        let value = || {
            line.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .map_or(0, |v| v as u64)
        };
        if line.starts_with("tracker_event_store_head_position") {
            head = value();
        } else if line.starts_with("tracker_projection_checkpoint_position{") {
            let v = value();
            min_checkpoint = Some(min_checkpoint.map_or(v, |m| m.min(v)));
        }
    }
    Ok(Metrics {
        head,
        min_checkpoint: min_checkpoint.unwrap_or(0),
    })
}

/// Waits until every projection has reached the log head.
async fn caught_up(target: &Target, timeout: Duration) -> Result<u64, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match metrics(target).await {
            Ok(m) if m.head > 0 && m.min_checkpoint >= m.head => return Ok(m.head),
            Ok(m) if Instant::now() > deadline => {
                return Err(format!(
                    "projections at {} of {} after {timeout:?}",
                    m.min_checkpoint, m.head
                ));
            }
            Err(e) if Instant::now() > deadline => return Err(e.to_string()),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn fixed_phase(
    opts: &Options,
    serve: &Serve,
    uri: &Uri,
    extra: &Arc<Deliveries>,
    rate: f64,
    checkpoints: Option<u64>,
) -> Phase<FixedRate> {
    let target = Target::new(serve.addr);
    if let Err(e) = caught_up(&target, Duration::from_secs(300)).await {
        return Phase::failed(
            FIXED_METHOD,
            format!("projector did not catch up before the phase: {e}"),
        );
    }
    say(format!(
        "fixed rate: {rate:.0}/s for {:.0}s ({} deliveries), {} connections, lag polled every {} ms",
        opts.fixed_secs,
        extra.len(),
        opts.connections,
        opts.lag_poll_ms
    ));
    serve.memory.take_peak();
    let cpu = CpuWindow::start(Some(serve));
    // Connections are opened before the schedule starts.
    let started = Instant::now() + Duration::from_millis(200);
    let stop = Arc::new(AtomicBool::new(false));
    let source = match checkpoints {
        Some(institution) => Checkpoints::Api {
            target: target.clone().with_bearer(child::API_KEY),
            institution,
        },
        None => Checkpoints::Metrics(target.clone()),
    };
    let source_name = source.name();
    let poller = tokio::spawn(poll_checkpoints(
        source,
        started,
        Duration::from_millis(opts.lag_poll_ms.max(1)),
        Arc::clone(&stop),
    ));
    let run = load::open_loop(
        &target,
        uri.clone(),
        Arc::clone(extra),
        opts.connections,
        rate,
        started,
    )
    .await;
    let last = run
        .as_ref()
        .ok()
        .and_then(|r| r.acks.iter().map(|a| a.0).max())
        .unwrap_or(0);
    // Keep polling until the projection has shown everything acknowledged
    // (bounded): an append is only measured once it is visible.
    let wait_until = Instant::now()
        + if opts.no_fixed_projector {
            Duration::ZERO
        } else {
            Duration::from_secs(600)
        };
    while Instant::now() < wait_until {
        match metrics(&target).await {
            Ok(m) if m.min_checkpoint >= last => break,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    // One more poll interval, so the poller sees what /metrics saw.
    tokio::time::sleep(Duration::from_millis(opts.lag_poll_ms.max(1) * 3)).await;
    stop.store(true, Ordering::Relaxed);
    let polls = poller.await.unwrap_or_default();
    let rss = serve.memory.take_peak();
    let cpu = cpu.finish(Some(serve), Phase::ok(FIXED_METHOD, (), None));
    let run = match run {
        Ok(r) => r,
        Err(e) => return Phase::failed(FIXED_METHOD, e),
    };
    let lag = if opts.no_fixed_projector {
        None
    } else {
        lag(&run.acks, &polls, source_name, run.elapsed)
    };
    let secs = run.elapsed.as_secs_f64();
    let sent = (run.ok + run.failures.total()).max(1);
    let result = FixedRate {
        target_per_sec: rate,
        achieved_per_sec: run.ok as f64 / secs.max(1e-9),
        requests: run.ok,
        failures: run.failures,
        secs,
        latency: Latency::from_micros(run.from_intended_us),
        service_time: Latency::from_micros(run.service_us),
        generator_send_lag: Latency::from_micros(run.idle_send_lag_us),
        late_sends: run.late_sends,
        late_share: run.late_sends as f64 / sent as f64,
        lag,
        catch_up_after_secs: None,
    };
    say(format!(
        "fixed rate: p50 {:.2} p99 {:.2} p99.9 {:.2} ms from intended; lag p99 {}",
        result.latency.p50_ms,
        result.latency.p99_ms,
        result.latency.p999_ms,
        result
            .lag
            .as_ref()
            .map_or("n/a".into(), |l| format!("{:.1} ms", l.latency.p99_ms))
    ));
    if result.failures.total() > 0 {
        return Phase::failed(FIXED_METHOD, format!("{:?}", result.failures));
    }
    Phase {
        server_cpu_pct: cpu.server_cpu_pct,
        bench_cpu_pct: cpu.bench_cpu_pct,
        ..Phase::ok(
            format!("{FIXED_METHOD}. Lag: {LAG_METHOD}"),
            result,
            Some(rss),
        )
    }
}

/// Where the lag poller reads the projections' checkpoints.
#[derive(Clone)]
enum Checkpoints {
    /// `GET /metrics` (goes through the projector's own read-store
    /// connection, so it may wait behind a projection batch).
    Metrics(Target),
    /// `X-Consistent-Through` of two cheap query API reads, one per
    /// projection (summary: institutions; a one-row learners page:
    /// learners), on the query side's own read connections.
    Api { target: Target, institution: u64 },
}

impl Checkpoints {
    fn target(&self) -> &Target {
        match self {
            Self::Metrics(t) | Self::Api { target: t, .. } => t,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Metrics(_) => "GET /metrics (tracker_projection_checkpoint_position)",
            Self::Api { .. } => {
                "X-Consistent-Through of GET /v1/institutions/{largest}/summary and /learners?limit=1"
            }
        }
    }

    /// The smallest checkpoint now.
    async fn read(&self, sender: &mut load::Sender) -> Result<u64, LoadError> {
        match self {
            Self::Metrics(target) => {
                let uri: Uri = "/metrics"
                    .parse()
                    .map_err(|e| LoadError::Other(format!("{e}")))?;
                let (status, body) = load::send(sender, target.get(&uri, None)?).await?;
                Ok(parse_metrics(status, &body)?.min_checkpoint)
            }
            Self::Api {
                target,
                institution,
            } => {
                let mut min = u64::MAX;
                for path in [
                    format!("/v1/institutions/{institution}/summary"),
                    format!("/v1/institutions/{institution}/learners?limit=1"),
                ] {
                    let uri: Uri = path.parse().map_err(|e| LoadError::Other(format!("{e}")))?;
                    let (status, value) = load::send_for_header(
                        sender,
                        target.get(&uri, None)?,
                        "x-consistent-through",
                    )
                    .await?;
                    match value {
                        Some(v) if status == 200 => min = min.min(v),
                        _ => {
                            return Err(LoadError::Other(format!(
                                "GET {path}: {status} without X-Consistent-Through"
                            )));
                        }
                    }
                }
                Ok(min)
            }
        }
    }
}

/// `(microseconds since start at answer, smallest checkpoint)`, the
/// checkpoint made monotone (it never goes back).
async fn poll_checkpoints(
    source: Checkpoints,
    started: Instant,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<(u64, u64)> {
    let mut polls = Vec::with_capacity(16_384);
    let mut sender = None;
    let mut best = 0u64;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        if sender.is_none() {
            sender = source.target().connect().await.ok();
        }
        let Some(s) = sender.as_mut() else { continue };
        match source.read(s).await {
            Ok(cp) => {
                let at = Instant::now().saturating_duration_since(started);
                best = best.max(cp);
                polls.push((at.as_micros() as u64, best));
            }
            Err(_) => sender = None,
        }
    }
    polls
}

fn lag(acks: &[(u64, u64)], polls: &[(u64, u64)], source: &str, load: Duration) -> Option<Lag> {
    if polls.is_empty() || acks.is_empty() {
        return None;
    }
    let mut samples = Vec::with_capacity(acks.len());
    let mut never = 0;
    for &(position, acked_at) in acks {
        let i = polls.partition_point(|&(_, cp)| cp < position);
        match polls.get(i) {
            Some(&(seen_at, _)) => samples.push(load::micros(Duration::from_micros(
                seen_at.saturating_sub(acked_at),
            ))),
            None => never += 1,
        }
    }
    // How fast the projection advanced while the load ran.
    let load_us = load.as_micros() as u64;
    let during: Vec<&(u64, u64)> = polls.iter().filter(|p| p.0 <= load_us).collect();
    let projected_per_sec_under_load = match (during.first(), during.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => Some((b.1 - a.1) as f64 / ((b.0 - a.0) as f64 / 1e6)),
        _ => None,
    };
    let mut gaps: Vec<u64> = polls.windows(2).map(|w| w[1].0 - w[0].0).collect();
    gaps.sort_unstable();
    Some(Lag {
        latency: Latency::from_micros(samples),
        never_visible: never,
        checkpoints_from: source.to_owned(),
        projected_per_sec_under_load,
        polls: polls.len() as u64,
        median_poll_interval_ms: gaps.get(gaps.len() / 2).map_or(0.0, |g| *g as f64 / 1000.0),
    })
}

fn rfc3339(wall_secs: i64) -> String {
    chrono::DateTime::from_timestamp(wall_secs, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// The query endpoints measured, each with URIs drawn from the data.
fn query_uris(meta: &[data::EventMeta], seed: u64) -> Vec<(&'static str, Vec<Uri>)> {
    let mut rng = data::Rng::new(seed ^ 0x5157_4552_5900);
    let mut pick = || meta[rng.below(meta.len() as u64) as usize];
    let n = 4096.min(meta.len().max(1) * 4);
    let mut make = |f: &mut dyn FnMut(data::EventMeta) -> String| -> Vec<Uri> {
        (0..n).filter_map(|_| f(pick()).parse().ok()).collect()
    };
    let summary = make(&mut |m| format!("/v1/institutions/{}/summary", m.institution));
    let learner = make(&mut |m| format!("/v1/institutions/{}/learners/{}", m.institution, m.user));
    let learners = make(&mut |m| format!("/v1/institutions/{}/learners?limit=50", m.institution));
    let completions = make(&mut |m| {
        format!(
            "/v1/institutions/{}/completions?from={}&to={}&limit=50",
            m.institution,
            rfc3339(m.finished_at - 30 * 86_400),
            rfc3339(m.finished_at + 86_400)
        )
    });
    vec![
        ("summary", summary),
        ("one learner", learner),
        ("page of learners (limit 50)", learners),
        (
            "page of completions, 31-day from/to filter (limit 50)",
            completions,
        ),
    ]
}

async fn query_phase(
    opts: &Options,
    serve: &Serve,
    api: &Target,
    meta: &[data::EventMeta],
) -> Phase<Vec<Query>> {
    if meta.is_empty() {
        return Phase::skipped(QUERY_METHOD, "no data");
    }
    serve.memory.take_peak();
    let cpu = CpuWindow::start(Some(serve));
    let mut results = Vec::new();
    for (name, uris) in query_uris(meta, opts.seed) {
        let Some(first) = uris.first() else { continue };
        // One call first: a wrong path or key must fail loudly, not as a
        // rate of fast 404s.
        match api.get(first, None) {
            Ok(req) => match api.fetch(req).await {
                Ok((200, _)) => {}
                Ok((status, body)) => {
                    return Phase::failed(
                        QUERY_METHOD,
                        format!(
                            "{name}: GET {first} answered {status}: {}",
                            String::from_utf8_lossy(&body[..body.len().min(300)])
                        ),
                    );
                }
                Err(e) => return Phase::failed(QUERY_METHOD, format!("{name}: {e}")),
            },
            Err(e) => return Phase::failed(QUERY_METHOD, e),
        }
        say(format!(
            "query {name}: closed loop, {} connections, {:.0}s",
            opts.query_connections, opts.query_secs
        ));
        let example = first.to_string();
        let run = load::closed_loop(
            api,
            Work::GetsFor {
                uris: Arc::new(uris),
                duration: Duration::from_secs_f64(opts.query_secs),
            },
            opts.query_connections,
        )
        .await;
        match run {
            Ok(run) => {
                let t = throughput(run);
                say(format!(
                    "  p50 {:.2} p99 {:.2} ms, {:.0} req/s, {} failures",
                    t.latency.p50_ms,
                    t.latency.p99_ms,
                    t.per_sec,
                    t.failures.total()
                ));
                results.push(Query {
                    name: name.into(),
                    example,
                    run: t,
                });
            }
            Err(e) => return Phase::failed(QUERY_METHOD, format!("{name}: {e}")),
        }
    }
    let rss = serve.memory.take_peak();
    if let Some(q) = results.iter().find(|q| q.run.failures.total() > 0) {
        return Phase::failed(QUERY_METHOD, format!("{}: {:?}", q.name, q.run.failures));
    }
    cpu.finish(Some(serve), Phase::ok(QUERY_METHOD, results, Some(rss)))
}

/// What one streamed NDJSON export gave.
struct Streamed {
    status: u16,
    lines: u64,
    bytes: u64,
    secs: f64,
    /// `budget` ran out before the body ended.
    cut: bool,
}

/// Streams one NDJSON export of `path`, counting lines, for at most
/// `budget` (a cut export drops the connection, so use a fresh one).
async fn export_one(
    sender: &mut load::Sender,
    api: &Target,
    path: &str,
    budget: Duration,
) -> Result<Streamed, LoadError> {
    let uri: Uri = path.parse().map_err(|e| LoadError::Other(format!("{e}")))?;
    let req = api.get(&uri, Some("application/x-ndjson"))?;
    sender.ready().await?;
    let t = Instant::now();
    let res = sender.send_request(req).await?;
    let status = res.status().as_u16();
    let mut body = res.into_body();
    let (mut lines, mut bytes) = (0u64, 0u64);
    let mut cut = false;
    loop {
        let Some(left) = budget.checked_sub(t.elapsed()) else {
            cut = true;
            break;
        };
        let Ok(frame) = tokio::time::timeout(left, body.frame()).await else {
            cut = true;
            break;
        };
        let Some(frame) = frame else { break };
        if let Some(data) = frame?.data_ref() {
            lines += data.iter().filter(|b| **b == b'\n').count() as u64;
            bytes += data.len() as u64;
        }
    }
    Ok(Streamed {
        status,
        lines,
        bytes,
        secs: t.elapsed().as_secs_f64(),
        cut,
    })
}

async fn export_phase(
    opts: &Options,
    serve: &Serve,
    api: &Target,
    meta: &[data::EventMeta],
) -> Phase<Export> {
    let plain = Target::new(serve.addr);
    let head = match metrics(&plain).await {
        Ok(m) => m.head,
        Err(e) => return Phase::failed(EXPORT_METHOD, e),
    };
    // Events per institution: deliveries that were not redeliveries.
    let mut per_inst: HashMap<u64, u64> = HashMap::new();
    for m in meta.iter().filter(|m| !m.duplicate) {
        *per_inst.entry(m.institution).or_default() += 1;
    }
    let Some((largest, largest_events)) = per_inst
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
    else {
        return Phase::skipped(EXPORT_METHOD, "no data");
    };
    let status_path = PathBuf::from(format!("/proc/{}/status", serve.pid()));
    let rss_before = child::rss_bytes(&status_path).unwrap_or(0);
    serve.memory.take_peak();
    let cpu = CpuWindow::start(Some(serve));
    let budget = Duration::from_secs_f64(opts.export_secs);
    say(format!(
        "export: the whole log (head {head}) for at most {:.0}s, then institution {largest} ({largest_events} events)",
        opts.export_secs
    ));
    let whole = match api.connect().await {
        Ok(mut sender) => export_one(&mut sender, api, "/v1/events", budget).await,
        Err(e) => Err(e),
    };
    let whole = match whole {
        Ok(w) if w.status == 200 => w,
        Ok(w) => {
            return Phase::failed(EXPORT_METHOD, format!("GET /v1/events: HTTP {}", w.status));
        }
        Err(e) => return Phase::failed(EXPORT_METHOD, format!("GET /v1/events: {e}")),
    };
    let whole_mem = serve.memory.take_peak();
    let whole_peak = whole_mem.rss.max(rss_before);
    let rate = whole.lines as f64 / whole.secs.max(1e-9);
    say(format!(
        "  whole log: {} of {head} events, {:.0} MiB in {:.2}s, {rate:.0} events/s{}, RSS +{:.1} MiB",
        whole.lines,
        report::mib(whole.bytes),
        whole.secs,
        if whole.cut { " (cut short)" } else { "" },
        report::mib(whole_peak.saturating_sub(rss_before))
    ));
    let path = format!("/v1/institutions/{largest}/events");
    let one = match api.connect().await {
        Ok(mut sender) => export_one(&mut sender, api, &path, budget).await,
        Err(e) => Err(e),
    };
    let one = match one {
        Ok(o) if o.status == 200 => o,
        Ok(o) => {
            return Phase::failed(
                EXPORT_METHOD,
                format!("institution {largest}: HTTP {}", o.status),
            );
        }
        Err(e) => return Phase::failed(EXPORT_METHOD, format!("institution {largest}: {e}")),
    };
    let one_mem = serve.memory.take_peak();
    let one_peak = one_mem.rss.max(rss_before);
    let one = ExportOne {
        institution: largest,
        events: one.lines,
        expected_events: largest_events,
        bytes: one.bytes,
        secs: one.secs,
        events_per_sec: one.lines as f64 / one.secs.max(1e-9),
        log_events_per_sec: head as f64 / one.secs.max(1e-9),
        complete: !one.cut && one.lines == largest_events,
        rss_growth_mib: report::mib(one_peak.saturating_sub(rss_before)),
    };
    say(format!(
        "  largest institution: {} events in {:.2}s, {:.0} events/s",
        one.events, one.secs, one.events_per_sec
    ));
    let result = Export {
        events: whole.lines,
        bytes: whole.bytes,
        secs: whole.secs,
        events_per_sec: rate,
        mib_per_sec: report::mib(whole.bytes) / whole.secs.max(1e-9),
        log_head: head,
        complete: !whole.cut && whole.lines == head,
        rss_before_mib: report::mib(rss_before),
        rss_growth_mib: report::mib(whole_peak.saturating_sub(rss_before)),
        largest_institution: one,
    };
    let peak = child::Peak {
        rss: whole_peak.max(one_peak),
        anon: whole_mem.anon.max(one_mem.anon),
    };
    cpu.finish(Some(serve), Phase::ok(EXPORT_METHOD, result, Some(peak)))
}

/// Writes the JSON report (pretty) to `path`.
pub fn write_report(report: &Report, path: &std::path::Path) -> Result<(), BenchError> {
    let json = serde_json::to_vec_pretty(report)
        .map_err(|e| BenchError::Setup(format!("encoding the report: {e}")))?;
    std::fs::write(path, json)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_ack_to_first_poll_at_or_past_the_position() {
        let polls = vec![(1_000, 5), (6_000, 9), (11_000, 12)];
        let acks = vec![(6, 500), (9, 2_000), (12, 10_000), (13, 10_500)];
        let l = lag(&acks, &polls, "test", Duration::from_millis(6))
            .unwrap_or_else(|| panic!("no lag"));
        assert_eq!(l.never_visible, 1);
        assert_eq!(l.latency.count, 3);
        assert_eq!(l.latency.max_ms, 5.5);
        assert_eq!(l.median_poll_interval_ms, 5.0);
        assert_eq!(l.projected_per_sec_under_load, Some(800.0));
    }

    /// A server without `GET /openapi.json` (a tracker from before the
    /// query API; here the in-bench ceiling server) has no API, so the
    /// query and export phases are skipped rather than failed.
    #[tokio::test]
    async fn a_server_without_openapi_has_no_api() {
        let server = ceiling::Ceiling::start(1).unwrap_or_else(|e| panic!("{e}"));
        assert!(!has_api(&Target::new(server.addr)).await);
        server.stop().await;
    }

    #[test]
    fn parses_checkpoints_and_head_from_metrics() {
        let text = "# TYPE x gauge\ntracker_event_store_head_position 120\n\
                    tracker_projection_checkpoint_position{projection=\"institutions\"} 118\n\
                    tracker_projection_checkpoint_position{projection=\"learners\"} 110\n";
        let m = parse_metrics(200, text.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.head, 120);
        assert_eq!(m.min_checkpoint, 110);
    }
}
