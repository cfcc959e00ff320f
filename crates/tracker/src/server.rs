//! `tracker serve`: open the stores, bind, route, and shut down gracefully.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpServer, web};
use rand::RngCore as _;
use tracker_store::StoreError;
use tracker_store::delivery_log::DeliveryLog;

use crate::api::{self, ApiContext, ApiKeys};
use crate::backend::{BackendError, EventStoreBackend, ReadBackend, open_read_backend};
use crate::config::{ApiKeyConfig, Config, ConfigError, InstitutionScope, Secret, SourceConfig};
use crate::metrics::Metrics;
use crate::projector::{Projector, RunnerStates};
use crate::sources::Sources;
use crate::state::AppState;
use crate::{ops, webhook};
use tracker_projections::Partition;

/// The id of the source `serve` creates when none is configured.
pub const DEV_SOURCE_ID: &str = "dev";
const DEV_TOKEN_FILE: &str = "dev-source.token";
/// The id of the query API key `serve` creates when none is configured.
pub const DEV_API_KEY_ID: &str = "dev";
const DEV_API_KEY_FILE: &str = "dev-api.key";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("delivery log: {0}")]
    DeliveryLog(#[source] StoreError),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sources: {0}")]
    Sources(#[from] crate::signature::SignatureError),
}

/// How `start` behaves beyond the configuration.
#[derive(Debug, Clone, Copy)]
pub struct StartOptions {
    /// Let SIGTERM/SIGINT stop the server gracefully (the binary); in-process
    /// tests leave the process's signals alone.
    pub handle_signals: bool,
    /// HTTP worker threads; `None`: one per core.
    pub workers: Option<usize>,
    /// Run the projection workers in this process (`serve`); false for
    /// `serve --no-projector`, when `tracker project` processes do it.
    pub projector: bool,
}

impl Default for StartOptions {
    fn default() -> Self {
        Self {
            handle_signals: true,
            workers: None,
            projector: true,
        }
    }
}

/// A running tracker.
pub struct Running {
    pub local_addr: SocketAddr,
    /// The development source's webhook URL, when one was created.
    pub dev_webhook_url: Option<String>,
    /// The development operator key of the query API, when one was created.
    pub dev_api_key: Option<String>,
    handle: ServerHandle,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    backend: EventStoreBackend,
    state: web::Data<AppState>,
    api: web::Data<ApiContext>,
    projector: Option<Projector>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Waits until the server stops (a signal, or [`stop`](Self::stop)), then
    /// closes the stores: nothing acknowledged is lost, because every answer
    /// was sent after its event was durable. Everything is closed whatever
    /// fails; the first failure (the server's, a projection that halted or
    /// failed, a store that did not close cleanly) is the result, so that
    /// `tracker serve` exits non-zero.
    pub async fn wait(self) -> std::io::Result<()> {
        let mut result = match self.server.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        };
        let mut failed = |what: &str, e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "{what}");
            if result.is_ok() {
                result = Err(std::io::Error::other(format!("{what}: {e}")));
            }
        };
        if let Some(projector) = self.projector
            && let Err(e) = projector.stop().await
        {
            failed("a projection stopped with an error", &e);
        }
        if let Err(e) = self.state.deliveries.close().await {
            failed("closing the delivery log", &e);
        }
        if let Err(e) = self.backend.close().await {
            failed("closing the event store", &e);
        }
        tracing::info!("stopped");
        result
    }

    /// Stops accepting, finishes in-flight requests (when `graceful`), then
    /// closes the stores.
    pub async fn stop(self, graceful: bool) -> std::io::Result<()> {
        self.handle.stop(graceful).await;
        self.wait().await
    }

    /// Stops the event store taking writes while HTTP goes on answering:
    /// deliveries then get 503 and `/readyz` says so. For draining a node
    /// before maintenance (and for testing that path).
    pub async fn close_event_store(&self) -> Result<(), StoreError> {
        self.backend.close().await
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// What the query API's handlers share.
    pub fn api(&self) -> &ApiContext {
        &self.api
    }
}

/// Opens the stores and starts serving on `config.listen` (port 0 picks one).
pub async fn start(config: Config, options: StartOptions) -> Result<Running, ServeError> {
    let zone = config.timezone()?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::Io {
        action: "creating data directory",
        path: config.data_dir.display().to_string(),
        source,
    })?;

    let (source_configs, dev_token) = if config.sources.is_empty() {
        let token = dev_token(&config.data_dir)?;
        (
            vec![SourceConfig {
                id: DEV_SOURCE_ID.to_owned(),
                token: token.clone(),
                institutions: InstitutionScope::All,
                signing_secret: None,
            }],
            Some(token),
        )
    } else {
        (config.sources.clone(), None)
    };

    let (key_configs, dev_api_key) = if config.api_keys.is_empty() {
        let key = dev_secret(&config.data_dir, DEV_API_KEY_FILE)?;
        (
            vec![ApiKeyConfig {
                id: DEV_API_KEY_ID.to_owned(),
                key: key.clone(),
                institutions: InstitutionScope::All,
            }],
            Some(key),
        )
    } else {
        (config.api_keys.clone(), None)
    };

    let backend = EventStoreBackend::open(&config).await?;
    let ReadBackend {
        store: read,
        queries,
    } = open_read_backend(&config).await?;
    let runners = options.projector.then(RunnerStates::default);
    let mut api_context = ApiContext::new(
        queries,
        backend.event_store(),
        ApiKeys::from_config(&key_configs),
    );
    api_context.applied = runners.as_ref().map(RunnerStates::applied);
    let api_context = web::Data::new(api_context);
    let deliveries = DeliveryLog::open_with(
        config.data_dir.join("deliveries.sqlite"),
        config.delivery_log.keep(),
    )
    .map_err(ServeError::DeliveryLog)?;
    let state = web::Data::new(AppState {
        store: backend.event_store(),
        read: Arc::clone(&read),
        deliveries,
        sources: Sources::from_config(&source_configs)?,
        zone,
        body_limit: config.body_limit,
        body_timeout: Duration::from_secs(config.body_timeout_secs),
        metrics: Arc::new(Metrics::new()),
        runners: runners.clone(),
    });

    let app_state = state.clone();
    let app_api = api_context.clone();
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(app_state.clone())
            .app_data(app_api.clone())
            .configure(api::configure)
            .service(
                web::resource("/webhooks/toolzz/{token}")
                    .route(web::post().to(webhook::receive))
                    .default_service(web::to(webhook::method_not_allowed)),
            )
            .route("/healthz", web::get().to(ops::healthz))
            .route("/readyz", web::get().to(ops::readyz))
            .route("/metrics", web::get().to(ops::metrics))
    })
    .shutdown_timeout(config.shutdown_timeout_secs)
    .client_request_timeout(Duration::from_secs(10));
    if !options.handle_signals {
        server = server.disable_signals();
    }
    if let Some(n) = options.workers {
        server = server.workers(n.max(1));
    }
    let server = server
        .bind(config.listen)
        .map_err(|source| ServeError::Io {
            action: "binding",
            path: config.listen.to_string(),
            source,
        })?;
    let local_addr = server.addrs().first().copied().unwrap_or(config.listen);
    let server = server.run();
    let handle = server.handle();
    let server = tokio::spawn(server);
    let projector = runners.map(|states| {
        Projector::start(
            backend.event_store(),
            read,
            &config.projector,
            Partition::WHOLE,
            &states,
        )
    });

    tracing::info!(%local_addr, data_dir = %config.data_dir.display(), timezone = %config.source_timezone, "listening");
    let dev_webhook_url =
        dev_token.map(|t| format!("http://{local_addr}/webhooks/toolzz/{}", t.expose()));
    Ok(Running {
        local_addr,
        dev_webhook_url,
        dev_api_key: dev_api_key.map(|k| k.expose().to_owned()),
        handle,
        server,
        backend,
        state,
        api: api_context,
        projector,
    })
}

/// The development source's token, kept in the data directory so the URL
/// stays the same across restarts.
fn dev_token(data_dir: &Path) -> Result<Secret, ServeError> {
    let path = data_dir.join(DEV_TOKEN_FILE);
    let io = |action, source| ServeError::Io {
        action,
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(existing) if existing.trim().len() >= 16 => return Ok(Secret::new(existing.trim())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("reading", e)),
    }
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    write_private(&path, &token).map_err(|e| io("writing", e))?;
    Ok(Secret::new(token))
}

/// A development secret kept in `file` of the data directory (created on
/// first use), so it stays the same across restarts.
fn dev_secret(data_dir: &Path, file: &str) -> Result<Secret, ServeError> {
    let path = data_dir.join(file);
    let io = |action, source| ServeError::Io {
        action,
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(existing) if existing.trim().len() >= 16 => return Ok(Secret::new(existing.trim())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("reading", e)),
    }
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    let secret = hex::encode(bytes);
    write_private(&path, &secret).map_err(|e| io("writing", e))?;
    Ok(Secret::new(secret))
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}
