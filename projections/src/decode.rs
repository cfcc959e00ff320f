//! One decode of each recorded event per process, whatever the number of
//! runners reading it.
//!
//! Every runner of a process reads the same events (one per projection), and
//! decoding a completion's recorded JSON was a quarter of the projector's
//! instructions, done once by each runner. The first runner to decode an
//! event leaves the result here for the others; the last one to take it
//! removes it. Decoding is a pure function of the recorded event, so a
//! runner gets exactly what it would have decoded itself.
//!
//! Runners decode under one lock: a runner arriving while another decodes
//! the same events waits for it and then takes its results, instead of
//! decoding them a second time beside it. Results nobody takes (a runner that
//! stopped, or one reading elsewhere in the log) are dropped oldest first
//! beyond `capacity`.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use tracker_store::{Position, RecordedEvent};
use uuid::Uuid;

use crate::model::{Completion, DecodeError};

/// What a runner gets for one event: `None` when the read models do not
/// consume its type.
pub type Decoded = Option<Result<Completion, DecodeError>>;

/// Decoded events shared by the runners of one process. See the module docs.
#[derive(Debug)]
pub struct SharedDecode {
    runners: usize,
    capacity: usize,
    state: tokio::sync::Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    waiting: FxHashMap<Position, Waiting>,
    /// Positions in the order they were left, bounded by `capacity`; may
    /// name positions already taken.
    order: VecDeque<Position>,
    stats: DecodeStats,
}

#[derive(Debug)]
struct Waiting {
    id: Uuid,
    decoded: Result<Completion, DecodeError>,
    /// Runners still to take it.
    takers: usize,
}

/// Counts since the decoder was made.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecodeStats {
    /// Events decoded from their recorded data.
    pub decoded: u64,
    /// Events handed over from another runner's decode.
    pub shared: u64,
}

impl SharedDecode {
    /// For `runners` runners reading the same log; at most `capacity`
    /// results wait for a runner at any time.
    pub fn new(runners: usize, capacity: usize) -> Self {
        Self {
            runners: runners.max(1),
            capacity,
            state: tokio::sync::Mutex::default(),
        }
    }

    /// Each event of `events` decoded (as [`Completion::decode`] would),
    /// taking what another runner already decoded.
    pub async fn decode(&self, events: &[RecordedEvent]) -> Vec<Decoded> {
        let mut state = self.state.lock().await;
        events
            .iter()
            .map(|event| {
                if !Completion::wants(event) {
                    return None;
                }
                Some(match state.take(event) {
                    Some(decoded) => decoded,
                    None => {
                        let decoded = Completion::decode(event);
                        state.stats.decoded += 1;
                        if self.runners > 1 {
                            state.leave(event, decoded.clone(), self.runners - 1, self.capacity);
                        }
                        decoded
                    }
                })
            })
            .collect()
    }

    pub async fn stats(&self) -> DecodeStats {
        self.state.lock().await.stats
    }

    /// Results waiting for a runner.
    pub async fn waiting(&self) -> usize {
        self.state.lock().await.waiting.len()
    }
}

impl State {
    fn take(&mut self, event: &RecordedEvent) -> Option<Result<Completion, DecodeError>> {
        let waiting = self.waiting.get_mut(&event.position)?;
        if waiting.id != event.id {
            return None;
        }
        self.stats.shared += 1;
        waiting.takers -= 1;
        if waiting.takers == 0 {
            self.waiting.remove(&event.position).map(|w| w.decoded)
        } else {
            Some(waiting.decoded.clone())
        }
    }

    fn leave(
        &mut self,
        event: &RecordedEvent,
        decoded: Result<Completion, DecodeError>,
        takers: usize,
        capacity: usize,
    ) {
        self.waiting.insert(
            event.position,
            Waiting {
                id: event.id,
                decoded,
                takers,
            },
        );
        self.order.push_back(event.position);
        while self.order.len() > capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.waiting.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use tracker_domain::{SourceTimeZone, parse_delivery};
    use tracker_store::EventMetadata;

    fn recorded(position: Position, user: u64) -> RecordedEvent {
        let body = serde_json::json!({
            "event": {"slug": "activities.trail.completed", "send_at": "2024-03-01 10:00:00"},
            "data": {
                "institution": {"id": 7},
                "user": {"id": user, "name": "Ana", "email": "ana@example.edu.br"},
                "trail": {"id": 3, "name": "Trilha", "finished_at": "2024-03-01 10:00:00",
                    "courses": [{"id": 1, "title": "Curso"}, {"id": 2, "title": "Ética"}]}
            }
        })
        .to_string();
        let zone = SourceTimeZone::default();
        let parsed = parse_delivery(body.as_bytes(), &zone).expect("delivery");
        RecordedEvent {
            position,
            id: parsed.event_id(),
            stream: parsed.stream(),
            revision: 0,
            event_type: parsed.event_type().to_owned(),
            schema_version: parsed.schema_version(),
            data: parsed.event_data(&zone).expect("data"),
            metadata: EventMetadata {
                received_at: Utc::now(),
                source_id: "test".into(),
                request_id: "r".into(),
                content_hash: parsed.content_hash.clone(),
            },
        }
    }

    fn alone(events: &[RecordedEvent]) -> Vec<Decoded> {
        events
            .iter()
            .map(|e| Completion::wants(e).then(|| Completion::decode(e)))
            .collect()
    }

    #[tokio::test]
    async fn each_event_is_decoded_once_for_every_runner() {
        let mut events: Vec<_> = (1..=50).map(|p| recorded(p, p)).collect();
        // Unreadable data: the error is handed over like a completion.
        events[10].data = "{}".into();
        // Not consumed by the read models.
        events[20].event_type = "Other".into();
        let decoder = SharedDecode::new(2, 1_000);

        let first = decoder.decode(&events).await;
        let second = decoder.decode(&events).await;

        assert_eq!(first, alone(&events));
        assert_eq!(second, first);
        assert!(matches!(first[10], Some(Err(_))));
        assert_eq!(first[20], None);
        let stats = decoder.stats().await;
        assert_eq!(stats.decoded, 49, "one decode per consumed event");
        assert_eq!(stats.shared, 49, "the second runner decoded nothing");
        assert_eq!(decoder.waiting().await, 0, "the last taker removes them");
    }

    #[tokio::test]
    async fn batches_that_overlap_share_what_they_have_in_common() {
        let events: Vec<_> = (1..=30).map(|p| recorded(p, p)).collect();
        let decoder = SharedDecode::new(2, 1_000);

        assert_eq!(decoder.decode(&events[..20]).await, alone(&events[..20]));
        assert_eq!(decoder.decode(&events[..10]).await, alone(&events[..10]));
        assert_eq!(decoder.decode(&events[10..]).await, alone(&events[10..]));
        assert_eq!(decoder.decode(&events[20..]).await, alone(&events[20..]));

        let stats = decoder.stats().await;
        assert_eq!((stats.decoded, stats.shared), (30, 30));
        assert_eq!(decoder.waiting().await, 0);
    }

    #[tokio::test]
    async fn another_event_at_the_same_position_is_decoded_afresh() {
        // Another log behind the same decoder (a test's, or a restore): the
        // position alone must not hand over a stranger's completion.
        let decoder = SharedDecode::new(2, 1_000);
        decoder.decode(&[recorded(1, 100)]).await;
        let other = [recorded(1, 200)];

        let decoded = decoder.decode(&other).await;

        assert_eq!(decoded, alone(&other));
        match &decoded[0] {
            Some(Ok(c)) => assert_eq!(c.user_id, 200),
            unexpected => panic!("{unexpected:?}"),
        }
        assert_eq!(decoder.stats().await.shared, 0);
    }

    #[tokio::test]
    async fn results_nobody_takes_are_bounded() {
        let events: Vec<_> = (1..=100).map(|p| recorded(p, p)).collect();
        let decoder = SharedDecode::new(2, 16);

        decoder.decode(&events).await;

        assert_eq!(decoder.waiting().await, 16);
        // The newest are the ones kept.
        decoder.decode(&events[84..]).await;
        assert_eq!(decoder.stats().await.shared, 16);
        assert_eq!(decoder.waiting().await, 0);
    }

    #[tokio::test]
    async fn a_single_runner_keeps_nothing() {
        let events: Vec<_> = (1..=10).map(|p| recorded(p, p)).collect();
        let decoder = SharedDecode::new(1, 1_000);

        assert_eq!(decoder.decode(&events).await, alone(&events));
        assert_eq!(decoder.waiting().await, 0);
        assert_eq!(decoder.stats().await.decoded, 10);
    }
}
