//! The receiver's answers, and what ends up in the event store and the
//! delivery log.

use serde_json::{Value, json};
use tracker_store::delivery_log::DeliveryFilter;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_dedups_and_keeps_other_slugs() {
    let app = TestApp::spawn().await;

    let (status, first) = app.post(TOKEN, DOCUMENTED).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["position"], 1);
    assert_eq!(first["duplicate"], false);
    let event_id = first["event_id"].as_str().unwrap().to_owned();

    // Delivered again, even with a new send_at: same id and position, nothing appended.
    let resent = DOCUMENTED.replace(
        "\"send_at\": \"2022-03-10 18:56:47\"",
        "\"send_at\": \"2022-03-12 07:00:00\"",
    );
    assert_ne!(resent, DOCUMENTED);
    let (status, again) = app.post(TOKEN, &resent).await;
    assert_eq!(status, 200);
    assert_eq!(
        again,
        json!({"event_id": event_id, "position": 1, "duplicate": true})
    );

    // Same learner, same trail, another finish time: a new completion.
    let recompleted = DOCUMENTED.replace(
        "\"finished_at\": \"2022-03-10 18:56:47\"",
        "\"finished_at\": \"2022-09-01 10:00:00\"",
    );
    let (status, re) = app.post(TOKEN, &recompleted).await;
    assert_eq!(status, 200);
    assert_eq!(re["position"], 2);
    assert_eq!(re["duplicate"], false);
    assert_ne!(re["event_id"], first["event_id"]);

    let (status, other) = app.post(TOKEN, OTHER_SLUG).await;
    assert_eq!(status, 200, "{other}");
    assert_eq!(other["position"], 3);

    let (status, multi) = app.post(TOKEN, MULTI).await;
    assert_eq!(status, 200, "{multi}");
    assert_eq!(multi["position"], 4);

    // Another slug is never refused for its data: one naming no institution
    // (from a source for every institution), with a string user id, is kept.
    let unscoped = r#"{"event":{"slug":"members.created"},"data":{"user":{"id":"77"}}}"#;
    let (status, kept) = app.post(TOKEN, unscoped).await;
    assert_eq!(status, 200, "{kept}");
    assert_eq!(kept["position"], 5);

    let events = app.events().await;
    let summary: Vec<(u64, &str, &str)> = events
        .iter()
        .map(|e| (e.position, e.event_type.as_str(), e.stream.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (1, "TrailCompleted", "learner-12345-123456798"),
            (2, "TrailCompleted", "learner-12345-123456798"),
            (3, "activities.course.completed", "learner-4401-90017"),
            (4, "TrailCompleted", "learner-4401-90017"),
            (5, "members.created", "no-institution-members.created-77"),
        ]
    );
    assert_eq!(events[0].id.to_string(), event_id);
    assert_eq!((events[0].revision, events[1].revision), (0, 1));
    assert_eq!(events[0].metadata.source_id, "all");

    // The recorded data keeps the typed fact and the delivery as received.
    let data: Value = serde_json::from_str(&events[0].data).unwrap();
    assert_eq!(
        data["finished_at"],
        json!({"raw": "2022-03-10 18:56:47", "utc": "2022-03-10T21:56:47Z"})
    );
    assert_eq!(data["source_timezone"], "America/Sao_Paulo");
    assert!(
        events[0].data.contains(DOCUMENTED.trim()),
        "delivery kept verbatim"
    );
    let other_data: Value = serde_json::from_str(&events[2].data).unwrap();
    assert_eq!(
        other_data["delivery"]["data"]["course"]["title"],
        "Estatística Básica"
    );
    let multi_data: Value = serde_json::from_str(&events[3].data).unwrap();
    assert_eq!(multi_data["user"]["name"], "João Conceição da Silva");
    assert_eq!(multi_data["trail"]["courses"].as_array().unwrap().len(), 3);

    app.stop().await;
}

/// Another slug's institution written as a string is still the source's
/// to vouch for: a limited source may post its own, not another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_source_is_held_to_its_institutions_however_ids_are_written() {
    let app = TestApp::spawn().await;
    let body = |institution: &str| {
        format!(
            r#"{{"event":{{"slug":"shop.product.redemption"}},"data":{{"institution":{{"id":{institution}}},"user":{{"id":"5"}}}}}}"#
        )
    };
    let (status, own) = app.post(LIMITED_TOKEN, &body(r#""12345""#)).await;
    assert_eq!(status, 200, "{own}");
    for other in [r#""999""#, "999", r#""abc""#, "0"] {
        let (status, refused) = app.post(LIMITED_TOKEN, &body(other)).await;
        assert_eq!(status, 403, "{other}: {refused}");
        assert_eq!(refused["error"]["code"], "forbidden_institution", "{other}");
    }
    let events = app.events().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].stream, "learner-12345-5");
    app.stop().await;
}

/// The documented example with one piece of text replaced (which must be there).
fn documented_without(from: &str, to: &str) -> String {
    assert!(DOCUMENTED.contains(from), "{from:?} is not in the fixture");
    DOCUMENTED.replace(from, to)
}

/// (token, body, content type, status, code, field)
type Refusal = (
    &'static str,
    String,
    Option<&'static str>,
    u16,
    &'static str,
    Option<&'static str>,
);

/// Each refusal: its status, its code, the field it names, and nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_typed_and_store_nothing() {
    let app = TestApp::spawn().await;
    let client = &app.client;

    let cases: Vec<Refusal> = vec![
        // (token, body, content type, status, code, field)
        (
            "not-a-real-token-at-all",
            DOCUMENTED.into(),
            Some("application/json"),
            401,
            "unknown_token",
            None,
        ),
        (
            LIMITED_TOKEN,
            MULTI.into(),
            Some("application/json"),
            403,
            "forbidden_institution",
            Some("data.institution.id"),
        ),
        (
            TOKEN,
            documented_without("\"id\": 12345 }", "\"id\": 12345, }"),
            Some("application/json"),
            400,
            "invalid_json",
            None,
        ),
        (
            TOKEN,
            "not json".into(),
            Some("application/json"),
            400,
            "invalid_json",
            None,
        ),
        (
            TOKEN,
            documented_without(
                "2022-03-10 18:56:47\", \"courses",
                "2022-02-30 18:56:47\", \"courses",
            ),
            Some("application/json"),
            422,
            "invalid_timestamp",
            Some("data.trail.finished_at"),
        ),
        (
            TOKEN,
            documented_without(
                "2022-03-10 18:56:47\", \"courses",
                "9999-12-31 23:59:59\", \"courses",
            ),
            Some("application/json"),
            422,
            "invalid_timestamp",
            Some("data.trail.finished_at"),
        ),
        (
            TOKEN,
            documented_without("\"id\": 12345 }", "\"id\": 12345, \"id\": 999 }"),
            Some("application/json"),
            400,
            "invalid_json",
            None,
        ),
        (
            TOKEN,
            documented_without("\"id\": 123456798", "\"id\": -4"),
            Some("application/json"),
            422,
            "invalid_id",
            Some("data.user.id"),
        ),
        (
            TOKEN,
            documented_without(", \"email\": \"student@toolzz.com\"", ""),
            Some("application/json"),
            422,
            "missing_field",
            Some("data.user.email"),
        ),
        (
            LIMITED_TOKEN,
            r#"{"event":{"slug":"members.created"},"data":{"user":{"id":1}}}"#.into(),
            Some("application/json"),
            403,
            "forbidden_institution",
            Some("data.institution.id"),
        ),
        (
            TOKEN,
            r#"{"event":{"slug":"TrailCompleted"},"data":{"institution":{"id":1}}}"#.into(),
            Some("application/json"),
            422,
            "invalid_slug",
            Some("event.slug"),
        ),
        (
            TOKEN,
            DOCUMENTED.into(),
            Some("text/plain"),
            415,
            "unsupported_media_type",
            None,
        ),
        (
            TOKEN,
            DOCUMENTED.into(),
            Some("application/x-www-form-urlencoded"),
            415,
            "unsupported_media_type",
            None,
        ),
        (
            TOKEN,
            format!("{{\"pad\":\"{}\"}}", "x".repeat(70 * 1024)),
            Some("application/json"),
            413,
            "payload_too_large",
            None,
        ),
        (
            SIGNED_TOKEN,
            DOCUMENTED.into(),
            Some("application/json"),
            401,
            "invalid_signature",
            None,
        ),
    ];
    for (token, body, content_type, status, code, field) in &cases {
        let mut req = client.post(app.webhook(token)).body(body.clone());
        if let Some(ct) = content_type {
            req = req.header("content-type", *ct);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status().as_u16(), *status, "{code}");
        let got: Value = res.json().await.unwrap();
        assert_eq!(got["error"]["code"], *code, "{got}");
        assert!(
            got["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        match field {
            Some(f) => assert_eq!(got["error"]["field"], *f, "{code}"),
            None => assert!(got["error"].get("field").is_none(), "{got}"),
        }
    }

    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let res = client
            .request(method.clone(), app.webhook(TOKEN))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 405, "{method}");
        assert_eq!(res.headers()["allow"], "POST");
    }

    // Nothing of any refused call reached the event store.
    assert!(app.events().await.is_empty());

    // And the limited source may post for its own institution.
    let (status, _) = app.post(LIMITED_TOKEN, DOCUMENTED).await;
    assert_eq!(status, 200);
    assert_eq!(app.events().await.len(), 1);

    // Every call is in the delivery log, with its answer; the token is not.
    let log = &app.running().state().deliveries;
    log.flush().await.unwrap();
    let rows = log
        .list(DeliveryFilter {
            limit: Some(1000),
            ..DeliveryFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), cases.len() + 3 + 1);
    let mut statuses: Vec<u16> = rows.iter().map(|r| r.record.status).collect();
    statuses.sort_unstable();
    let mut expected: Vec<u16> = cases
        .iter()
        .map(|c| c.3)
        .chain([405, 405, 405, 200])
        .collect();
    expected.sort_unstable();
    assert_eq!(statuses, expected);
    let too_large = rows.iter().find(|r| r.record.status == 413).unwrap();
    assert!(too_large.record.body_truncated);
    assert!(too_large.record.body.len() <= 64 * 1024);
    let forbidden = rows
        .iter()
        .find(|r| r.record.status == 403 && r.record.body == MULTI.as_bytes())
        .unwrap();
    assert_eq!(forbidden.record.source_id.as_deref(), Some("limited"));
    let unknown = rows
        .iter()
        .find(|r| r.record.status == 401 && r.record.source_id.is_none())
        .unwrap();
    assert_eq!(unknown.record.reason.as_deref(), Some("unknown_token"));
    assert_eq!(unknown.record.remote_addr.as_deref(), Some("127.0.0.1"));
    for r in &rows {
        let text = format!("{:?}", r.record);
        assert!(!text.contains(TOKEN) && !text.contains(LIMITED_TOKEN));
    }

    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_deliveries_are_verified() {
    use tracker::signature::SigningKey;
    let app = TestApp::spawn().await;
    let key = SigningKey::parse(SIGNING_SECRET).unwrap();
    let now = chrono::Utc::now().timestamp();
    let send = |ts: i64, sig: String| {
        app.client
            .post(app.webhook(SIGNED_TOKEN))
            .header("content-type", "application/json")
            .header("webhook-id", "msg_1")
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .body(DOCUMENTED)
            .send()
    };
    // Rotation: an old key's signature beside the current one.
    let good = format!(
        "v1,bm90IHRoZSByaWdodCBvbmU= {}",
        key.sign("msg_1", now, DOCUMENTED.as_bytes())
    );
    assert_eq!(send(now, good).await.unwrap().status().as_u16(), 200);
    let stale = key.sign("msg_1", now - 600, DOCUMENTED.as_bytes());
    let res = send(now - 600, stale).await.unwrap();
    assert_eq!(res.status().as_u16(), 401);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("five minutes")
    );
    let tampered = key.sign("msg_1", now, b"{}");
    assert_eq!(send(now, tampered).await.unwrap().status().as_u16(), 401);
    assert_eq!(app.events().await.len(), 1);
    app.stop().await;
}

/// A compressed body is refused by name before it is read; `identity` is
/// no compression.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bodies_are_refused_by_name() {
    let app = TestApp::spawn().await;
    let post = |encoding: &'static str| {
        app.client
            .post(app.webhook(TOKEN))
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(DOCUMENTED)
            .send()
    };
    for encoding in ["gzip", "identity, br"] {
        let res = post(encoding).await.unwrap();
        assert_eq!(res.status().as_u16(), 415, "{encoding}");
        let got: Value = res.json().await.unwrap();
        assert_eq!(
            got["error"]["code"], "unsupported_content_encoding",
            "{got}"
        );
        let message = got["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("uncompressed"), "{message}");
    }
    assert!(app.events().await.is_empty());
    assert_eq!(post("identity").await.unwrap().status().as_u16(), 200);
    assert_eq!(app.events().await.len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_timezone_is_configurable() {
    let app = TestApp::spawn_with(|c| c.source_timezone = "Europe/Lisbon".into()).await;
    assert_eq!(app.post(TOKEN, DOCUMENTED).await.0, 200);
    let events = app.events().await;
    let data: Value = serde_json::from_str(&events[0].data).unwrap();
    assert_eq!(data["finished_at"]["utc"], "2022-03-10T18:56:47Z");
    assert_eq!(data["source_timezone"], "Europe/Lisbon");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_that_cannot_write_answers_503_and_keeps_nothing() {
    let app = TestApp::spawn().await;
    assert_eq!(app.post(TOKEN, DOCUMENTED).await.0, 200);
    app.running().close_event_store().await.unwrap();
    let (status, body) = app.post(TOKEN, MULTI).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let dir = app.stop().await;
    let events = events_on_disk(dir.path()).await;
    assert_eq!(events.len(), 1);
}

/// A body that trickles in (here: a tenth of it, then nothing) is answered
/// 408 once `body_timeout_secs` has passed, not held for good, and the
/// call is in the delivery log with what had arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_is_answered_408() {
    use tokio::io::AsyncWriteExt as _;

    let app = TestApp::spawn_with(|c| c.body_timeout_secs = 1).await;
    let addr = app.running().local_addr;
    let body = completion(3, 76, 9, "2024-07-01 08:00:00");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /webhooks/toolzz/{TOKEN} HTTP/1.1\r\nhost: {addr}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body.as_bytes()[..body.len() / 10])
        .await
        .unwrap();
    let (status, answer) =
        tokio::time::timeout(std::time::Duration::from_secs(20), read_answer(&mut conn))
            .await
            .expect("an answer, not a connection held open");
    assert_eq!(status, 408, "{answer}");
    assert_eq!(answer["error"]["code"], "body_timeout");
    assert!(app.events().await.is_empty());
    let log = &app.running().state().deliveries;
    log.flush().await.unwrap();
    let logged = log.list(DeliveryFilter::default()).await.unwrap();
    assert_eq!(logged.len(), 1);
    let call = &logged[0].record;
    assert_eq!(
        (call.status, call.reason.as_deref()),
        (408, Some("body_timeout"))
    );
    assert_eq!(call.body, &body.as_bytes()[..body.len() / 10]);
    assert!(call.body_truncated);
}
