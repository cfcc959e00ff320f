//! The binary, killed and stopped: nothing acknowledged is lost.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;
use serde_json::Value;

use crate::support::*;

fn config(token: &str) -> String {
    format!(
        r#"
        [[sources]]
        id = "toolzz"
        token = "{token}"
        institutions = ["*"]
        "#
    )
}

async fn post(client: &reqwest::Client, url: &str, body: String) -> Option<Value> {
    let res = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .ok()?;
    if res.status().as_u16() != 200 {
        return None;
    }
    res.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_right_after_acks_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let toml = config(TOKEN);
    let tracker = ChildTracker::start(&data, Some(&toml));
    let client = reqwest::Client::new();
    let url = tracker.webhook(TOKEN);

    let bodies: Vec<String> = (0..300u64)
        .map(|i| completion(1 + i % 5, 10 + i, 7, "2024-06-01 12:00:00"))
        .collect();
    let acked: Vec<Value> = join_all(bodies.iter().cloned().map(|b| post(&client, &url, b)))
        .await
        .into_iter()
        .map(|a| a.expect("every delivery acknowledged"))
        .collect();
    // Killed the instant the last answer arrived: no chance to flush anything.
    tracker.sigkill();

    let tracker = ChildTracker::start(&data, Some(&toml));
    // Delivered again after the restart: recognised, same answers.
    for (body, first) in bodies.iter().zip(&acked).take(20) {
        let again = post(&client, &tracker.webhook(TOKEN), body.clone())
            .await
            .unwrap();
        assert_eq!(again["event_id"], first["event_id"]);
        assert_eq!(again["position"], first["position"]);
        assert_eq!(again["duplicate"], true);
    }
    tracker.sigkill();

    let events = events_on_disk(&data).await;
    assert_eq!(events.len(), acked.len());
    let by_id: HashMap<String, u64> = events
        .iter()
        .map(|e| (e.id.to_string(), e.position))
        .collect();
    for a in &acked {
        assert_eq!(
            by_id.get(a["event_id"].as_str().unwrap()),
            a["position"].as_u64().as_ref()
        );
    }
}

/// A request whose body is still arriving when SIGTERM comes is received
/// to its end, answered 200, and its event is on disk after the exit. A
/// first request on the same keep-alive connection makes sure the tracker
/// has accepted it before the signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_a_request_in_flight() {
    use tokio::io::AsyncWriteExt;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let toml = config(TOKEN);
    let mut tracker = ChildTracker::start(&data, Some(&toml));
    let head = |len: usize, close: bool| {
        format!(
            "POST /webhooks/toolzz/{TOKEN} HTTP/1.1\r\nhost: {}\r\n\
             content-type: application/json\r\ncontent-length: {len}\r\n{}\r\n",
            tracker.addr,
            if close { "connection: close\r\n" } else { "" }
        )
    };
    let mut conn = tokio::net::TcpStream::connect(tracker.addr).await.unwrap();
    let first = completion(3, 76, 9, "2024-07-01 08:00:00");
    conn.write_all(head(first.len(), false).as_bytes())
        .await
        .unwrap();
    conn.write_all(first.as_bytes()).await.unwrap();
    let (status, _) = read_answer(&mut conn).await;
    assert_eq!(status, 200);

    let body = completion(3, 77, 9, "2024-07-01 08:00:00");
    let (part, rest) = body.as_bytes().split_at(body.len() / 2);
    conn.write_all(head(body.len(), true).as_bytes())
        .await
        .unwrap();
    conn.write_all(part).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tracker.sigterm();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tracker.child.try_wait().unwrap().is_none(),
        "the tracker exited with a request in flight"
    );
    conn.write_all(rest).await.unwrap();
    let (status, answer) = read_answer(&mut conn).await;
    assert_eq!(status, 200, "{answer}");

    let exit = tokio::task::spawn_blocking(move || tracker.child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "graceful exit, got {exit:?}");
    let events = events_on_disk(&data).await;
    assert_eq!(events.len(), 2);
    assert_eq!(answer["event_id"], events[1].id.to_string());
}

/// Webhooks arriving in a burst while SIGTERM comes: some are answered,
/// the rest refused, and every answered one is on disk after the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_keeps_every_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let toml = config(TOKEN);
    let mut tracker = ChildTracker::start(&data, Some(&toml));
    let client = reqwest::Client::new();
    let url = tracker.webhook(TOKEN);

    let sending = tokio::spawn({
        let client = client.clone();
        async move {
            let mut tasks = Vec::new();
            for i in 0..400u64 {
                let body = completion(3, 500 + i, 9, "2024-07-01 08:00:00");
                tasks.push(tokio::spawn(post_owned(client.clone(), url.clone(), body)));
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            join_all(tasks).await
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    tracker.sigterm();
    let answers = sending.await.unwrap();
    let status = tokio::task::spawn_blocking(move || tracker.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "graceful exit, got {status:?}");

    let acked: Vec<Value> = answers
        .into_iter()
        .filter_map(|a| a.ok().flatten())
        .collect();
    assert!(!acked.is_empty());
    let events = events_on_disk(&data).await;
    let ids: std::collections::HashSet<String> = events.iter().map(|e| e.id.to_string()).collect();
    for a in &acked {
        assert!(
            ids.contains(a["event_id"].as_str().unwrap()),
            "acknowledged event lost"
        );
    }
}

async fn post_owned(client: reqwest::Client, url: String, body: String) -> Option<Value> {
    post(&client, &url, body).await
}

/// With no configuration at all, `serve` creates a development source and
/// prints its URL once; the URL works and survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_no_config_prints_a_working_dev_url() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tracker = ChildTracker::start(&data, None);
    let url_line = tracker
        .stdout_lines
        .iter()
        .find_map(|l| l.strip_prefix("Webhook URL: "))
        .expect("the webhook URL is printed")
        .to_owned();
    assert!(url_line.starts_with(&format!("http://{}/webhooks/toolzz/", tracker.addr)));
    let client = reqwest::Client::new();
    let first = post(&client, &url_line, DOCUMENTED.to_owned())
        .await
        .expect("dev URL accepts");
    assert_eq!(first["position"], 1);
    tracker.sigkill();

    let tracker = ChildTracker::start(&data, None);
    let token = url_line.rsplit('/').next().unwrap();
    let again = post(&client, &tracker.webhook(token), DOCUMENTED.to_owned())
        .await
        .expect("same token after restart");
    assert_eq!(again["duplicate"], true);
}
