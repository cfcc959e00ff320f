//! `docker-compose.yml` checked without a container engine: it parses, every
//! tracker service runs a real subcommand with real flags and only real
//! settings, and the projector workers split the institutions so that no
//! event is projected twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// `Jail` closures return figment's own (large) error type.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use serde_norway::Value;
use tracker::config::{Config, Overrides};
use tracker_projections::Partition;

const DOCKERFILE: &str = "crates/tracker/Dockerfile";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn compose() -> Value {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let mut value: Value = serde_norway::from_str(&text).unwrap();
    value.apply_merge().unwrap();
    value
}

/// figment's `Jail` moves the whole process into a temporary directory and
/// deletes it when the closure returns. A process spawned meanwhile (cargo,
/// the tracker) inherits that directory and can find it gone: "couldn't get
/// the current directory of the process". Tests that jail or spawn hold this.
static WORKING_DIRECTORY: Mutex<()> = Mutex::new(());

fn working_directory() -> MutexGuard<'static, ()> {
    // A failed test poisons the lock; the directory itself is still restored.
    WORKING_DIRECTORY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn tracker_bin() -> PathBuf {
    escargot::CargoBuild::new()
        .package("tracker")
        .bin("tracker")
        .current_release()
        .run()
        .expect("building the tracker binary")
        .path()
        .to_path_buf()
}

/// `${NAME:?message}` and `${NAME:-default}` as compose would fill them in
/// (with a stand-in secret where the operator must supply one).
fn interpolate(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').map(|e| start + e).unwrap();
        let inner = &rest[start + 2..end];
        match inner.split_once(":-") {
            Some((_, default)) => out.push_str(default),
            None => out.push_str("stand-in-secret-0123456789abcdef"),
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

struct TrackerService {
    name: String,
    command: Vec<String>,
    environment: BTreeMap<String, String>,
}

fn tracker_services(compose: &Value) -> Vec<TrackerService> {
    let services = compose["services"].as_mapping().unwrap();
    services
        .iter()
        .filter(|(_, s)| s["build"]["dockerfile"].as_str() == Some(DOCKERFILE))
        .map(|(name, s)| TrackerService {
            name: name.as_str().unwrap().to_owned(),
            command: s["command"]
                .as_sequence()
                .unwrap_or_else(|| panic!("{name:?}: command must be a list"))
                .iter()
                .map(|c| c.as_str().unwrap().to_owned())
                .collect(),
            environment: s["environment"]
                .as_mapping()
                .unwrap()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_owned(),
                        interpolate(v.as_str().unwrap()),
                    )
                })
                .collect(),
        })
        .collect()
}

#[test]
fn the_file_describes_the_multi_process_system() {
    let c = compose();
    let services = c["services"].as_mapping().unwrap();
    let names: BTreeSet<_> = services.keys().map(|k| k.as_str().unwrap()).collect();
    for wanted in [
        "kurrentdb",
        "postgres",
        "receiver",
        "projector-0",
        "projector-1",
    ] {
        assert!(names.contains(wanted), "no {wanted} service in {names:?}");
    }
    assert!(
        c["services"]["kurrentdb"]["image"]
            .as_str()
            .unwrap()
            .contains("kurrentdb")
    );
    assert_eq!(
        c["services"]["receiver"]["deploy"]["replicas"].as_u64(),
        Some(2)
    );
    for (name, s) in services {
        assert!(
            s["restart"].as_str().is_some(),
            "{name:?} has no restart policy"
        );
        assert!(
            s["healthcheck"]["test"].as_sequence().is_some(),
            "{name:?} has no health check"
        );
    }
    assert!(root().join(DOCKERFILE).exists());
    assert_eq!(tracker_services(&c).len(), 3);
}

/// Replicas of `serve` must share their webhook sources and query API keys:
/// a `serve` without them makes development ones in its own data directory,
/// different on each replica.
#[test]
fn every_receiver_is_given_its_sources_and_api_keys() {
    let c = compose();
    let receivers: Vec<_> = tracker_services(&c)
        .into_iter()
        .filter(|s| s.command.first().map(String::as_str) == Some("serve"))
        .collect();
    assert!(!receivers.is_empty());
    for service in receivers {
        for setting in ["TRACKER_SOURCES", "TRACKER_API_KEYS"] {
            assert!(
                service.environment.contains_key(setting),
                "{}: no {setting}",
                service.name
            );
        }
    }
}

/// What the operator supplies (`${NAME}`) lives in their shell, where a
/// `TRACKER_*` name would be read, and refused, by every tracker they run.
#[test]
fn what_the_operator_supplies_is_not_named_like_a_setting() {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let supplied: Vec<&str> = text
        .split("${")
        .skip(1)
        .map(|rest| rest.split([':', '}']).next().unwrap_or(""))
        .collect();
    assert!(!supplied.is_empty());
    for name in supplied {
        assert!(!name.starts_with("TRACKER_"), "${{{name}}}");
    }
}

#[test]
fn every_command_is_a_real_subcommand_with_real_flags() {
    let _cwd = working_directory();
    let bin = tracker_bin();
    let c = compose();
    for service in tracker_services(&c) {
        // clap checks the subcommand, every flag and every flag's value
        // before it acts on --help.
        let status = Command::new(&bin)
            .args(&service.command)
            .arg("--help")
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "{}: `tracker {}` is not a valid command",
            service.name,
            service.command.join(" ")
        );
        // Health checks that run the binary must be valid commands too.
        let check = &c["services"][service.name.as_str()]["healthcheck"]["test"];
        let argv: Vec<&str> = check
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        if argv.get(1) == Some(&"tracker") {
            let status = Command::new(&bin)
                .args(&argv[2..])
                .arg("--help")
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(
                status.success(),
                "{}: health check {argv:?} is not a valid command",
                service.name
            );
        }
    }
}

#[test]
fn every_variable_is_a_real_setting() {
    let c = compose();
    for service in tracker_services(&c) {
        for key in service.environment.keys() {
            assert!(
                key.starts_with("TRACKER_"),
                "{}: {key} is not a tracker setting",
                service.name
            );
        }
        let env = service.environment.clone();
        let name = service.name.clone();
        let _cwd = working_directory();
        figment::Jail::expect_with(move |jail| {
            for (k, v) in &env {
                jail.set_env(k, v);
            }
            // Unknown keys are refused by Config::load, so this fails on a typo.
            let config =
                Config::load(None, &Overrides::default()).map_err(|e| format!("{name}: {e}"))?;
            let event_store = config
                .event_store
                .url
                .as_ref()
                .map(|u| u.expose().to_owned());
            assert!(
                event_store.is_some_and(|u| u.starts_with("esdb://")),
                "{name}: event log is not in KurrentDB"
            );
            let read_store = config
                .read_store
                .url
                .as_ref()
                .map(|u| u.expose().to_owned());
            assert!(
                read_store.is_some_and(|u| u.starts_with("postgres://")),
                "{name}: read models are not in PostgreSQL"
            );
            Ok(())
        });
    }
}

#[test]
fn projector_workers_never_project_the_same_events() {
    let c = compose();
    let services = tracker_services(&c);
    let mut partitions = Vec::new();
    for s in &services {
        match s.command.first().map(String::as_str) {
            Some("project") => {
                let at = s.command.iter().position(|a| a == "--partition");
                let text = at.map(|i| s.command[i + 1].as_str()).unwrap_or("0/1");
                partitions.push((s.name.clone(), Partition::parse(text).unwrap()));
            }
            // A receiver that also projected would apply every event a
            // second time beside the partitioned workers.
            Some("serve") => assert!(
                s.command.iter().any(|a| a == "--no-projector"),
                "{}: serve must run with --no-projector here",
                s.name
            ),
            other => panic!("{}: unexpected command {other:?}", s.name),
        }
    }
    assert_eq!(partitions.len(), 2, "two projector workers share the work");
    let counts: BTreeSet<u32> = partitions.iter().map(|(_, p)| p.count).collect();
    assert_eq!(
        counts.len(),
        1,
        "all workers use one partition scheme: {partitions:?}"
    );
    let n = *counts.iter().next().unwrap();
    let indexes: BTreeSet<u32> = partitions.iter().map(|(_, p)| p.index).collect();
    assert_eq!(
        indexes,
        (0..n).collect(),
        "partitions are distinct and cover every institution"
    );
    for institution in 1..=10_000u64 {
        let owners = partitions
            .iter()
            .filter(|(_, p)| p.owns(institution))
            .count();
        assert_eq!(
            owners, 1,
            "institution {institution} has {owners} projectors"
        );
    }
    // Each worker has its own checkpoint and lease key.
    let keys: BTreeSet<String> = partitions
        .iter()
        .map(|(_, p)| {
            tracker_projections::CheckpointKey {
                projection: tracker_projections::ProjectionKind::Institutions,
                partition: *p,
            }
            .to_string()
        })
        .collect();
    assert_eq!(keys.len(), 2);
}
