//! The real `tracker` as a child process: `serve` on `127.0.0.1:0` (the
//! address read from its start-up line), `replay`, and the memory sampler
//! that watches a process's resident set.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The bench's webhook source token (its URL credential).
pub const TOKEN: &str = "bench-token-0123456789abcdef";
/// The bench's query API key (an operator key: every institution).
pub const API_KEY: &str = "bench-api-key-0123456789abcdef";

#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("starting {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tracker {what} failed ({status}); its log ends with:\n{log}")]
    Failed {
        what: String,
        status: String,
        log: String,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// How the tracker children are started.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub tracker: PathBuf,
    pub data_dir: PathBuf,
    /// Where the children's stderr goes (appended).
    pub log: PathBuf,
    /// `TRACKER_LOG` for the children.
    pub log_level: String,
}

/// A running `tracker serve`.
pub struct Serve {
    child: Child,
    pub addr: SocketAddr,
    /// Whether the query API keys setting was accepted.
    pub api_keys: bool,
    pub memory: MemorySampler,
}

impl Launcher {
    fn command(&self, args: &[&str]) -> Result<Command, ChildError> {
        let mut cmd = Command::new(&self.tracker);
        cmd.args(args).arg("--data-dir").arg(&self.data_dir);
        // Only what the bench sets: stray TRACKER_* variables of the caller's
        // shell would change what is measured (or be refused).
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TRACKER_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("TRACKER_LOG", &self.log_level)
            .env(
                "TRACKER_SOURCES",
                format!(r#"[{{id="bench",token="{TOKEN}",institutions=["*"]}}]"#),
            )
            .stdin(Stdio::null());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        cmd.stderr(log);
        Ok(cmd)
    }

    /// Starts `tracker serve`, with the bench's API key when the tracker
    /// knows the setting (it refuses unknown settings; then it runs without).
    pub fn serve(&self, projector: bool) -> Result<Serve, ChildError> {
        match self.serve_with(projector, true) {
            Ok(s) => Ok(s),
            Err(ChildError::Failed { log, .. }) if log.contains("api_keys") => {
                self.serve_with(projector, false)
            }
            Err(e) => Err(e),
        }
    }

    fn serve_with(&self, projector: bool, api_keys: bool) -> Result<Serve, ChildError> {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
        if !projector {
            args.push("--no-projector");
        }
        let mut cmd = self.command(&args)?;
        if api_keys {
            cmd.env(
                "TRACKER_API_KEYS",
                format!(r#"[{{id="bench",key="{API_KEY}",institutions=["*"]}}]"#),
            );
        }
        let log_start = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|source| ChildError::Spawn {
                what: self.tracker.display().to_string(),
                source,
            })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let mut reader = BufReader::new(stdout);
        let mut addr = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                break;
            }
            if let Some(rest) = line.trim().strip_prefix("tracker listening on http://") {
                addr = rest.parse::<SocketAddr>().ok();
                break;
            }
        }
        let Some(addr) = addr else {
            let status = child.wait()?;
            return Err(ChildError::Failed {
                what: "serve".into(),
                status: status.to_string(),
                log: self.log_since(log_start),
            });
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in reader.lines() {});
        let memory = MemorySampler::start(child.id());
        Ok(Serve {
            child,
            addr,
            api_keys,
            memory,
        })
    }

    /// Runs `tracker replay` (with `env` added) to the end; returns how long
    /// it took, its peak resident memory and its CPU seconds.
    pub fn replay(&self, env: &[(&str, String)]) -> Result<(Duration, Peak, f64), ChildError> {
        let mut cmd = self.command(&["replay"])?;
        for (k, v) in env {
            cmd.env(k, v);
        }
        let log_start = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let started = Instant::now();
        let mut child = cmd
            .stdout(Stdio::null())
            .spawn()
            .map_err(|source| ChildError::Spawn {
                what: self.tracker.display().to_string(),
                source,
            })?;
        let memory = MemorySampler::start(child.id());
        let status = child.wait()?;
        let elapsed = started.elapsed();
        let (peak, cpu) = memory.stop();
        if !status.success() {
            return Err(ChildError::Failed {
                what: "replay".into(),
                status: status.to_string(),
                log: self.log_since(log_start),
            });
        }
        Ok((elapsed, peak, cpu))
    }

    /// `tracker status` with `env`: each projection's checkpoint, as the
    /// read store holds it.
    pub fn status(&self, env: &[(&str, String)]) -> Result<Vec<(String, u64)>, ChildError> {
        let mut cmd = self.command(&["status"])?;
        for (k, v) in env {
            cmd.env(k, v);
        }
        let log_start = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let out = cmd.stdout(Stdio::piped()).output()?;
        let failed = |status: String| ChildError::Failed {
            what: "status".into(),
            status,
            log: self.log_since(log_start),
        };
        if !out.status.success() {
            return Err(failed(out.status.to_string()));
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| {
                let v: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| failed(format!("printed {line:?}: {e}")))?;
                match (v["projection"].as_str(), v["checkpoint"].as_u64()) {
                    (Some(p), Some(c)) => Ok((p.to_owned(), c)),
                    _ => Err(failed(format!("printed {line:?}"))),
                }
            })
            .collect()
    }

    fn log_since(&self, offset: u64) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let from = usize::try_from(offset).unwrap_or(0).min(text.len());
        let tail = &text[from..];
        let tail = &tail[tail.len().saturating_sub(4000)..];
        String::from_utf8_lossy(tail).into_owned()
    }
}

impl Serve {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds (user + system) the server has used so far.
    pub fn cpu_secs(&self) -> f64 {
        cpu_ticks(Path::new(&format!("/proc/{}/stat", self.child.id()))).unwrap_or(0) as f64
            / CLOCK_TICKS
    }

    /// SIGTERM, then waits (a graceful stop closes the stores cleanly).
    pub fn stop(mut self) -> Result<ExitStatus, ChildError> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let pid = i32::try_from(self.child.id()).unwrap_or(i32::MAX);
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                return Ok(self.child.wait()?);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // Only a Serve that was not stopped: never leave a server behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Resident memory of a process, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peak {
    /// `VmRSS`: everything resident, file pages mapped by the process (the
    /// read models' mapped pages, shared with the OS page cache) included.
    pub rss: u64,
    /// `RssAnon`: the process's own memory (heap, stacks, SQLite caches).
    pub anon: u64,
}

/// Samples `/proc/<pid>/status` every 10 ms; [`take_peak`] returns the
/// largest values since the last call, so each phase gets its own peak.
///
/// [`take_peak`]: MemorySampler::take_peak
pub struct MemorySampler {
    peak: Arc<AtomicU64>,
    peak_anon: Arc<AtomicU64>,
    /// CPU time (user + system, clock ticks) at the last sample.
    cpu: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MemorySampler {
    pub fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let peak_anon = Arc::new(AtomicU64::new(0));
        let cpu = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let path = PathBuf::from(format!("/proc/{pid}/status"));
        let stat = PathBuf::from(format!("/proc/{pid}/stat"));
        let thread = {
            let (peak, peak_anon) = (Arc::clone(&peak), Arc::clone(&peak_anon));
            let (cpu, stop) = (Arc::clone(&cpu), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("rss-sampler".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match memory_bytes(&path) {
                            Some(now) => {
                                peak.fetch_max(now.rss, Ordering::Relaxed);
                                peak_anon.fetch_max(now.anon, Ordering::Relaxed);
                                if let Some(ticks) = cpu_ticks(&stat) {
                                    cpu.store(ticks, Ordering::Relaxed);
                                }
                            }
                            None => break,
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
                .ok()
        };
        Self {
            peak,
            peak_anon,
            cpu,
            stop,
            thread,
        }
    }

    /// CPU seconds (user + system) the process had used at the last sample.
    pub fn cpu_secs(&self) -> f64 {
        self.cpu.load(Ordering::Relaxed) as f64 / CLOCK_TICKS
    }

    /// The peak since the last call (or the start), and starts a new window
    /// at the current value.
    pub fn take_peak(&self) -> Peak {
        Peak {
            rss: self.peak.swap(0, Ordering::Relaxed),
            anon: self.peak_anon.swap(0, Ordering::Relaxed),
        }
    }

    /// Stops sampling; returns the peak of the last window and the CPU
    /// seconds at the last sample.
    pub fn stop(mut self) -> (Peak, f64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (self.take_peak(), self.cpu_secs())
    }
}

impl Drop for MemorySampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `USER_HZ`: 100 on every Linux the bench runs on (the kernel's ABI for
/// `/proc/<pid>/stat`, whatever `CONFIG_HZ` is).
pub const CLOCK_TICKS: f64 = 100.0;

/// User + system CPU of a process in clock ticks, from `/proc/<pid>/stat`.
pub fn cpu_ticks(stat: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(stat).ok()?;
    // The command name may hold spaces; fields restart after its ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU seconds this process has used.
pub fn own_cpu_secs() -> f64 {
    cpu_ticks(Path::new("/proc/self/stat")).unwrap_or(0) as f64 / CLOCK_TICKS
}

/// `VmRSS` of a process, in bytes; `None` once it is gone.
pub fn rss_bytes(status: &Path) -> Option<u64> {
    memory_bytes(status).map(|m| m.rss)
}

/// `VmRSS` and `RssAnon` of a process; `None` once it is gone.
pub fn memory_bytes(status: &Path) -> Option<Peak> {
    let text = std::fs::read_to_string(status).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    Some(Peak {
        rss: field("VmRSS:")?,
        anon: field("RssAnon:")?,
    })
}
