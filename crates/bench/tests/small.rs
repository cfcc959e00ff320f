//! The benchmark at a tiny size, so it can never rot: the same command as
//! the README's, against the debug `tracker`, every phase with a few
//! thousand deliveries and second-long durations. It checks that each phase
//! completed and produced numbers, never how fast they were.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use serde_json::Value;

/// The debug `tracker`, built the way the end-to-end suite builds it (so
/// the two share one build).
fn tracker_bin() -> std::path::PathBuf {
    escargot::CargoBuild::new()
        .package("tracker")
        .bin("tracker")
        .current_release()
        .run()
        .expect("building the tracker binary")
        .path()
        .to_path_buf()
}

fn positive(v: &Value, path: &str) -> f64 {
    let n = path
        .split('.')
        .fold(v, |v, k| &v[k])
        .as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number in {v:#}"));
    assert!(n > 0.0, "{path} = {n}");
    n
}

fn ok<'a>(report: &'a Value, phase: &str) -> &'a Value {
    let p = &report["phases"][phase];
    assert_eq!(p["status"], "ok", "phase {phase}: {p:#}");
    assert!(
        p["method"].as_str().is_some_and(|m| m.len() > 40),
        "phase {phase} names its method"
    );
    &p["result"]
}

#[test]
fn every_phase_completes_and_reports_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tracker-bench"))
        .args([
            "--events",
            "2000",
            "--institutions",
            "40",
            "--connections",
            "8",
            "--ceiling-secs",
            "0.5",
            "--fixed-secs",
            "1.5",
            "--query-secs",
            "0.3",
            "--query-connections",
            "2",
            "--export-secs",
            "20",
            "--server-log",
            "warn",
            "--report",
        ])
        .arg(&report_path)
        .arg("--tracker")
        .arg(tracker_bin())
        .env_remove("TRACKER_BENCH_POSTGRES_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tracker-bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // The table is printed.
    assert!(stdout.contains("| measure"), "{stdout}");
    assert!(stdout.contains("durable ingest"), "{stdout}");

    let report: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["dataset"]["deliveries"], 2000);
    positive(&report, "dataset.duplicate_deliveries");
    positive(&report, "dataset.recompletions");

    let ceiling = ok(&report, "ceiling");
    positive(ceiling, "per_sec");

    let ingest = ok(&report, "ingest");
    positive(ingest, "per_sec");
    positive(ingest, "ceiling_ratio");
    positive(ingest, "latency.p99_ms");
    let head = positive(ingest, "log_head");
    let dups = report["dataset"]["duplicate_deliveries"].as_f64().unwrap();
    assert_eq!(head, 2000.0 - dups, "redeliveries append nothing");
    assert_eq!(ingest["duplicates_answered"].as_f64(), Some(dups));
    positive(&report["phases"]["ingest"], "peak_rss_mib");
    for phase in ["ingest", "replay_sqlite", "fixed_rate"] {
        let own = positive(&report["phases"][phase], "peak_anon_mib");
        let rss = positive(&report["phases"][phase], "peak_rss_mib");
        assert!(own <= rss, "{phase}: own memory {own} > resident {rss}");
    }

    for phase in ["replay_sqlite", "replay_postgres"] {
        let r = ok(&report, phase);
        assert_eq!(r["events"].as_f64(), Some(head), "{phase}");
        positive(r, "events_per_sec");
        positive(&report["phases"][phase], "peak_rss_mib");
    }

    let fixed = ok(&report, "fixed_rate");
    positive(fixed, "achieved_per_sec");
    positive(fixed, "latency.p99_ms");
    positive(fixed, "latency.p999_ms");
    positive(fixed, "service_time.p50_ms");
    positive(fixed, "lag.latency.count");
    assert_eq!(fixed["lag"]["never_visible"], 0, "{fixed:#}");
    let late = fixed["late_share"].as_f64().unwrap_or(-1.0);
    assert!((0.0..=1.0).contains(&late), "late_share {late}: {fixed:#}");
    positive(&report["phases"]["fixed_rate"], "peak_rss_mib");

    // This tracker has the query API: the fallback for trackers without it
    // (older commits) must not turn these phases into skips here.
    assert_eq!(report["api_available"], true, "{:#}", report["phases"]);
    let queries = ok(&report, "queries").as_array().unwrap();
    assert_eq!(queries.len(), 4);
    for q in queries {
        positive(q, "per_sec");
        positive(q, "latency.p99_ms");
        assert_eq!(q["failures"]["non_2xx"], 0, "{q:#}");
    }
    let export = ok(&report, "export");
    positive(export, "events_per_sec");
    positive(export, "mib_per_sec");
    assert_eq!(export["complete"], true, "{export:#}");
    // The whole log, every event of it.
    assert_eq!(export["events"].as_f64(), export["log_head"].as_f64());
    assert!(export["log_head"].as_f64().unwrap() > head, "{export:#}");
    positive(export, "largest_institution.events_per_sec");
    assert_eq!(
        export["largest_institution"]["complete"], true,
        "{export:#}"
    );
    positive(&report["phases"]["export"], "peak_rss_mib");

    let table = report["table"].as_array().unwrap();
    assert!(table.len() >= 9, "{table:#?}");
}
