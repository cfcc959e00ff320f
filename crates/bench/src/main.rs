//! `tracker-bench`: see the crate docs and the README's "Performance".
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;
use tracker_bench::{Options, report, run, write_report};

fn main() -> ExitCode {
    let opts = Options::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.client_threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tracker-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match runtime.block_on(run(&opts)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tracker-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", report::render(&report));
    if let Some(path) = &opts.report {
        if let Err(e) = write_report(&report, path) {
            eprintln!("tracker-bench: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("\nreport written to {}", path.display());
    }
    // Failed phases fail the command; skipped ones (said why) do not.
    let failed: Vec<&str> = [
        ("ceiling", &report.phases.ceiling.status),
        ("ingest", &report.phases.ingest.status),
        ("replay_sqlite", &report.phases.replay_sqlite.status),
        ("replay_postgres", &report.phases.replay_postgres.status),
        ("fixed_rate", &report.phases.fixed_rate.status),
        ("queries", &report.phases.queries.status),
        ("export", &report.phases.export.status),
    ]
    .into_iter()
    .filter(|(_, s)| s.starts_with("failed"))
    .map(|(n, _)| n)
    .collect();
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("tracker-bench: phases failed: {}", failed.join(", "));
        ExitCode::FAILURE
    }
}
