//! Projection workers as a user runs them: inside `serve`, as separate
//! `tracker project` processes (killed at random), and `tracker replay`.

use std::time::{Duration, Instant};

use tracker_projections::ReadStore as _;
use tracker_projections::readstore::Snapshot;
use tracker_projections::sqlite::SqliteReadStore;

use crate::support::*;

fn table<'a>(s: &'a Snapshot, name: &str) -> &'a Vec<Vec<String>> {
    &s.tables.iter().find(|(n, _)| n == name).unwrap().1
}

fn total_completions(s: &Snapshot) -> u64 {
    table(s, "inst_summary")
        .iter()
        .map(|r| r[1].parse::<u64>().unwrap())
        .sum()
}

async fn wait_for_checkpoints(read: &SqliteReadStore, position: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        read.follow_current().await.unwrap();
        let cps = read.checkpoints().await.unwrap();
        if cps.len() >= 2 && cps.iter().all(|(_, p)| *p >= position) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "projections stuck at {cps:?}, want {position}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_shows_up_in_the_read_models_of_a_running_serve() {
    let app = TestApp::spawn().await;
    let (status, body) = app.post(TOKEN, MULTI).await;
    assert_eq!(status, 200);
    let position = body["position"].as_u64().unwrap();
    let read = &app.running().state().read;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cps = read.checkpoints().await.unwrap();
        if cps.len() == 2 && cps.iter().all(|(_, p)| *p >= position) {
            break;
        }
        assert!(Instant::now() < deadline, "not projected: {cps:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let s = read.snapshot().await.unwrap();
    assert_eq!(
        table(&s, "inst_summary")[0][..5],
        ["4401", "1", "1", "1", "3"]
    );
    assert_eq!(table(&s, "lrn_learners")[0][2], "João Conceição da Silva");
    app.stop().await;
}

fn many_bodies(n: u64) -> Vec<String> {
    (0..n)
        .map(|i| {
            completion(
                1 + i % 13,
                1 + (i * 7) % 401,
                1 + i % 9,
                &format!(
                    "2024-{:02}-{:02} {:02}:{:02}:00",
                    1 + i % 12,
                    1 + i % 28,
                    i % 24,
                    i % 60
                ),
            )
        })
        .collect()
}

/// A cheap, seedable pseudo-random sequence (no need for a crate here).
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// The two projections' checkpoints, lower first (0 for one without any).
async fn checkpoints(read: &SqliteReadStore) -> (u64, u64) {
    read.follow_current().await.unwrap();
    let cps = read.checkpoints().await.unwrap();
    let get = |kind: &str| cps.iter().find(|(k, _)| k == kind).map_or(0, |(_, p)| *p);
    let (a, b) = (get("institutions"), get("learners"));
    (a.min(b), a.max(b))
}

/// Projectors killed (SIGKILL) while catching up, at random points of their
/// progress, then a last one run to the end: the read models equal a fresh
/// replay. Small batches and a short lease make many commits to land
/// between and let each round's projector take over from the killed one.
/// `TRACKER_TEST_KILL_SEED` replays a printed schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_killed_at_random_points_ends_equal_to_a_fresh_replay() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let head = seed_events(&data, many_bodies(4000)).await;
    assert_eq!(head, 4000);
    let project = |batch: &str| {
        let mut cmd = tracker_command(&["project"], &data);
        cmd.env("TRACKER_PROJECTOR_BATCH_SIZE", batch)
            .env("TRACKER_PROJECTOR_LEASE_TTL_SECS", "1");
        cmd
    };
    let read = SqliteReadStore::open(data.join("readmodels")).unwrap();

    let seed = std::env::var("TRACKER_TEST_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1;
    eprintln!("kill schedule seed (TRACKER_TEST_KILL_SEED): {seed}");
    let mut rng = seed;
    let mut killed_at = Vec::new();
    for round in 0..5 {
        // Sometimes two projectors at once: the lease keeps one waiting.
        let count = if round % 2 == 0 { 2 } else { 1 };
        let mut children: Vec<_> = (0..count)
            .map(|_| {
                project("25")
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        // Kill once either projection has gone 1 to 400 events further.
        let target = checkpoints(&read).await.1 + 1 + next_random(&mut rng) % 400;
        let deadline = Instant::now() + Duration::from_secs(30);
        while checkpoints(&read).await.1 < target {
            assert!(Instant::now() < deadline, "no progress towards {target}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for child in &mut children {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        killed_at.push(checkpoints(&read).await);
    }
    eprintln!("checkpoints at each kill: {killed_at:?}");
    assert!(
        killed_at.iter().all(|&(_, fastest)| fastest < head),
        "a round caught up before its kill: {killed_at:?}"
    );

    let mut last = project("20000")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Running (signal handler in place) before it may be asked to stop.
    let mut line = String::new();
    let stdout = last.stdout.take().unwrap();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    assert!(line.starts_with("projector running"), "{line:?}");
    wait_for_checkpoints(&read, head).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(last.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || last.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");

    let survived = read.snapshot().await.unwrap();
    assert_eq!(total_completions(&survived), 4000);
    assert_eq!(table(&survived, "lrn_completions").len(), 4000);

    // `tracker replay` builds a fresh generation from position 0 and switches to it.
    let out = tracker_command(&["replay"], &data).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("is now current"));
    let before = read.generation();
    read.follow_current().await.unwrap();
    assert_ne!(read.generation(), before);
    assert!(
        read.snapshot().await.unwrap() == survived,
        "read models after kills differ from a fresh replay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_projector_and_a_separate_project_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let toml = format!("[[sources]]\nid = \"t\"\ntoken = \"{TOKEN}\"\ninstitutions = [\"*\"]\n");
    let serve = ChildTracker::start_with(&data, Some(&toml), &["--no-projector"]);
    let client = reqwest::Client::new();
    let post = |body: String| {
        client
            .post(serve.webhook(TOKEN))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(
        post(DOCUMENTED.to_owned()).await.unwrap().status().as_u16(),
        200
    );
    let read = SqliteReadStore::open(data.join("readmodels")).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        read.checkpoints().await.unwrap().is_empty(),
        "serve --no-projector projected"
    );

    let mut project = tracker_command(&["project"], &data)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_checkpoints(&read, 1).await;
    assert_eq!(post(MULTI.to_owned()).await.unwrap().status().as_u16(), 200);
    wait_for_checkpoints(&read, 2).await;
    let s = read.snapshot().await.unwrap();
    assert_eq!(total_completions(&s), 2);

    // serve reports the projector's progress, wherever it runs.
    let ready: serde_json::Value = client
        .get(format!("http://{}/readyz", serve.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let lags: Vec<u64> = ready["projections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["lag"].as_u64().unwrap())
        .collect();
    assert_eq!(lags, [0, 0], "{ready}");
    project.kill().unwrap();
    project.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_stop_mode_halts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    seed_three_the_second_undecodable(&data).await;

    let out = tracker_command(&["project", "--on-error", "stop"], &data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stopped at position 2"), "{stderr}");

    let mut project = tracker_command(&["project"], &data)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let read = SqliteReadStore::open(data.join("readmodels")).unwrap();
    wait_for_checkpoints(&read, 3).await;
    project.kill().unwrap();
    project.wait().unwrap();

    // Where each projection stands, without a server.
    let out = tracker_command(&["status"], &data).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let statuses: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            serde_json::json!({"projection": "institutions", "checkpoint": 3, "lag": 0}),
            serde_json::json!({"projection": "learners", "checkpoint": 3, "lag": 0}),
        ]
    );

    let out = tracker_command(&["dead-letters"], &data).output().unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "one per projection: {lines:?}");
    assert!(
        lines
            .iter()
            .all(|l| l["position"] == 2 && l["event_type"] == "TrailCompleted")
    );

    // A rebuild under on_error = stop stops before the same event, and the
    // current read models stay current; without it, it dead-letters it.
    let current = || {
        SqliteReadStore::open(data.join("readmodels"))
            .unwrap()
            .generation()
    };
    let before = current();
    let out = tracker_command(&["replay"], &data)
        .env("TRACKER_PROJECTOR_ON_ERROR", "stop")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the rebuild stopped at position 2"),
        "{stderr}"
    );
    assert_eq!(current(), before);
    let out = tracker_command(&["replay"], &data).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(current(), before);
}

/// The commands that only read the data directory refuse one that holds
/// no stores (a wrong --data-dir), naming the file they looked for, and
/// create nothing there; `status` used to print every projection caught up
/// at 0 and leave empty stores behind.
#[test]
fn read_only_commands_refuse_a_data_directory_without_stores() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("not-the-data-dir");
    std::fs::create_dir(&data).unwrap();
    for (args, missing) in [
        (&["status"][..], "events.sqlite"),
        (&["replay"][..], "events.sqlite"),
        (&["dead-letters"][..], "readmodels"),
        (&["deliveries"][..], "deliveries.sqlite"),
    ] {
        let out = tracker_command(args, &data).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
        assert!(
            stderr.contains(&format!("{missing} does not exist")),
            "{args:?}: {stderr}"
        );
        assert_eq!(
            std::fs::read_dir(&data).unwrap().count(),
            0,
            "{args:?} created files"
        );
    }
}
