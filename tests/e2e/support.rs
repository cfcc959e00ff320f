//! Starting the tracker for a test: in process on `127.0.0.1:0` with a fresh
//! data directory, or as a child `tracker serve` process.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use tracker::config::{Config, InstitutionScope, Secret, SourceConfig};
use tracker::server::{Running, StartOptions};

pub const TOKEN: &str = "test-token-0123456789abcdef";
/// A source limited to institution 12345 (the documented example's).
pub const LIMITED_TOKEN: &str = "limited-token-0123456789abc";
pub const SIGNED_TOKEN: &str = "signed-token-0123456789abcd";
pub const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Query API keys: an operator key, and keys for institutions 100 and 10.
pub const OPERATOR_KEY: &str = "operator-key-0123456789abcdef";
pub const KEY_100: &str = "institution-100-key-0123456789";
pub const KEY_10: &str = "institution-10-key-01234567890";

pub fn api_keys() -> Vec<tracker::config::ApiKeyConfig> {
    use tracker::config::ApiKeyConfig;
    vec![
        ApiKeyConfig {
            id: "operator".into(),
            key: Secret::new(OPERATOR_KEY),
            institutions: InstitutionScope::All,
        },
        ApiKeyConfig {
            id: "dashboard-100".into(),
            key: Secret::new(KEY_100),
            institutions: InstitutionScope::Only([100].into_iter().collect()),
        },
        ApiKeyConfig {
            id: "dashboard-10".into(),
            key: Secret::new(KEY_10),
            institutions: InstitutionScope::Only([10].into_iter().collect()),
        },
    ]
}

pub const DOCUMENTED: &str = include_str!("../fixtures/trail-completed.json");
pub const MULTI: &str = include_str!("../fixtures/trail-completed-multi-course.json");
pub const OTHER_SLUG: &str = include_str!("../fixtures/course-completed-other-slug.json");

pub fn sources() -> Vec<SourceConfig> {
    vec![
        SourceConfig {
            id: "all".into(),
            token: Secret::new(TOKEN),
            institutions: InstitutionScope::All,
            signing_secret: None,
        },
        SourceConfig {
            id: "limited".into(),
            token: Secret::new(LIMITED_TOKEN),
            institutions: InstitutionScope::Only([12345].into_iter().collect()),
            signing_secret: None,
        },
        SourceConfig {
            id: "signed".into(),
            token: Secret::new(SIGNED_TOKEN),
            institutions: InstitutionScope::All,
            signing_secret: Some(Secret::new(SIGNING_SECRET)),
        },
    ]
}

/// A tracker running inside the test process.
pub struct TestApp {
    pub running: Option<Running>,
    pub base: String,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            sources: sources(),
            ..Config::default()
        };
        adjust(&mut config);
        let running = tracker::server::start(
            config,
            StartOptions {
                handle_signals: false,
                workers: Some(2),
                projector: true,
            },
        )
        .await
        .unwrap();
        let base = format!("http://{}", running.local_addr);
        Self {
            running: Some(running),
            base,
            client: reqwest::Client::new(),
            dir,
        }
    }

    /// [`Self::spawn_with`], with the start options given (e.g. no
    /// projector).
    pub async fn spawn_with_options(
        adjust: impl FnOnce(&mut Config),
        options: StartOptions,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            sources: sources(),
            ..Config::default()
        };
        adjust(&mut config);
        let running = tracker::server::start(config, options).await.unwrap();
        let base = format!("http://{}", running.local_addr);
        Self {
            running: Some(running),
            base,
            client: reqwest::Client::new(),
            dir,
        }
    }

    /// GET `path` with `key` as the bearer key and `accept` (if any):
    /// status, headers and body text.
    pub async fn api_get(
        &self,
        path: &str,
        key: Option<&str>,
        accept: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let mut req = self.client.get(self.url(path));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        if let Some(accept) = accept {
            req = req.header("accept", accept);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        (status, headers, res.text().await.unwrap())
    }

    /// GET `path` as an NDJSON export with `key`, its body left to stream.
    pub async fn ndjson(&self, path: &str, key: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(key)
            .header("accept", "application/x-ndjson")
            .send()
            .await
            .unwrap()
    }

    /// GET `path` as JSON with `key`: status, `X-Consistent-Through` and body.
    pub async fn api_json(&self, path: &str, key: &str) -> (u16, Option<u64>, Value) {
        let (status, headers, body) = self.api_get(path, Some(key), None).await;
        let at = headers
            .get("x-consistent-through")
            .map(|v| v.to_str().unwrap().parse().unwrap());
        let body = serde_json::from_str(&body).unwrap_or(Value::String(body));
        (status, at, body)
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn webhook(&self, token: &str) -> String {
        self.url(&format!("/webhooks/toolzz/{token}"))
    }

    pub async fn post(&self, token: &str, body: &str) -> (u16, Value) {
        let res = self
            .client
            .post(self.webhook(token))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    /// Every recorded event, in position order.
    pub async fn events(&self) -> Vec<tracker_store::RecordedEvent> {
        self.running()
            .state()
            .store
            .read_all(tracker_store::ReadAll {
                from: 1,
                limit: 1_000_000,
            })
            .await
            .unwrap()
    }

    /// Stops gracefully and hands back the data directory (still on disk
    /// until the returned value is dropped).
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(r) = self.running.take() {
            r.stop(true).await.unwrap();
        }
        self.dir
    }
}

/// The `tracker` binary, built once per test run.
pub fn tracker_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        escargot::CargoBuild::new()
            .package("tracker")
            .bin("tracker")
            .current_release()
            .run()
            .expect("building the tracker binary")
            .path()
            .to_path_buf()
    })
}

/// A child `tracker serve` process.
pub struct ChildTracker {
    pub child: Child,
    pub addr: SocketAddr,
    pub stdout_lines: Vec<String>,
}

impl ChildTracker {
    /// Starts `tracker serve` on a free port with `config_toml` and waits
    /// until it answers `/healthz`.
    pub fn start(data_dir: &Path, config_toml: Option<&str>) -> Self {
        Self::start_with(data_dir, config_toml, &[])
    }

    pub fn start_with(data_dir: &Path, config_toml: Option<&str>, extra: &[&str]) -> Self {
        let port = free_port();
        let mut cmd = Command::new(tracker_bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(extra)
            .env_remove("TRACKER_CONFIG")
            .env("TRACKER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(toml) = config_toml {
            let path = data_dir.with_extension("toml");
            std::fs::write(&path, toml).unwrap();
            cmd.arg("--config").arg(path);
        }
        let mut child = cmd.spawn().expect("spawning tracker serve");
        let stdout = child.stdout.take().unwrap();
        let mut reader = BufReader::new(stdout);
        let mut stdout_lines = Vec::new();
        // The last line printed at start-up says where it listens.
        loop {
            let mut line = String::new();
            let n = reader.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "tracker serve exited before listening: {stdout_lines:?}"
            );
            let line = line.trim_end().to_owned();
            let done = line.starts_with("tracker listening on");
            stdout_lines.push(line);
            if done {
                break;
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in reader.lines() {});
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_until_healthy(addr);
        Self {
            child,
            addr,
            stdout_lines,
        }
    }

    pub fn webhook(&self, token: &str) -> String {
        format!("http://{}/webhooks/toolzz/{token}", self.addr)
    }

    pub fn sigkill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn sigterm(&self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
    }
}

impl Drop for ChildTracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until_healthy(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            use std::io::{Read as _, Write as _};
            let _ = s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("tracker at {addr} did not become healthy");
}

/// A trail completion for `institution`, `user`, `trail`, finished at `finished_at`.
pub fn completion(institution: u64, user: u64, trail: u64, finished_at: &str) -> String {
    serde_json::json!({
        "event": {"name": "Atividades - Trilha concluída", "slug": "activities.trail.completed", "send_at": finished_at},
        "data": {
            "institution": {"id": institution},
            "user": {"id": user, "name": format!("Learner {user}"), "email": format!("l{user}@example.edu.br")},
            "trail": {"id": trail, "name": format!("Trail {trail}"), "finished_at": finished_at,
                      "courses": [{"id": trail * 10, "title": "Curso"}]}
        }
    })
    .to_string()
}

/// Appends deliveries straight to the embedded event store of `data_dir`
/// (as the receiver would), concurrently so group commit keeps it quick.
pub async fn seed_events(data_dir: &Path, bodies: Vec<String>) -> u64 {
    use tracker_domain::{SourceTimeZone, parse_delivery};
    use tracker_store::{EventMetadata, EventStore as _, ExpectedRevision};
    let store = std::sync::Arc::new(
        tracker_store::sqlite::SqliteEventStore::open(data_dir.join("events.sqlite")).unwrap(),
    );
    let zone = SourceTimeZone::default();
    let mut tasks = Vec::new();
    for body in bodies {
        let store = std::sync::Arc::clone(&store);
        let parsed = parse_delivery(body.as_bytes(), &zone).unwrap();
        tasks.push(tokio::spawn(async move {
            let metadata = EventMetadata {
                received_at: chrono::Utc::now(),
                source_id: "seed".into(),
                request_id: "seed".into(),
                content_hash: parsed.content_hash.clone(),
            };
            let event = tracker::webhook::recorded_event(&parsed, &zone, metadata).unwrap();
            store
                .append(&parsed.stream(), ExpectedRevision::Any, vec![event])
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let head = store.head().await.unwrap();
    store.close().await.unwrap();
    head
}

/// A child `tracker` process with other arguments than `serve`.
pub fn tracker_command(args: &[&str], data_dir: &Path) -> Command {
    let mut cmd = Command::new(tracker_bin());
    cmd.args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("TRACKER_CONFIG")
        .env("TRACKER_LOG", "warn")
        .stdin(Stdio::null());
    cmd
}

/// Reads every event of an embedded store directory after the tracker using
/// it has stopped.
pub async fn events_on_disk(data_dir: &Path) -> Vec<tracker_store::RecordedEvent> {
    use tracker_store::EventStore as _;
    let store =
        tracker_store::sqlite::SqliteEventStore::open(data_dir.join("events.sqlite")).unwrap();
    let events = store
        .read_all(tracker_store::ReadAll {
            from: 1,
            limit: 10_000_000,
        })
        .await
        .unwrap();
    store.close().await.unwrap();
    events
}

/// Appends an event of a known type whose data no projection can read.
/// Three events in the embedded store of `data_dir`: the documented
/// delivery, one no projection can read (position 2), the multi-course one.
pub async fn seed_three_the_second_undecodable(data_dir: &Path) {
    seed_events(data_dir, vec![DOCUMENTED.to_owned()]).await;
    append_undecodable(data_dir).await;
    seed_events(data_dir, vec![MULTI.to_owned()]).await;
}

pub async fn append_undecodable(data_dir: &Path) {
    use tracker_store::{EventMetadata, EventStore as _, ExpectedRevision, NewEvent};
    let store =
        tracker_store::sqlite::SqliteEventStore::open(data_dir.join("events.sqlite")).unwrap();
    store
        .append(
            "learner-1-1",
            ExpectedRevision::Any,
            vec![NewEvent {
                id: uuid::Uuid::new_v4(),
                event_type: "TrailCompleted".into(),
                schema_version: 1,
                data: "{\"not\": \"a completion\"}".into(),
                metadata: EventMetadata {
                    received_at: chrono::Utc::now(),
                    source_id: "t".into(),
                    request_id: "r".into(),
                    content_hash: "sha256:00".into(),
                },
            }],
        )
        .await
        .unwrap();
    store.close().await.unwrap();
}

/// One HTTP/1.1 answer with a `content-length`: its status and JSON body.
pub async fn read_answer(conn: &mut tokio::net::TcpStream) -> (u16, Value) {
    use tokio::io::AsyncReadExt;

    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(conn.read(&mut byte).await.unwrap(), 1, "connection closed");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .unwrap();
    let mut body = vec![0; len];
    conn.read_exact(&mut body).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}
