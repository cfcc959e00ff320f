//! Encoding a page of 50 learners with `serde_json` and with `sonic-rs`, the
//! query API's encoder, and a page of 50 completions (6 courses each,
//! written as stored) with `sonic-rs`:
//! `cargo run --release -p tracker --example encode_pages [NAME]` (only
//! the encoders whose name contains NAME, e.g. under `perf stat`). Both
//! encoders must write the same bytes for the learners.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use chrono::{DateTime, Utc};
use tracker::api::dto::{Completion, CompletionPage, Courses, Learner, LearnerPage};
use tracker_projections::query::CoursesJson;

fn main() {
    // Whole seconds, as stored.
    let now = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
    let learners = LearnerPage {
        items: (0..50)
            .map(|i| Learner {
                user_id: 100_000 + i,
                name: format!("João da Conceição Müller {i}"),
                email: format!("joao.conceicao{i}@escola.example.org.br"),
                trails: 3,
                completions: 5,
                first_completed_at: now,
                last_completed_at: now,
            })
            .collect(),
        next_cursor: Some("eyJrIjpbMTIzNDUsNjc4OTBdfQ".into()),
    };
    // As `courses_json` stores them.
    let stored = serde_json::to_string(
        &(0..6)
            .map(|j| serde_json::json!({"id": 900_000 + j, "title": "Tópicos Avançados em Negociação"}))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let completions = CompletionPage {
        items: (0..50)
            .map(|i| Completion {
                position: 1000 + i,
                event_id: uuid::Uuid::from_u128(u128::from(i)),
                user_id: 100_000 + i,
                trail_id: 500_000,
                trail_name: "Formação em Comunicação Não Violenta — Módulo 31".into(),
                finished_at: now,
                finished_at_raw: "2023-01-17 02:10:08".into(),
                day: now.date_naive(),
                courses: Courses(CoursesJson::from_stored(&stored)),
            })
            .collect(),
        next_cursor: None,
    };
    assert_eq!(
        serde_json::to_vec(&learners).unwrap(),
        sonic_rs::to_vec(&learners).unwrap()
    );
    let n: u32 = 20_000;
    type Encode<'a> = (&'a str, &'a dyn Fn() -> usize);
    let encoders: [Encode<'_>; 3] = [
        ("serde_json, 50 learners", &|| {
            serde_json::to_vec(&learners).unwrap().len()
        }),
        ("sonic-rs,   50 learners", &|| {
            sonic_rs::to_vec(&learners).unwrap().len()
        }),
        ("sonic-rs,   50 completions", &|| {
            sonic_rs::to_vec(&completions).unwrap().len()
        }),
    ];
    let only = std::env::args().nth(1).unwrap_or_default();
    for (name, encode) in encoders
        .into_iter()
        .filter(|(name, _)| name.contains(&only))
    {
        let start = Instant::now();
        let mut bytes = 0;
        for _ in 0..n {
            bytes += encode();
        }
        println!(
            "{name}: {:.1} µs a page ({} bytes)",
            start.elapsed().as_secs_f64() * 1e6 / f64::from(n),
            bytes / n as usize
        );
    }
}
