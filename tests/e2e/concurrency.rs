//! Many deliveries at once, duplicates racing each other.

use std::collections::{HashMap, HashSet};

use futures::future::join_all;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_duplicates_give_one_event_each_and_no_gaps() {
    let app = TestApp::spawn().await;
    // 150 distinct completions, each sent 4 times, all at once, in shuffled order.
    let mut bodies = Vec::new();
    for i in 0..150u64 {
        let body = completion(
            1 + i % 7,
            1000 + i % 40,
            50 + i,
            &format!("2024-05-{:02} 10:00:00", 1 + i % 28),
        );
        for _ in 0..4 {
            bodies.push((i, body.clone()));
        }
    }
    // A fixed interleaving that puts copies far apart.
    bodies.sort_by_key(|(i, b)| (b.len() * 31 + *i as usize * 17) % 101);

    let answers = join_all(bodies.iter().map(|(i, body)| {
        let app = &app;
        async move { (*i, app.post(TOKEN, body).await) }
    }))
    .await;

    let mut by_completion: HashMap<u64, HashSet<(String, u64)>> = HashMap::new();
    let mut fresh = 0;
    for (i, (status, body)) in &answers {
        assert_eq!(*status, 200, "{body}");
        if body["duplicate"] == false {
            fresh += 1;
        }
        by_completion.entry(*i).or_default().insert((
            body["event_id"].as_str().unwrap().to_owned(),
            body["position"].as_u64().unwrap(),
        ));
    }
    assert_eq!(fresh, 150, "exactly one answer per completion appended it");
    // Every copy of a completion got the same id and position.
    assert!(by_completion.values().all(|answers| answers.len() == 1));

    let events = app.events().await;
    assert_eq!(events.len(), 150);
    let positions: Vec<u64> = events.iter().map(|e| e.position).collect();
    assert_eq!(positions, (1..=150).collect::<Vec<_>>(), "gap-free");
    let ids: HashSet<_> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 150);
    app.stop().await;
}
