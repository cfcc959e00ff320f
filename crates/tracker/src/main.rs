//! `tracker`: one binary, one subcommand per role.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use tracker::backend::{EventStoreBackend, open_read_store};
use tracker::config::{Config, LogFormat, OnErrorSetting, Overrides};
use tracker::projector::{Projector, RunnerStates};
use tracker::replay;
use tracker::server::{self, StartOptions};
use tracker_projections::Partition;
use tracker_store::delivery_log::{DeliveryFilter, DeliveryLog};

#[derive(Debug, Parser)]
#[command(
    name = "tracker",
    version,
    about = "Event-sourced learning-progress tracker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where configuration comes from: defaults, `--config`, `TRACKER_*`, flags.
#[derive(Debug, Args)]
struct Common {
    /// TOML configuration file.
    #[arg(long, short, env = "TRACKER_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of the embedded stores (overrides `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Receive webhooks (and, in later roles, project and answer queries).
    Serve {
        #[command(flatten)]
        common: Common,
        /// Address to listen on (overrides `listen`).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Do not run the projection workers here (run `tracker project`
        /// processes instead).
        #[arg(long)]
        no_projector: bool,
    },
    /// Run only the projection workers, against the configured event store
    /// and read store, until SIGTERM.
    Project {
        #[command(flatten)]
        common: Common,
        /// Project only the institutions with `id % n == i` (e.g. `0/2`).
        #[arg(long, default_value = "0/1", value_parser = Partition::parse)]
        partition: Partition,
        /// What to do with an event that cannot be applied (overrides
        /// `projector.on_error`).
        #[arg(long, value_enum)]
        on_error: Option<OnErrorSetting>,
    },
    /// Rebuild every read model from position 0 beside the current ones, and
    /// switch to the rebuilt ones when they have caught up.
    Replay {
        #[command(flatten)]
        common: Common,
    },
    /// Print each projection's checkpoint and lag against the event log, a
    /// JSON object a line: what `/readyz` lists, without a running server.
    Status {
        #[command(flatten)]
        common: Common,
    },
    /// List the events the projections could not apply.
    DeadLetters {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// List recent webhook calls from the delivery log, newest first.
    Deliveries {
        #[command(flatten)]
        common: Common,
        /// Only calls answered with this HTTP status.
        #[arg(long)]
        status: Option<u16>,
        /// Only calls of this source id.
        #[arg(long)]
        source: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tracker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tracker: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

fn load(
    common: &Common,
    listen: Option<std::net::SocketAddr>,
) -> Result<Config, Box<dyn std::error::Error>> {
    let overrides = Overrides {
        listen,
        data_dir: common.data_dir.clone(),
    };
    Ok(Config::load(common.config.as_deref(), &overrides)?)
}

/// SIGTERM or Ctrl-C. SIGTERM is registered when this is called, not when the
/// future is first polled, so one that arrives during start-up is not lost
/// (it would otherwise kill the process without a graceful stop).
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    })
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("TRACKER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Which files of the data directory a command only reads: the embedded
/// stores create what is missing, so such a command pointed at the wrong
/// directory would report an empty system, every projection caught up, and
/// leave empty stores behind. It is refused instead.
#[derive(Clone, Copy)]
enum Reads {
    EventLog,
    ReadModels,
    DeliveryLog,
}

fn existing_data(config: &Config, reads: &[Reads]) -> Result<(), Box<dyn std::error::Error>> {
    let unset =
        |url: &Option<tracker::config::Secret>| url.as_ref().is_none_or(|u| u.expose().is_empty());
    for what in reads {
        let (name, embedded) = match what {
            Reads::EventLog => ("events.sqlite", unset(&config.event_store.url)),
            Reads::ReadModels => ("readmodels", unset(&config.read_store.url)),
            Reads::DeliveryLog => ("deliveries.sqlite", true),
        };
        let path = config.data_dir.join(name);
        if embedded && !path.exists() {
            return Err(format!(
                "{} does not exist: is the data directory (--data-dir, TRACKER_DATA_DIR) the one `tracker serve` uses?",
                path.display()
            )
            .into());
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Serve {
            common,
            listen,
            no_projector,
        } => {
            let config = load(&common, listen)?;
            init_tracing(config.log_format);
            let options = StartOptions {
                projector: !no_projector,
                ..StartOptions::default()
            };
            let running = server::start(config, options).await?;
            if let Some(url) = &running.dev_webhook_url {
                // Printed once, on stdout, and never logged: it holds the token.
                println!(
                    "No [[sources]] configured: using development source '{}' for all institutions.\nWebhook URL: {url}",
                    server::DEV_SOURCE_ID
                );
            }
            if let Some(key) = &running.dev_api_key {
                // Printed once, on stdout, and never logged: it is the key.
                println!(
                    "No [[api_keys]] configured: using development operator key '{}' for all institutions.\nAPI key: {key}",
                    server::DEV_API_KEY_ID
                );
            }
            println!("tracker listening on http://{}", running.local_addr);
            running.wait().await?;
            Ok(())
        }
        Command::Project {
            common,
            partition,
            on_error,
        } => {
            let mut config = load(&common, None)?;
            if let Some(on_error) = on_error {
                config.projector.on_error = on_error;
            }
            init_tracing(config.log_format);
            let shutdown = shutdown_signal()?;
            let backend = EventStoreBackend::open(&config).await?;
            let read = open_read_store(&config).await?;
            let mut projector = Projector::start(
                backend.event_store(),
                read,
                &config.projector,
                partition,
                &RunnerStates::default(),
            );
            // On stdout, for scripts (and tests) that wait for it.
            println!("projector running (partition {partition})");
            let outcome = tokio::select! {
                halted = projector.halted() => halted.map_err(Into::into),
                () = shutdown => {
                    tracing::info!("stopping");
                    projector.stop().await.map_err(Into::into)
                }
            };
            backend.close().await?;
            outcome
        }
        Command::Replay { common } => {
            let config = load(&common, None)?;
            existing_data(&config, &[Reads::EventLog])?;
            init_tracing(config.log_format);
            let backend = EventStoreBackend::open(&config).await?;
            let read = open_read_store(&config).await?;
            let on_error = config.projector.on_error.into();
            let generation = replay::run(backend.event_store(), &*read, on_error).await?;
            println!("read models rebuilt; generation {generation} is now current");
            backend.close().await?;
            Ok(())
        }
        Command::Status { common } => {
            let config = load(&common, None)?;
            existing_data(&config, &[Reads::EventLog, Reads::ReadModels])?;
            let backend = EventStoreBackend::open(&config).await?;
            let read = open_read_store(&config).await?;
            let head = backend.event_store().head().await?;
            for status in tracker::ops::projection_status(&*read, head, None).await? {
                println!("{}", serde_json::to_string(&status)?);
            }
            backend.close().await?;
            Ok(())
        }
        Command::DeadLetters { common, limit } => {
            let config = load(&common, None)?;
            existing_data(&config, &[Reads::ReadModels])?;
            let read = open_read_store(&config).await?;
            for d in read.dead_letters(limit).await? {
                println!("{}", serde_json::to_string(&d)?);
            }
            Ok(())
        }
        Command::Deliveries {
            common,
            status,
            source,
            limit,
        } => {
            let config = load(&common, None)?;
            existing_data(&config, &[Reads::DeliveryLog])?;
            let log = DeliveryLog::open(config.data_dir.join("deliveries.sqlite"))?;
            let rows = log
                .list(DeliveryFilter {
                    status,
                    source_id: source,
                    limit: Some(limit),
                    ..DeliveryFilter::default()
                })
                .await?;
            for row in rows {
                let r = row.record;
                let line = serde_json::json!({
                    "id": row.id,
                    "received_at": r.received_at,
                    "request_id": r.request_id,
                    "source_id": r.source_id,
                    "remote_addr": r.remote_addr,
                    "status": r.status,
                    "reason": r.reason,
                    "message": r.message,
                    "event_id": r.event_id,
                    "position": r.position,
                    "body": String::from_utf8_lossy(&r.body),
                    "body_truncated": r.body_truncated,
                });
                println!("{line}");
            }
            log.close().await?;
            Ok(())
        }
    }
}
