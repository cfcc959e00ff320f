//! The query API against a known event set, with every expected number
//! counted by hand; tenancy; parameters; read-your-writes.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tracker::server::StartOptions;

use crate::support::*;

/// A trail completion with the given courses.
pub fn trail_done(
    institution: u64,
    user: u64,
    trail: u64,
    finished_at: &str,
    courses: &[(u64, &str)],
) -> String {
    let courses: Vec<Value> = courses
        .iter()
        .map(|(id, title)| json!({"id": id, "title": title}))
        .collect();
    json!({
        "event": {"name": "Atividades - Trilha concluída", "slug": "activities.trail.completed", "send_at": finished_at},
        "data": {
            "institution": {"id": institution},
            "user": {"id": user, "name": format!("Learner {user}"), "email": format!("l{user}@example.edu.br")},
            "trail": {"id": trail, "name": format!("Trail {trail}"), "finished_at": finished_at, "courses": courses}
        }
    })
    .to_string()
}

const INTRO: (u64, &str) = (101, "Intro");
const BASICS: (u64, &str) = (102, "Basics");
const ADVANCED: (u64, &str) = (201, "Advanced");

/// The known history (São Paulo is UTC-3):
/// 1. inst 100, learner 1, trail 10 (Intro, Basics), 2024-01-01 09:00 = 12:00Z
/// 2. inst 100, learner 2, trail 10 (Intro, Basics), 2024-01-01 22:30 = 01-02 01:30Z
/// 3. inst 100, learner 1, trail 20 (Basics, Advanced), 2024-01-01 10:00 = 13:00Z
/// 4. inst 100, learner 1, trail 10 again, 2024-02-10 08:00 = 11:00Z
/// 5. inst 10, learner 9, trail 10 (Intro), 2024-01-05 12:00 = 15:00Z
/// 6. inst 100, learner 2, a course completion (another slug: log only)
pub async fn known_app() -> TestApp {
    let app = TestApp::spawn_with(|c| c.api_keys = api_keys()).await;
    let bodies = [
        trail_done(100, 1, 10, "2024-01-01 09:00:00", &[INTRO, BASICS]),
        trail_done(100, 2, 10, "2024-01-01 22:30:00", &[INTRO, BASICS]),
        trail_done(100, 1, 20, "2024-01-01 10:00:00", &[BASICS, ADVANCED]),
        trail_done(100, 1, 10, "2024-02-10 08:00:00", &[INTRO, BASICS]),
        trail_done(10, 9, 10, "2024-01-05 12:00:00", &[INTRO]),
        json!({
            "event": {"name": "Atividades - Curso concluído", "slug": "activities.course.completed", "send_at": "2024-01-06 09:00:00"},
            "data": {"institution": {"id": 100}, "user": {"id": 2}, "course": {"id": 101, "title": "Intro"}}
        })
        .to_string(),
    ];
    for (i, body) in bodies.iter().enumerate() {
        let (status, answer) = app.post(TOKEN, body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["position"], i as u64 + 1);
    }
    // Both projections past the last event.
    for path in [
        "/v1/institutions/100/summary?min_position=6&wait_ms=5000",
        "/v1/institutions/100/learners?min_position=6&wait_ms=5000",
    ] {
        let (status, at, body) = app.api_json(path, OPERATOR_KEY).await;
        assert_eq!(status, 200, "{body}");
        assert!(at.unwrap() >= 6);
    }
    app
}

async fn get_ok(app: &TestApp, path: &str) -> Value {
    let (status, at, body) = app.api_json(path, KEY_100).await;
    assert_eq!(status, 200, "{path}: {body}");
    assert_eq!(at, Some(6), "{path}: X-Consistent-Through");
    body
}

fn ids(body: &Value, field: &str) -> Vec<u64> {
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i[field].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_the_hand_counted_numbers() {
    let app = known_app().await;

    assert_eq!(
        get_ok(&app, "/v1/institutions/100/summary").await,
        json!({
            "institution_id": 100, "completions": 4, "learners": 2, "trails": 2, "courses": 3,
            "first_completed_at": "2024-01-01T12:00:00Z", "last_completed_at": "2024-02-10T11:00:00Z",
            "last_position": 4
        })
    );

    let trail_10 = json!({"trail_id": 10, "name": "Trail 10", "completions": 3, "learners": 2,
        "first_completed_at": "2024-01-01T12:00:00Z", "last_completed_at": "2024-02-10T11:00:00Z"});
    let trail_20 = json!({"trail_id": 20, "name": "Trail 20", "completions": 1, "learners": 1,
        "first_completed_at": "2024-01-01T13:00:00Z", "last_completed_at": "2024-01-01T13:00:00Z"});
    assert_eq!(
        get_ok(&app, "/v1/institutions/100/trails").await,
        json!({"items": [trail_10, trail_20], "next_cursor": null})
    );
    assert_eq!(
        get_ok(&app, "/v1/institutions/100/trails/10").await,
        json!({"trail": trail_10, "courses": [
            {"course_id": 101, "title": "Intro"}, {"course_id": 102, "title": "Basics"}]})
    );
    assert_eq!(
        get_ok(&app, "/v1/institutions/100/trails/10/learners").await,
        json!({"items": [
            {"user_id": 1, "name": "Learner 1", "email": "l1@example.edu.br", "completions": 2,
             "first_completed_at": "2024-01-01T12:00:00Z", "last_completed_at": "2024-02-10T11:00:00Z"},
            {"user_id": 2, "name": "Learner 2", "email": "l2@example.edu.br", "completions": 1,
             "first_completed_at": "2024-01-02T01:30:00Z", "last_completed_at": "2024-01-02T01:30:00Z"}
        ], "next_cursor": null})
    );

    assert_eq!(
        get_ok(&app, "/v1/institutions/100/courses").await,
        json!({"items": [
            {"course_id": 101, "title": "Intro", "completions": 3, "learners": 2},
            {"course_id": 102, "title": "Basics", "completions": 4, "learners": 2},
            {"course_id": 201, "title": "Advanced", "completions": 1, "learners": 1}
        ], "next_cursor": null})
    );
    let by_completions = get_ok(&app, "/v1/institutions/100/courses?sort=completions").await;
    assert_eq!(ids(&by_completions, "course_id"), [102, 101, 201]);
    let by_title = get_ok(&app, "/v1/institutions/100/courses?sort=title").await;
    assert_eq!(ids(&by_title, "course_id"), [201, 102, 101]);

    let learner_1 = json!({"user_id": 1, "name": "Learner 1", "email": "l1@example.edu.br",
        "trails": 2, "completions": 3,
        "first_completed_at": "2024-01-01T12:00:00Z", "last_completed_at": "2024-02-10T11:00:00Z"});
    let learners = get_ok(&app, "/v1/institutions/100/learners").await;
    assert_eq!(learners["items"][0], learner_1);
    assert_eq!(ids(&learners, "user_id"), [1, 2]);
    assert_eq!(learners["items"][1]["completions"], 1);
    assert_eq!(learners["items"][1]["trails"], 1);
    let by_completions = get_ok(&app, "/v1/institutions/100/learners?sort=completions").await;
    assert_eq!(ids(&by_completions, "user_id"), [1, 2]);

    let detail = get_ok(&app, "/v1/institutions/100/learners/1").await;
    assert_eq!(detail["learner"], learner_1);
    assert_eq!(
        detail["trails"],
        json!([
            {"trail_id": 10, "completions": 2, "first_completed_at": "2024-01-01T12:00:00Z", "last_completed_at": "2024-02-10T11:00:00Z"},
            {"trail_id": 20, "completions": 1, "first_completed_at": "2024-01-01T13:00:00Z", "last_completed_at": "2024-01-01T13:00:00Z"}
        ])
    );
    let history: Vec<(u64, u64, &str, &str)> = detail["completions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["position"].as_u64().unwrap(),
                c["trail_id"].as_u64().unwrap(),
                c["finished_at_raw"].as_str().unwrap(),
                c["day"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        history,
        [
            (1, 10, "2024-01-01 09:00:00", "2024-01-01"),
            (3, 20, "2024-01-01 10:00:00", "2024-01-01"),
            (4, 10, "2024-02-10 08:00:00", "2024-02-10"),
        ]
    );
    assert_eq!(
        detail["completions"][1]["courses"],
        json!([{"course_id": 102, "title": "Basics"}, {"course_id": 201, "title": "Advanced"}])
    );
    assert_eq!(
        detail["completions"][1]["finished_at"],
        "2024-01-01T13:00:00Z"
    );

    let all = get_ok(&app, "/v1/institutions/100/completions").await;
    assert_eq!(ids(&all, "position"), [1, 2, 3, 4]);
    // Learner 2 finished at 22:30 on Jan 1 in São Paulo: 01:30Z on Jan 2,
    // but the source-local day is Jan 1.
    assert_eq!(all["items"][1]["finished_at"], "2024-01-02T01:30:00Z");
    assert_eq!(all["items"][1]["day"], "2024-01-01");
    let by_time = get_ok(&app, "/v1/institutions/100/completions?sort=finished_at").await;
    assert_eq!(ids(&by_time, "position"), [1, 3, 2, 4]);
    let of_2 = get_ok(&app, "/v1/institutions/100/completions?user_id=2").await;
    assert_eq!(ids(&of_2, "position"), [2]);
    let of_10 = get_ok(&app, "/v1/institutions/100/completions?trail_id=10").await;
    assert_eq!(ids(&of_10, "position"), [1, 2, 4]);
    let window = get_ok(
        &app,
        "/v1/institutions/100/completions?from=2024-01-01T12:30:00Z&to=2024-02-10T11:00:00Z",
    )
    .await;
    assert_eq!(
        ids(&window, "position"),
        [2, 3],
        "from inclusive, to exclusive"
    );
    let offset = get_ok(
        &app,
        "/v1/institutions/100/completions?from=2024-01-01T09:00:00-03:00&to=2024-01-01T10:00:01-03:00&trail_id=20",
    )
    .await;
    assert_eq!(ids(&offset, "position"), [3]);

    assert_eq!(
        get_ok(
            &app,
            "/v1/institutions/100/activity?bucket=day&from=2023-12-31&to=2024-01-02"
        )
        .await,
        json!({"bucket": "day", "from": "2023-12-31", "to": "2024-01-02", "items": [
            {"start": "2023-12-31", "end": "2023-12-31", "completions": 0, "learners": 0},
            {"start": "2024-01-01", "end": "2024-01-01", "completions": 3, "learners": 2},
            {"start": "2024-01-02", "end": "2024-01-02", "completions": 0, "learners": 0}
        ]})
    );
    // Default range: the first to the last day with a completion; weeks
    // from Monday (2024-01-01 is one) to Sunday.
    let weeks = get_ok(&app, "/v1/institutions/100/activity?bucket=week").await;
    assert_eq!(
        (&weeks["from"], &weeks["to"]),
        (&json!("2024-01-01"), &json!("2024-02-11"))
    );
    let counts: Vec<(&str, u64, u64)> = weeks["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["start"].as_str().unwrap(),
                b["completions"].as_u64().unwrap(),
                b["learners"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        counts,
        [
            ("2024-01-01", 3, 2),
            ("2024-01-08", 0, 0),
            ("2024-01-15", 0, 0),
            ("2024-01-22", 0, 0),
            ("2024-01-29", 0, 0),
            ("2024-02-05", 1, 1),
        ]
    );
    assert_eq!(
        get_ok(&app, "/v1/institutions/100/activity?bucket=month").await,
        json!({"bucket": "month", "from": "2024-01-01", "to": "2024-02-29", "items": [
            {"start": "2024-01-01", "end": "2024-01-31", "completions": 3, "learners": 2},
            {"start": "2024-02-01", "end": "2024-02-29", "completions": 1, "learners": 1}
        ]})
    );

    // Raw events: institution 100's, never institution 10's (stream
    // `learner-10-9` shares a prefix with `learner-100-...` as text).
    let (status, _, body) = app.api_json("/v1/institutions/100/events", KEY_100).await;
    assert_eq!(status, 200);
    assert_eq!(ids(&body, "position"), [1, 2, 3, 4, 6]);
    let sixth = &body["items"][4];
    assert_eq!(sixth["type"], "activities.course.completed");
    assert_eq!(sixth["stream"], "learner-100-2");
    assert_eq!(sixth["revision"], 1);
    assert_eq!(sixth["schema_version"], 2);
    assert_eq!(sixth["source_id"], "all");
    assert!(
        sixth["content_hash"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert_eq!(
        sixth["data"]["delivery"]["data"]["course"]["title"],
        "Intro"
    );
    let recorded = app.events().await;
    assert_eq!(sixth["event_id"], recorded[5].id.to_string());
    assert_eq!(
        serde_json::to_string(&body["items"][0]["data"]).unwrap(),
        serde_json::to_string(&serde_json::from_str::<Value>(&recorded[0].data).unwrap()).unwrap()
    );
    let (_, _, ten) = app.api_json("/v1/institutions/10/events", KEY_10).await;
    assert_eq!(ids(&ten, "position"), [5]);
    let (_, _, window) = app
        .api_json(
            "/v1/institutions/100/events?from_position=2&to_position=4",
            KEY_100,
        )
        .await;
    assert_eq!(ids(&window, "position"), [2, 3, 4]);
    let (_, _, learner) = app
        .api_json("/v1/institutions/100/learners/2/events", KEY_100)
        .await;
    assert_eq!(ids(&learner, "position"), [2, 6]);
    let (_, _, learner) = app
        .api_json(
            "/v1/institutions/100/learners/1/events?from_position=2",
            KEY_100,
        )
        .await;
    assert_eq!(ids(&learner, "position"), [3, 4]);
    // Received-time filters: everything was received in the last minutes.
    let now = chrono::Utc::now();
    let from = (now - chrono::TimeDelta::hours(1)).to_rfc3339();
    let (_, _, recent) = app
        .api_json(
            &format!("/v1/institutions/100/events?from={}", urlencode(&from)),
            KEY_100,
        )
        .await;
    assert_eq!(ids(&recent, "position"), [1, 2, 3, 4, 6]);
    let (_, _, future) = app
        .api_json(
            &format!(
                "/v1/institutions/100/events?from={}",
                urlencode(&now.to_rfc3339())
            ),
            KEY_100,
        )
        .await;
    assert_eq!(ids(&future, "position"), Vec::<u64>::new());
    app.stop().await;
}

pub fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_and_ndjson_hold_the_same_rows() {
    let app = known_app().await;
    let (status, headers, body) = app
        .api_get(
            "/v1/institutions/100/trails",
            Some(KEY_100),
            Some("text/csv"),
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    assert_eq!(headers["x-consistent-through"], "6");
    assert_eq!(
        body,
        "trail_id,name,completions,learners,first_completed_at,last_completed_at\n\
         10,Trail 10,3,2,2024-01-01T12:00:00Z,2024-02-10T11:00:00Z\n\
         20,Trail 20,1,1,2024-01-01T13:00:00Z,2024-01-01T13:00:00Z\n"
    );
    // Pages as in JSON, the cursor in a header.
    let (_, headers, first) = app
        .api_get(
            "/v1/institutions/100/learners?limit=1",
            Some(KEY_100),
            Some("text/csv;q=0.9, application/json;q=0.5"),
        )
        .await;
    assert_eq!(first.lines().count(), 2, "{first}");
    assert!(first.starts_with("user_id,name,email,trails,completions,"));
    assert!(first.lines().nth(1).unwrap().starts_with("1,Learner 1,"));
    let cursor = headers["x-next-cursor"].to_str().unwrap().to_owned();
    let (_, headers, second) = app
        .api_get(
            &format!("/v1/institutions/100/learners?limit=1&cursor={cursor}"),
            Some(KEY_100),
            Some("text/csv"),
        )
        .await;
    assert!(second.lines().nth(1).unwrap().starts_with("2,Learner 2,"));
    assert!(headers.get("x-next-cursor").is_none());

    let (_, _, completions) = app
        .api_get(
            "/v1/institutions/100/completions?user_id=2",
            Some(KEY_100),
            Some("text/csv"),
        )
        .await;
    assert_eq!(
        completions.lines().nth(1).unwrap(),
        format!(
            "2,{},2,10,Trail 10,2024-01-02T01:30:00Z,2024-01-01 22:30:00,2024-01-01,\"[{{\"\"course_id\"\":101,\"\"title\"\":\"\"Intro\"\"}},{{\"\"course_id\"\":102,\"\"title\"\":\"\"Basics\"\"}}]\"",
            app.events().await[1].id
        )
    );
    let (_, _, activity) = app
        .api_get(
            "/v1/institutions/100/activity?bucket=month",
            Some(KEY_100),
            Some("text/csv"),
        )
        .await;
    assert_eq!(
        activity,
        "start,end,completions,learners\n2024-01-01,2024-01-31,3,2\n2024-02-01,2024-02-29,1,1\n"
    );

    let (_, headers, events) = app
        .api_get(
            "/v1/institutions/100/events",
            Some(KEY_100),
            Some("text/csv"),
        )
        .await;
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let mut reader = csv::Reader::from_reader(events.as_bytes());
    let positions: Vec<String> = reader.records().map(|r| r.unwrap()[0].to_owned()).collect();
    assert_eq!(positions, ["1", "2", "3", "4", "6"]);

    let (_, headers, ndjson) = app
        .api_get(
            "/v1/institutions/100/events",
            Some(KEY_100),
            Some("application/x-ndjson"),
        )
        .await;
    assert_eq!(headers["content-type"], "application/x-ndjson");
    let lines: Vec<Value> = ndjson
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let positions: Vec<u64> = lines
        .iter()
        .map(|l| l["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, [1, 2, 3, 4, 6]);
    let (_, _, json_page) = app.api_json("/v1/institutions/100/events", KEY_100).await;
    assert_eq!(Value::Array(lines), json_page["items"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_400_naming_them_and_unknowns_404() {
    let app = known_app().await;
    let cases: &[(&str, &str, &str)] = &[
        (
            "/v1/institutions/100/trails?limit=0",
            "limit",
            "invalid_parameter",
        ),
        (
            "/v1/institutions/100/trails?limit=1001",
            "limit",
            "invalid_parameter",
        ),
        (
            "/v1/institutions/100/trails?limit=ten",
            "limit",
            "invalid_parameter",
        ),
        (
            "/v1/institutions/100/trails?limt=10",
            "limt",
            "unknown_parameter",
        ),
        (
            "/v1/institutions/100/trails?limit=1&limit=2",
            "limit",
            "invalid_parameter",
        ),
        (
            "/v1/institutions/100/trails?sort=popularity",
            "sort",
            "invalid_parameter",
        ),
        (
            "/v1/institutions/100/trails?cursor=not-a-cursor",
            "cursor",
            "invalid_cursor",
        ),
        (
            "/v1/institutions/100/summary?wait_ms=5001",
            "wait_ms",
            "invalid_parameter",
        ),
        (
            "/v1/institutions/100/summary?min_position=-1",
            "min_position",
            "invalid_parameter",
        ),
        (
            "/v1/institutions/100/summary?min_position=99",
            "min_position",
            "invalid_parameter",
        ),
        (
            "/v1/institutions/0/summary",
            "institution_id",
            "invalid_parameter",
        ),
        (
            "/v1/institutions/abc/summary",
            "institution_id",
            "invalid_parameter",
        ),
        (
            "/v1/institutions/100/trails/x",
            "trail_id",
            "invalid_parameter",
        ),
        (
            "/v1/institutions/100/completions?from=yesterday",
            "from",
            "invalid_parameter",
        ),
        (
            "/v1/institutions/100/completions?from=2024-02-01T00:00:00Z&to=2024-01-01T00:00:00Z",
            "from",
            "invalid_range",
        ),
        (
            "/v1/institutions/100/completions?user_id=0",
            "user_id",
            "invalid_parameter",
        ),
        (
            "/v1/institutions/100/completions?to=9999-12-31T23:59:59.5Z",
            "to",
            "invalid_parameter",
        ),
        (
            "/v1/institutions/100/activity?bucket=year",
            "bucket",
            "invalid_parameter",
        ),
        (
            "/v1/institutions/100/activity?from=2024-13-01",
            "from",
            "invalid_parameter",
        ),
        (
            "/v1/institutions/100/activity?from=2024-02-01&to=2024-01-01",
            "from",
            "invalid_range",
        ),
        (
            "/v1/institutions/100/activity?to=2000-01-01",
            "to",
            "invalid_range",
        ),
        (
            "/v1/institutions/100/activity?from=2100-01-01",
            "from",
            "invalid_range",
        ),
        (
            "/v1/institutions/100/activity?bucket=day&from=2020-01-01&to=2024-01-01",
            "bucket",
            "too_many_buckets",
        ),
        (
            "/v1/institutions/100/events?from_position=5&to_position=2",
            "from_position",
            "invalid_range",
        ),
        (
            "/v1/institutions/100/events?cursor=%21",
            "cursor",
            "invalid_cursor",
        ),
    ];
    for (path, field, code) in cases {
        let (status, _, body) = app.api_json(path, OPERATOR_KEY).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["field"], *field, "{path}: {body}");
        assert_eq!(body["error"]["code"], *code, "{path}: {body}");
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    }

    // Dates that parse but that no read model holds are refused by name,
    // on both date-filtered lists (chrono's earliest date is a Thursday:
    // its week would start before it).
    for path in [
        "/v1/institutions/100/activity?bucket=week&from=-262143-01-01&to=2024-01-01",
        "/v1/institutions/100/activity?bucket=month&from=2024-01-01&to=%2B10000-01-01",
        "/v1/institutions/100/completions?from=-0001-01-01T00:00:00Z",
    ] {
        let (status, _, body) = app.api_json(path, OPERATOR_KEY).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["code"], "invalid_parameter", "{path}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains("between years 1 and 9999"),
            "{path}: {body}"
        );
    }

    // A cursor only works for its own list, sort and institution.
    let (_, _, page) = app
        .api_json("/v1/institutions/100/trails?limit=1&sort=name", KEY_100)
        .await;
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    for other in [
        format!("/v1/institutions/100/trails?cursor={cursor}"),
        format!("/v1/institutions/100/trails?sort=completions&cursor={cursor}"),
        format!("/v1/institutions/100/courses?sort=title&cursor={cursor}"),
        format!("/v1/institutions/100/learners?sort=name&cursor={cursor}"),
        format!("/v1/institutions/10/trails?sort=name&cursor={cursor}"),
        format!("/v1/institutions/100/events?cursor={cursor}"),
    ] {
        let (status, _, body) = app.api_json(&other, OPERATOR_KEY).await;
        assert_eq!(status, 400, "{other}: {body}");
        assert_eq!(body["error"]["field"], "cursor");
    }
    let (status, _, _) = app
        .api_json(
            &format!("/v1/institutions/100/trails?sort=name&cursor={cursor}"),
            KEY_100,
        )
        .await;
    assert_eq!(status, 200);

    // Unknown institution (every read-model endpoint), trail, learner: 404,
    // with the checkpoint the lookup was made at.
    for path in [
        "/v1/institutions/555/summary",
        "/v1/institutions/555/trails",
        "/v1/institutions/555/trails/10",
        "/v1/institutions/555/trails/10/learners",
        "/v1/institutions/555/courses",
        "/v1/institutions/555/learners",
        "/v1/institutions/555/learners/1",
        "/v1/institutions/555/completions",
        "/v1/institutions/555/activity",
    ] {
        let (status, at, body) = app.api_json(path, OPERATOR_KEY).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"]["code"], "institution_not_found", "{path}");
        assert_eq!(at, Some(6), "{path}");
    }
    for (path, code) in [
        ("/v1/institutions/100/trails/11", "trail_not_found"),
        ("/v1/institutions/100/trails/11/learners", "trail_not_found"),
        ("/v1/institutions/100/learners/3", "learner_not_found"),
        (
            "/v1/institutions/100/learners/3/events",
            "learner_not_found",
        ),
    ] {
        let (status, _, body) = app.api_json(path, OPERATOR_KEY).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"]["code"], code, "{path}");
    }
    // The log is filtered, not looked up: no events is an empty page.
    let (status, _, body) = app
        .api_json("/v1/institutions/555/events", OPERATOR_KEY)
        .await;
    assert_eq!((status, &body["items"]), (200, &json!([])));
    let (status, _, body) = app.api_json("/v1/nothing", OPERATOR_KEY).await;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));
    let res = app
        .client
        .post(app.url("/v1/institutions/100/summary"))
        .bearer_auth(OPERATOR_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 405);
    assert_eq!(res.headers()["allow"], "GET");
    // Without a key, neither says the path or the method exists: 401.
    for path in ["/v1/nothing", "/v1"] {
        let (status, headers, body) = app.api_get(path, None, None).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert_eq!(headers["www-authenticate"], "Bearer realm=\"tracker\"");
    }
    let res = app
        .client
        .post(app.url("/v1/institutions/100/summary"))
        .bearer_auth("not-a-key-of-this-tracker")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 401);
    // The API's description stays public.
    let (status, _, _) = app.api_get("/openapi.json", None, None).await;
    assert_eq!(status, 200);
    app.stop().await;
}

/// Every endpoint of institution 10, as a key for institution 100 would
/// ask for it, in every representation.
fn institution_10_endpoints() -> Vec<(&'static str, Vec<&'static str>)> {
    let json_only = vec!["application/json"];
    let lists = vec!["application/json", "text/csv"];
    let events = vec!["application/json", "text/csv", "application/x-ndjson"];
    vec![
        ("/v1/institutions/10/summary", json_only.clone()),
        ("/v1/institutions/10/trails", lists.clone()),
        ("/v1/institutions/10/trails/10", json_only.clone()),
        ("/v1/institutions/10/trails/10/learners", lists.clone()),
        ("/v1/institutions/10/courses", lists.clone()),
        ("/v1/institutions/10/learners", lists.clone()),
        ("/v1/institutions/10/learners/9", json_only.clone()),
        ("/v1/institutions/10/completions", lists.clone()),
        ("/v1/institutions/10/activity", lists),
        ("/v1/institutions/10/events", events.clone()),
        ("/v1/institutions/10/learners/9/events", events),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reads_only_its_institutions() {
    let app = known_app().await;
    for (path, accepts) in institution_10_endpoints() {
        // The key of institution 10 reads it (the 403s below are not 404s).
        let (status, _, body) = app.api_get(path, Some(KEY_10), None).await;
        assert_eq!(status, 200, "{path}: {body}");
        for accept in accepts {
            // With parameters too: the check comes before anything else.
            for query in ["", "?limit=1", "?min_position=5&wait_ms=10"] {
                if query == "?limit=1" && !path.ends_with('s') {
                    continue;
                }
                let full = format!("{path}{query}");
                let (status, headers, body) = app.api_get(&full, Some(KEY_100), Some(accept)).await;
                assert_eq!(status, 403, "{full} as {accept}: {body}");
                assert!(
                    headers["content-type"]
                        .to_str()
                        .unwrap()
                        .starts_with("application/json")
                );
                assert!(headers.get("x-consistent-through").is_none(), "{full}");
                let error: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(error["error"]["code"], "forbidden_institution");
                assert_eq!(error["error"]["field"], "institution_id");
                assert!(!body.contains("Learner 9") && !body.contains("learner-10-9"));
                assert_eq!(error.as_object().unwrap().len(), 1, "{body}");
            }
            let (status, headers, body) = app.api_get(path, None, Some(accept)).await;
            assert_eq!(status, 401, "{path}: {body}");
            assert_eq!(headers["www-authenticate"], "Bearer realm=\"tracker\"");
            let (status, headers, _) = app
                .api_get(path, Some("not-a-key-of-this-tracker"), Some(accept))
                .await;
            assert_eq!(status, 401);
            assert!(
                headers["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .contains("invalid_token")
            );
        }
    }
    // An institution that does not exist is 403 too, not 404: a key learns
    // nothing of institutions it does not hold.
    let (status, _, _) = app
        .api_get("/v1/institutions/555/summary", Some(KEY_100), None)
        .await;
    assert_eq!(status, 403);
    // Basic credentials or a lower-case scheme: the scheme is "Bearer".
    let res = app
        .client
        .get(app.url("/v1/institutions/100/summary"))
        .header("authorization", format!("bearer {KEY_100}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let res = app
        .client
        .get(app.url("/v1/institutions/100/summary"))
        .basic_auth("x", Some(KEY_100))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 401);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_with_min_position() {
    let app = TestApp::spawn_with(|c| c.api_keys = api_keys()).await;
    for i in 0..25u64 {
        let finished = format!("2024-03-{:02} 10:00:00", 1 + i % 28);
        let (status, answer) = app
            .post(TOKEN, &trail_done(100, 1000 + i, 7, &finished, &[INTRO]))
            .await;
        assert_eq!(status, 200);
        let position = answer["position"].as_u64().unwrap();
        let (status, at, body) = app
            .api_json(
                &format!(
                    "/v1/institutions/100/completions?user_id={}&min_position={position}&wait_ms=5000",
                    1000 + i
                ),
                KEY_100,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(at.unwrap() >= position);
        assert_eq!(
            ids(&body, "position"),
            [position],
            "the completion is there"
        );
        let (status, at, body) = app
            .api_json(
                &format!("/v1/institutions/100/summary?min_position={position}"),
                KEY_100,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(at.unwrap() >= position);
        assert_eq!(body["completions"], i + 1);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_that_has_not_caught_up_is_a_503_never_stale_data() {
    let app = TestApp::spawn_with_options(
        |c| c.api_keys = api_keys(),
        StartOptions {
            handle_signals: false,
            workers: Some(2),
            projector: false,
        },
    )
    .await;
    let (status, answer) = app
        .post(
            TOKEN,
            &trail_done(100, 1, 10, "2024-01-01 09:00:00", &[INTRO]),
        )
        .await;
    assert_eq!(status, 200);
    let position = answer["position"].as_u64().unwrap();
    let started = Instant::now();
    let (status, headers, body) = app
        .api_get(
            &format!("/v1/institutions/100/summary?min_position={position}&wait_ms=300"),
            Some(KEY_100),
            None,
        )
        .await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers["x-consistent-through"], "0");
    assert_eq!(headers["retry-after"], "1");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "not_caught_up");
    assert_eq!(body["error"]["field"], "min_position");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("position 0")
    );
    // Without min_position the answer says how far it is: nothing yet.
    let (status, at, _) = app.api_json("/v1/institutions/100/summary", KEY_100).await;
    assert_eq!((status, at), (404, Some(0)));
    app.stop().await;
}

/// With no `[[api_keys]]`, `serve` makes an operator key, prints it once
/// and keeps it across restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_no_keys_prints_a_working_dev_operator_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tracker = ChildTracker::start(&data, None);
    let key = tracker
        .stdout_lines
        .iter()
        .find_map(|l| l.strip_prefix("API key: "))
        .expect("the API key is printed")
        .to_owned();
    assert!(
        tracker
            .stdout_lines
            .iter()
            .any(|l| l.contains("development operator key 'dev'"))
    );
    let client = reqwest::Client::new();
    let get = |addr: std::net::SocketAddr, key: String| {
        client
            .get(format!("http://{addr}/v1/institutions/12345/summary"))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(
        get(tracker.addr, key.clone())
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
    assert_eq!(
        get(tracker.addr, "nope".into())
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    tracker.sigkill();
    let tracker = ChildTracker::start(&data, None);
    assert_eq!(get(tracker.addr, key).await.unwrap().status().as_u16(), 404);
}
